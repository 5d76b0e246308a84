"""Per-rank memory of a run, from its config alone: nothing is loaded but the model's config.

`python run.py ... plan=true` prints the plan and exits; every run checks it first and refuses a config
that cannot fit, naming the GPUs it needs. The model's shape comes from its config on the meta device
(a hub model's `config.json`, the tiny model's spec). The plan has a stage for the defense's training,
the attack and the evaluation; what each costs per rank is counted as harness/memory.py describes,
and what a defense or an attack keeps of its own its class says (its memory hooks, harness/hooks.py):
a method without them gets a stage that says there is no estimate, and counts nothing.

The attack and evaluation stages count the defended model as the defense leaves it: with the layers it
adds, in the dtype it stores the model in (e.g. float32 at paper scale over the bfloat16 release of
Llama-3.1-8B-Instruct). Under dist=fsdp every rank also keeps the plain model whole in host memory
(P·b), reported apart (with dist.cpu_offload the shards, gradients and optimizer state move there
too; not counted). These are estimates (within 25 % of measured memory on the tiny model:
tests/test_distributed.py); the run is refused when the largest stage exceeds the usable share of a device.
"""
from __future__ import annotations

import dataclasses
import os
from functools import lru_cache

import torch
from omegaconf import OmegaConf

from harness import hooks
from harness.errors import ConfigError
from harness.memory import (DTYPE_BYTES, GiB, Costs, Defended, Shape, Stage, attack_stage, defended_model,
                            training_stages)

USABLE = 0.90                   # of a device's memory: the allocator's fragmentation and caches take the rest
CUDA_RESERVED = 2 * GiB         # CUDA context, NCCL buffers and cuBLAS workspaces on each GPU
MAX_RANKS = 4096


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
    defended = defended_model(cfg.defense, shape)
    defended_bytes = DTYPE_BYTES.get(defended.dtype, shape.dtype_bytes)

    def stages(w: int, fsdp: bool) -> list[Stage]:
        def costs(dtype_bytes: int) -> Costs:
            return Costs(shape, w, fsdp, fsdp and bool(cfg.dist.get("activation_checkpointing", False)),
                         fsdp and bool(cfg.dist.get("cpu_offload", False)), seq or int(cfg.data.max_length),
                         dtype_bytes)
        before, after = costs(shape.dtype_bytes), costs(defended_bytes)
        out = [_named("defense", s) for s in training_stages(cfg.defense, shape, before)]
        for stage in out if fsdp else ():
            stage.host = shape.params * shape.dtype_bytes
        attacked = [_named("attack", attack_stage(cfg.attack, shape, after, defended)),
                    evaluation_stage(cfg, shape, after, defended)]
        for stage in attacked if fsdp else ():
            stage.host = (shape.params + defended.extra_params) * defended_bytes
        return out + attacked

    result = Plan(ranks, sharded, device_memory, label, stages(ranks, sharded), shardable=_shardable(cfg))
    if result.shardable:
        result.min_ranks = next((w for w in range(1, MAX_RANKS + 1)
                                 if Plan(w, True, device_memory, label, stages(w, True)).fits), None)
    return result


def _named(part: str, stage: Stage) -> Stage:
    return dataclasses.replace(stage, name=f"{part}: {stage.name}")


def evaluation_stage(cfg, shape: Shape, c: Costs, defended: Defended) -> Stage:
    """Forward passes only: every rank runs every evaluation batch; logits and their log-softmax in float32."""
    logits = cfg.eval.batch_size * c.seq * shape.vocab * 4 * 2
    return Stage("evaluation", {"weights": c.weights(shape.params + defended.extra_params),
                                "fsdp gathered": c.working_set(False), "logits": logits})


def _shardable(cfg) -> bool:
    return not hooks.needs_double_backward(cfg.attack) and cfg.attack.get("sharpness_every") is None


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
