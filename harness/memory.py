"""The vocabulary of a memory estimate: a model's shape, what one rank's memory costs, a stage.

The memory plan (runner/memory_plan.py) adds up per-rank bytes for each stage of a run from the
config alone; the methods say what their own stages keep, through their hooks (harness/hooks.py):
a defense's `memory_stages(node, shape, costs)` and `memory_defended(node, shape)`, an attack's
`memory_stage(node, shape, costs, defended)`. The costs they count, per rank:

- weights, gradients and optimizer state: P parameters of b bytes, T of them trained; sharded over W
  ranks under dist=fsdp (P·b/W, T·b/W, k·T·b/W with k states per parameter, the optimizer's own
  figure: attacks/optimizers.py), whole in one process;
- FSDP's working set: two decoder blocks gathered at a time (the current one and the prefetched next),
  their gradients in backward, and the root (embeddings, final norm, head) gathered for the whole step;
- activations saved for backward, per token of the micro-batch (this rank's rows × the sequence):
  per decoder block 8h + 3h_kv + 4i values (two RMSNorms, q/k/v before and after the rotary embedding,
  attention output and its copy for o_proj, the gate/up/act/product of the MLP; plus what a defense's
  added layers keep), 2V for the logits and their log-softmax; with activation checkpointing h per
  block plus one block recomputed; with a double backward twice that, plus the eager attention's scores;
- what a method keeps beyond that (frozen reference copies, an inner adversary, per-layer logits):
  named items of its stage.
"""
from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

from harness.hooks import hook, method_class

if TYPE_CHECKING:
    from torch import nn

GiB = 2 ** 30
DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}


@dataclasses.dataclass(frozen=True)
class Shape:
    """What the plan needs to know about the model (counts of parameters, dimensions)."""
    params: int             # every parameter of the model as loaded
    block_params: int       # the largest decoder block
    root_params: int        # outside the blocks: embeddings, final norm, head
    matrix_params: int      # 2-D weights inside the blocks (what Muon takes)
    layers: int
    hidden: int
    kv_hidden: int          # key/value width (hidden for multi-head attention, less with grouped queries)
    intermediate: int
    heads: int
    vocab: int
    linears: tuple          # (module name, in_features, out_features) of every nn.Linear and Conv1D, for LoRA
    dtype_bytes: int
    meta_model: nn.Module = dataclasses.field(compare=False, repr=False)  # on the meta device: no memory


@dataclasses.dataclass
class Stage:
    name: str
    device: dict            # item -> bytes on each rank's device
    host: float = 0.0       # bytes in host memory on each rank (dist=fsdp keeps the plain model there)

    @property
    def total(self) -> float:
        return sum(self.device.values())


@dataclasses.dataclass(frozen=True)
class Defended:
    """What a defense leaves in the model the attack and the evaluation get (`memory_defended` hook)."""
    extra_params: int = 0        # parameters it adds (e.g. compensation layers)
    extra_per_block: int = 0     # activations per token and decoder block its added layers keep for backward
    dtype: str | None = None     # the dtype it stores the model in (None: the loaded model's)


@dataclasses.dataclass
class Costs:
    """Turns counts into per-rank bytes for one layout (W ranks, sharded or not)."""
    shape: Shape
    ranks: int
    sharded: bool
    checkpointing: bool
    offload: bool
    seq: int
    dtype_bytes: int        # of the weights in this stage (a defense may store the defended model wider)

    def weights(self, params: float) -> float:
        on_device = 0 if self.offload else params / self.ranks
        return on_device * self.dtype_bytes

    def working_set(self, trained: bool) -> float:
        """FSDP's gathered blocks and root (and their gradients when trained); nothing in one process."""
        if not self.sharded:
            return 0.0
        gathered = 2 * self.shape.block_params + self.shape.root_params
        return gathered * self.dtype_bytes * (2 if trained else 1)

    def rows(self, batch: int) -> int:
        return math.ceil(batch / self.ranks) if self.sharded else batch

    def per_token(self, batch: int, values: int) -> float:
        """`values` float32 numbers for each token of this rank's rows of `batch` sequences."""
        return self.rows(batch) * self.seq * values * 4

    def activations(self, batch: int, forwards: int = 1, extra_per_block: int = 0,
                    double_backward: bool = False) -> float:
        """Saved activations of `forwards` graph-building forward passes of `batch` sequences."""
        s = self.shape
        tokens = self.rows(batch) * self.seq
        per_block = 8 * s.hidden + 3 * s.kv_hidden + 4 * s.intermediate + extra_per_block
        if self.checkpointing:
            per_token = s.layers * s.hidden + per_block
        else:
            per_token = s.layers * per_block
        per_token += 2 * s.vocab
        values = tokens * per_token
        if double_backward:  # the gradients keep their graph, and the math attention kernel stores its scores
            values = 2 * values + tokens * s.layers * 2 * s.heads * self.seq
        return forwards * values * 4  # float32: the loss and norms compute in float32 whatever the model's dtype


def lora_params(shape: Shape, targets, r: int, layers=None) -> int:
    """r·(in + out) for every Linear whose last name component is a target (in `layers`, if given)."""
    total = 0
    for name, fan_in, fan_out in shape.linears:
        if name.rsplit(".", 1)[-1] not in targets:
            continue
        if layers is not None and not any(f".layers.{i}." in f".{name}" for i in layers):
            continue
        total += r * (fan_in + fan_out)
    return total


def training_stage(name: str, c: Costs, params: float, trained: float, items: dict) -> Stage:
    """A defense trained with AdamW: the model's weights, the gradients and two moments of what it
    trains, FSDP's working set, then what the defense keeps besides (`items`)."""
    return Stage(name, {"weights": c.weights(params), "gradients": c.weights(trained),
                        "optimizer": c.weights(2 * trained), "fsdp gathered": c.working_set(True), **items})


def no_estimate(node) -> Stage:
    """The stage of a method without a memory hook: it says so, and counts nothing."""
    cls = method_class(node)
    target = f"{cls.__module__}.{cls.__qualname__}" if cls is not None else str(node.get("_target_"))
    name = node.get("name") or getattr(cls, "name", None) or target.rsplit(".", 1)[-1].lower()
    return Stage(f"{name}: no memory estimate for {target}", {})


def training_stages(defense, shape: Shape, c: Costs) -> list[Stage]:
    """The stages a defense's training adds (its `memory_stages` hook), named by the defense alone."""
    estimate = hook(defense, "memory_stages")
    if estimate is not None:
        return list(estimate(defense, shape, c))
    return [no_estimate(defense)] if defense.get("_target_") else []


def defended_model(defense, shape: Shape) -> Defended:
    """What the defense leaves in the model (its `memory_defended` hook; default: nothing)."""
    defended = hook(defense, "memory_defended")
    return defended(defense, shape) if defended is not None else Defended()


def attack_stage(attack, shape: Shape, c: Costs, defended: Defended) -> Stage:
    """The attack's stage (its `memory_stage` hook), named by the attack alone."""
    estimate = hook(attack, "memory_stage")
    if estimate is not None:
        return estimate(attack, shape, c, defended)
    return no_estimate(attack)
