"""Per-rank memory of a run, from its config alone: nothing is loaded but the model's config.

`python run.py ... plan=true` prints the plan and exits; every run checks it first and refuses a config
that cannot fit, naming the GPUs it needs. The model's shape comes from its config on the meta device
(a hub model's `config.json`, the tiny model's spec), SpecDef's compensation layers and LoRA adapters
from the layers they match. Per rank, for each stage of the run (defense training, attack, evaluation):

- weights, gradients and optimizer state: P parameters of b bytes, T of them trained; sharded over W
  ranks under dist=fsdp (P·b/W, T·b/W, k·T·b/W with k states per parameter: Adam 2, SGD with momentum
  1, Muon 1 on the matrices and AdamW's 2 on the rest, SophiaH and AdaHessian 2, Lion, SignSGD and
  Adagrad 1, MeZO and SGLD none; MeZO keeps no gradients or activations), whole in one process;
- FSDP's working set: two decoder blocks gathered at a time (the current one and the prefetched next),
  their gradients in backward, and the root (embeddings, final norm, head) gathered for the whole step;
- activations saved for backward, per token of the micro-batch (this rank's rows × data.max_length):
  per decoder block 8h + 3h_kv + 4i values (two RMSNorms, q/k/v before and after the rotary embedding,
  attention output and its copy for o_proj, the gate/up/act/product of the MLP; SpecDef adds h per
  defended layer), 2V for the logits and their log-softmax; with activation checkpointing h per block
  plus one block recomputed; with a double backward (SophiaH, AdaHessian) twice that, plus the eager
  attention's scores;
- a defense's extra models and buffers: frozen reference copies (RMU, NPO, TAR), TAR's inner
  adversary (its AdamW state, a saved θ and the meta-gradient), RepNoise's logit lens (2V per layer),
  ELM's erase target (4V per forget token).

The attack and evaluation stages count the defended model in SpecDef's release dtype (defense.dtype,
float32 at paper scale over the bfloat16 release of Llama-3.1-8B-Instruct). Under dist=fsdp every rank
also keeps the plain model whole in host memory (P·b), reported apart (with dist.cpu_offload the
shards, gradients and optimizer state move there too; not counted).
These are estimates (within 25 % of measured memory on the tiny model: tests/test_distributed.py);
the run is refused when the largest stage exceeds the usable share of a device.
"""
from __future__ import annotations

import dataclasses
import math
import os
from functools import lru_cache

import torch
from omegaconf import OmegaConf

from harness.errors import ConfigError

GiB = 2 ** 30
USABLE = 0.90                   # of a device's memory: the allocator's fragmentation and caches take the rest
CUDA_RESERVED = 2 * GiB         # CUDA context, NCCL buffers and cuBLAS workspaces on each GPU
DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
# optimizer states per trained parameter, by the class name of attack.optimizer._target_
STATES = {"Adam": 2, "AdamW": 2, "SGD": 1, "Muon": 1, "SophiaH": 2, "AdaHessian": 2, "Lion": 1, "SignSGD": 1,
          "Adagrad": 1, "ScheduleFreeAdamW": 2, "MeZO": 0, "SGLD": 0}
SECOND_ORDER = ("SophiaH", "AdaHessian")
MAX_RANKS = 4096


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
    meta_model: torch.nn.Module = dataclasses.field(compare=False, repr=False)  # on the meta device: no memory


@dataclasses.dataclass
class Stage:
    name: str
    device: dict            # item -> bytes on each rank's device
    host: float = 0.0       # bytes in host memory on each rank (dist=fsdp keeps the plain model there)

    @property
    def total(self) -> float:
        return sum(self.device.values())


@dataclasses.dataclass
class Plan:
    ranks: int
    sharded: bool
    device_memory: float | None      # bytes of one rank's device; None: unknown (nothing to check against)
    device_label: str
    stages: list[Stage]
    min_ranks: int | None = None     # smallest number of ranks that fits (dist=fsdp), None: none does
    shardable: bool = True           # False: the attack needs a double backward, which FSDP2 cannot shard

    def stage_total(self, stage: Stage) -> float:
        """Bytes a stage needs of one rank's device (on the CPU the device is host memory: the plain model too)."""
        return stage.total + (stage.host if self.device_label == "cpu" else 0)

    @property
    def per_rank(self) -> float:
        return max(self.stage_total(s) for s in self.stages)

    @property
    def usable(self) -> float | None:
        if self.device_memory is None:
            return None
        reserved = CUDA_RESERVED if self.device_label.startswith("cuda") else 0
        return USABLE * self.device_memory - reserved

    @property
    def fits(self) -> bool:
        return self.usable is None or self.per_rank <= self.usable

    def report(self) -> str:
        where = f"{self.ranks} rank{'s' if self.ranks > 1 else ''} ({'dist=fsdp' if self.sharded else 'dist=none'})"
        lines = [f"memory plan: {where}, per rank, GiB"]
        for s in self.stages:
            items = ", ".join(f"{k} {v / GiB:.2f}" for k, v in s.device.items() if v)
            host = f"; host {s.host / GiB:.2f}" if s.host else ""
            lines.append(f"  {s.name:<28} {self.stage_total(s) / GiB:8.2f}   ({items}{host})")
        device = ("unknown" if self.device_memory is None
                  else f"{self.device_memory / GiB:.1f} ({self.usable / GiB:.1f} usable)")
        lines.append(f"  largest stage {self.per_rank / GiB:.2f} GiB; device {self.device_label}: {device}")
        lines.append(f"  {'fits' if self.fits else 'does not fit'}; {self.needs()}")
        return "\n".join(lines)

    def needs(self) -> str:
        if not self.shardable:
            return (f"this attack cannot be sharded (a double backward): it needs one device with "
                    f"{self.per_rank / GiB:.1f} GiB usable")
        if self.min_ranks is None:
            return ("no number of ranks fits: turn on dist.activation_checkpointing or dist.cpu_offload, "
                    "or shrink the batch")
        return f"dist=fsdp fits from {self.min_ranks} rank{'s' if self.min_ranks > 1 else ''} of this device"


# ---------------------------------------------------------------------------------------------
# The model's shape from its config
# ---------------------------------------------------------------------------------------------

def hf_config(cfg_model, cfg_data):
    """The model's transformers config without its weights: the tiny spec, or a hub/local `config.json`."""
    if cfg_model.source == "tiny":
        from harness import synthetic, tiny
        from harness.models import tiny_spec
        world = synthetic.WorldConfig(**cfg_data.world)
        return tiny.model_config(tiny_spec(cfg_model), tiny.build_tokenizer(synthetic.vocabulary(world)))
    from transformers import AutoConfig
    from harness.models import check_model_path
    try:  # a local folder or the Hugging Face cache, without the network
        return AutoConfig.from_pretrained(cfg_model.path, trust_remote_code=cfg_model.trust_remote_code,
                                          local_files_only=True)
    except (OSError, ValueError):
        if cfg_model.get("architecture") is not None:  # e.g. on a login node: what its config.json publishes
            return AutoConfig.for_model(**OmegaConf.to_container(cfg_model.architecture))
    check_model_path(cfg_model.path, trust_remote_code=cfg_model.trust_remote_code)  # unreachable: one line
    return AutoConfig.from_pretrained(cfg_model.path, trust_remote_code=cfg_model.trust_remote_code)


def model_shape(cfg_model, cfg_data) -> Shape:
    key = repr((OmegaConf.to_container(cfg_model, resolve=True), OmegaConf.to_container(cfg_data, resolve=True)))
    if key not in _shapes:  # a sweep plans the same model for every job
        _shapes[key] = shape_from_config(hf_config(cfg_model, cfg_data), DTYPE_BYTES[cfg_model.dtype])
    return _shapes[key]


_shapes: dict[str, Shape] = {}


def shape_from_config(config, dtype_bytes: int) -> Shape:
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    from harness.distributed import decoder_blocks
    blocks = decoder_blocks(model)
    block_counts = [sum(p.numel() for p in b.parameters()) for b in blocks]
    params = sum(p.numel() for p in model.parameters())
    from transformers.pytorch_utils import Conv1D
    linears = tuple((n, m.in_features, m.out_features) for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear))
    linears += tuple((n, *m.weight.shape) for n, m in model.named_modules() if isinstance(m, Conv1D))
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return Shape(params=params, block_params=max(block_counts), root_params=params - sum(block_counts),
                 matrix_params=sum(p.numel() for b in blocks for p in b.parameters() if p.ndim == 2),
                 layers=len(blocks), hidden=hidden, kv_hidden=hidden // heads * kv_heads,
                 intermediate=getattr(config, "intermediate_size", 4 * hidden), heads=heads,
                 vocab=config.vocab_size, linears=linears, dtype_bytes=dtype_bytes, meta_model=model)


def specdef_widths(shape: Shape, defense) -> list[int]:
    """Output width of every layer SpecDef defends (its layer patterns, or each family's defaults): Linear,
    Conv1D and MoE experts modules alike, each getting one out x out compensation."""
    if not str(defense.get("_target_", "")).startswith("specdef."):
        return []
    from specdef.core import match_layers
    from specdef.modules import output_weights
    layers = defense.get("layers")
    names = match_layers(shape.meta_model, None if layers is None else list(layers))
    return [output_weights(shape.meta_model.get_submodule(n))[0].shape[1] for n in names]


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


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Costs:
    """Turns counts into per-rank bytes for one layout (W ranks, sharded or not)."""
    shape: Shape
    ranks: int
    sharded: bool
    checkpointing: bool
    offload: bool
    seq: int
    dtype_bytes: int        # of the weights in this stage (SpecDef may store the defended model wider)

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


def _target(node) -> str:
    return str((node or {}).get("_target_", "")).rsplit(".", 1)[-1]


def attack_stage(cfg, shape: Shape, c: Costs, specdef_params: int) -> Stage:
    attack = cfg.attack
    if attack.get("optimizer") is None:  # attack=none
        return Stage("attack: none", {})
    params = shape.params + (0 if attack.get("undo") else specdef_params)
    peft = attack.get("peft")
    optimizer = _target(attack.optimizer)
    if peft is not None:
        trained = lora_params(shape, list(peft.target_modules), int(peft.r))
        params += trained
        states = STATES.get(optimizer, 2) * trained
    elif attack.get("param_split") == "muon":
        trained = params
        states = STATES.get(optimizer, 1) * shape.matrix_params + STATES.get(_target(attack.aux_optimizer), 2) * (
            trained - shape.matrix_params)
    else:
        trained = params
        momentum = attack.optimizer.get("momentum", 0) if optimizer == "SGD" else 1
        states = STATES.get(optimizer, 2) * trained * (1 if momentum else 0)
    double = optimizer in SECOND_ORDER or bool(attack.get("second_order"))
    extra = shape.hidden if specdef_params and not attack.get("undo") else 0
    if _forward_only(attack.optimizer):  # MeZO: no gradients, forward passes without a graph (logits only)
        gradients, activations = 0.0, c.per_token(attack.batch_size, 2 * shape.vocab)
    else:
        gradients = c.weights(trained)
        activations = c.activations(attack.batch_size, extra_per_block=extra, double_backward=double)
    return Stage(f"attack: {attack.name}{' + lora' if peft is not None else ''}", {
        "weights": c.weights(params), "gradients": gradients, "optimizer": c.weights(states),
        "fsdp gathered": c.working_set(not _forward_only(attack.optimizer)), "activations": activations})


def _forward_only(optimizer) -> bool:
    """A zeroth-order optimizer (class attribute `forward_only`, e.g. attacks.mezo.MeZO)."""
    try:
        from hydra.utils import get_class
        return bool(getattr(get_class(str(optimizer._target_)), "forward_only", False))
    except Exception:  # noqa: BLE001 - an unknown class fails at instantiation with Hydra's own message
        return False


def defense_stages(defense, shape: Shape, c: Costs, name: str = "") -> list[Stage]:
    """The training stage of a defense (and of SpecDef's base), or none for SpecDef alone."""
    kind = _target(defense)
    if kind == "SpecDef":
        base = defense.get("base")
        if base is None:
            return []
        from specdef.defense import load_base_config
        base_cfg = load_base_config(base, defense.get("base_overrides"), defense.get("base_scale"))
        return defense_stages(base_cfg, shape, c, "specdef over ")
    if kind in ("NoDefense", ""):
        return []
    p = shape.params
    batch = int(defense.get("batch_size", 1))
    if kind == "RMU":
        trained = len(defense.param_layers) * shape.hidden * shape.intermediate
        items = {"frozen copy": c.weights(p), "activations": c.activations(batch, forwards=2)}
    elif kind == "NPO":
        trained = p
        items = {"frozen copy": c.weights(p), "activations": c.activations(batch, forwards=2)}
    elif kind == "RepNoise":
        trained = p
        items = {"activations": c.activations(batch, forwards=2),  # forget and retain text
                 "logit lens": c.per_token(batch, 2 * shape.layers * shape.vocab)}  # logits + log-softmax per layer
    elif kind == "ELM":
        trained = lora_params(shape, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                              int(defense.lora_r), list(defense.lora_layers))
        p += trained
        items = {"activations": c.activations(batch, forwards=3),  # forget, retain and consistency text
                 "erase target": c.per_token(batch, 4 * shape.vocab)}  # three log-softmaxes and the target
    else:  # TAR, and any defense this plan does not know: the most a defense here keeps
        trained = p
        items = {"frozen copy": c.weights(p), "adversary state": c.weights(4 * p),
                 "activations": c.activations(max(batch, int(defense.get("adversary_batch_size", 1))), forwards=2)}
    label = f"defense: {name}{kind.lower() if kind != 'SpecDef' else 'specdef'}"
    return [Stage(label, {"weights": c.weights(p), "gradients": c.weights(trained),
                          "optimizer": c.weights(2 * trained), "fsdp gathered": c.working_set(True), **items})]


def evaluation_stage(cfg, shape: Shape, c: Costs, specdef_params: int) -> Stage:
    """Forward passes only: every rank runs every evaluation batch; logits and their log-softmax in float32."""
    logits = cfg.eval.batch_size * c.seq * shape.vocab * 4 * 2
    return Stage("evaluation", {"weights": c.weights(shape.params + specdef_params),
                                "fsdp gathered": c.working_set(False), "logits": logits})


# ---------------------------------------------------------------------------------------------
# The plan and the check
# ---------------------------------------------------------------------------------------------

def plan(cfg, ranks: int | None = None, device_memory: float | None = None, device_label: str | None = None,
         seq: int | None = None, shape: Shape | None = None) -> Plan:
    """The memory plan of `cfg` on `ranks` ranks (default: those launched or asked of SLURM) with devices
    of `device_memory` bytes (default: dist.device_memory_gb, else this machine's), for sequences of
    `seq` tokens (default: data.max_length, the longest a batch can be)."""
    sharded = cfg.dist.name == "fsdp"
    ranks = (ranks or _requested_ranks(cfg)) if sharded else 1
    shape = shape or model_shape(cfg.model, cfg.data)
    label = device_label or _device_label(cfg)
    if device_memory is None:
        device_memory = _device_memory(cfg, label)
    specdef_params = sum(out * out for out in specdef_widths(shape, cfg.defense))
    defended_bytes = _defended_dtype_bytes(cfg.defense, shape)

    def stages(w: int, fsdp: bool) -> list[Stage]:
        def costs(dtype_bytes: int) -> Costs:
            return Costs(shape, w, fsdp, fsdp and bool(cfg.dist.get("activation_checkpointing", False)),
                         fsdp and bool(cfg.dist.get("cpu_offload", False)), seq or int(cfg.data.max_length),
                         dtype_bytes)
        before, after = costs(shape.dtype_bytes), costs(defended_bytes)
        out = defense_stages(cfg.defense, shape, before)
        for stage in out if fsdp else ():
            stage.host = shape.params * shape.dtype_bytes
        attacked = [attack_stage(cfg, shape, after, specdef_params), evaluation_stage(cfg, shape, after, specdef_params)]
        for stage in attacked if fsdp else ():
            stage.host = (shape.params + specdef_params) * defended_bytes
        return out + attacked

    result = Plan(ranks, sharded, device_memory, label, stages(ranks, sharded), shardable=_shardable(cfg))
    if result.shardable:
        result.min_ranks = next((w for w in range(1, MAX_RANKS + 1)
                                 if Plan(w, True, device_memory, label, stages(w, True)).fits), None)
    return result


def _defended_dtype_bytes(defense, shape: Shape) -> int:
    """Bytes per weight of the model the attack gets: SpecDef's release dtype (defense.dtype, e.g.
    float32 at paper scale over a bfloat16 model), else the loaded model's."""
    dtype = defense.get("dtype") if str(defense.get("_target_", "")).startswith("specdef.") else None
    return DTYPE_BYTES[dtype] if dtype in DTYPE_BYTES else shape.dtype_bytes


def _shardable(cfg) -> bool:
    from attacks.optimizers import config_needs_double_backward
    return not config_needs_double_backward(cfg.attack) and cfg.attack.get("sharpness_every") is None


def check(cfg) -> None:
    """Refuse, before anything is loaded, a config whose largest stage exceeds a device."""
    p = plan(cfg)
    if p.fits:
        return
    biggest = max(p.stages, key=p.stage_total)
    items = ", ".join(f"{k} {v / GiB:.1f}" for k, v in biggest.device.items() if v)
    raise ConfigError(f"memory plan: {biggest.name} needs {p.stage_total(biggest) / GiB:.1f} GiB per rank ({items}) "
                      f"on {p.ranks} rank(s) with dist={cfg.dist.name}, but a {p.device_label} device has "
                      f"{p.usable / GiB:.1f} GiB usable; allowed {_advice(p)} (plan=true prints the plan)")


def _advice(p: Plan) -> str:
    if not p.shardable:
        return (f"a device with {p.per_rank / GiB:.0f} GiB usable (this attack's double backward cannot be sharded), "
                "or a first-order attack with dist=fsdp")
    if p.min_ranks is None:
        return "dist.activation_checkpointing=true, dist.cpu_offload=true or a smaller batch"
    n = p.min_ranks
    return (f"dist=fsdp on >= {n} devices of this size (torchrun --nproc-per-node={n} run.py dist=fsdp ..., or "
            f"hydra.launcher.tasks_per_node={n} hydra.launcher.gpus_per_node={n}), dist.activation_checkpointing=true "
            "or dist.cpu_offload=true")


def _requested_ranks(cfg) -> int:
    """Ranks launched (torchrun, SLURM tasks), or, in the process that submits to SLURM, those asked for."""
    from harness.distributed import launched_world_size
    n = launched_world_size()
    if n > 1:
        return n
    try:
        from hydra.core.hydra_config import HydraConfig
        launcher = HydraConfig.get().launcher
        return int(launcher.get("tasks_per_node", 1)) * int(launcher.get("nodes", 1))
    except (ValueError, AttributeError):  # no Hydra job (compose in tests), or a launcher without tasks
        return 1


def _device_label(cfg) -> str:
    name = str(cfg.model.device)
    if name == "auto":
        # with dist.device_memory_gb set, a machine without a GPU (a SLURM login node) plans for GPUs
        name = "cuda" if torch.cuda.is_available() or cfg.dist.get("device_memory_gb") is not None else "cpu"
    return name.split(":")[0]


def _device_memory(cfg, label: str) -> float | None:
    gb = cfg.dist.get("device_memory_gb")
    if gb is not None:
        return float(gb) * GiB
    if label == "cuda" and torch.cuda.is_available():
        return float(torch.cuda.get_device_properties(0).total_memory)
    if label == "cpu":  # the ranks of one machine share its memory
        return _host_memory() / max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return None


@lru_cache(maxsize=1)
def _host_memory() -> float:
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
