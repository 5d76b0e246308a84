"""One run across several processes and devices with PyTorch FSDP2 (`dist=fsdp`).

Launch N ranks with `torchrun --nproc-per-node=N run.py dist=fsdp ...`, or as N SLURM tasks of one job
(`hydra/launcher=slurm hydra.launcher.tasks_per_node=N dist=fsdp`, where submitit's helper exports the
rendezvous variables). Every rank runs the same pipeline; what differs:

- **Where the weights live.** The plain model (what is loaded, defended, transformed, cached and
  released) stays whole in host memory on every rank. What runs forward passes (training and
  evaluation) is a *sharded twin* (`sharded`): the same modules, SpecDef layers and LoRA adapters
  included, built on the meta device, split per decoder block and then at the root with
  `fully_shard`, and filled from the plain model's weights. A defense's training writes the trained
  weights back into the plain model when it ends.
- **Batches.** Every rank builds the same global batch (same seed, same order) and keeps its own rows
  (`local_part`), so the global batch size and the data order do not depend on the number of ranks.
- **Losses.** A rank's loss is its *share* of the loss one process computes on the whole batch: a mean
  over the batch divides this rank's sum by the count over all ranks (`global_sum`, `batch_mean`); a
  term that couples the rows of a batch is computed whole on every rank from the gathered rows
  (`gather_rows`, `total`) and divided by the number of ranks (`share`). Shares add up to the loss,
  the gradient reduction sums them (divide factor 1), and the logged loss is their sum.
- **Writing.** Only rank 0 writes records, caches, logs and wandb (`is_main`, `main_first`).

In one process (`dist=none`, the default) every function here is the identity or a no-op.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import logging
import os
import socket

import torch
import torch.distributed as dist
from torch import nn

from harness.errors import ConfigError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Setup:
    rank: int
    world_size: int
    device: torch.device            # where this rank's shards compute
    activation_checkpointing: bool
    cpu_offload: bool
    reshard_after_forward: bool


_setup: Setup | None = None


# ---------------------------------------------------------------------------------------------
# Joining the process group
# ---------------------------------------------------------------------------------------------

def launched_world_size() -> int:
    """Processes started for this run: torchrun's WORLD_SIZE, or the tasks of a submitit SLURM job."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
        return int(os.environ.get("SLURM_NTASKS", "1"))
    return 1


def check_rows_per_rank(key: str, size, ranks: int) -> None:
    """Under dist=fsdp every rank trains on its own rows of each batch: a batch needs a row per rank."""
    if isinstance(size, int) and size < ranks:
        raise ConfigError(f"{key}={size} with {ranks} ranks: every rank trains on its own rows of each batch; "
                          f"allowed {key} >= {ranks}")


def setup(cfg) -> None:
    """Join this run's process group (dist=fsdp), before any work. dist=none stays one process and
    refuses a launch of several (each would run the whole job and write the same files)."""
    global _setup
    _setup = None
    n = launched_world_size()
    if cfg.dist.name == "none":
        if n > 1:
            raise ConfigError(f"dist=none with {n} processes (torchrun or SLURM tasks): each would run the whole "
                              "job; allowed dist=fsdp, or a single process")
        return
    device = rank_device(cfg.model.device)
    if cfg.dist.cpu_offload and device.type != "cuda":
        raise ConfigError(f"dist.cpu_offload=true with model.device={cfg.model.device} (runs on {device}): the shards "
                          "already live in host memory; allowed cpu_offload=false, or a GPU")
    join(device, cfg.dist.timeout_min)
    _setup = Setup(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device,
                   activation_checkpointing=bool(cfg.dist.activation_checkpointing),
                   cpu_offload=bool(cfg.dist.cpu_offload), reshard_after_forward=bool(cfg.dist.reshard_after_forward))
    if _setup.rank:
        _quiet_file_logs()
    log.info("dist=fsdp: rank %d of %d on %s", _setup.rank, _setup.world_size, device)


def rank_device(name: str) -> torch.device:
    """The device of this rank's shards: cuda:<local rank>, or the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    raise ConfigError(f"model.device={name!r} with dist=fsdp: each rank computes on cuda:<its local rank> or the "
                      "CPU; allowed auto, cuda or cpu")


def join(device: torch.device, timeout_min: float = 30) -> None:
    """Initialise the default process group once (gloo on the CPU; NCCL for CUDA tensors beside gloo)."""
    if dist.is_initialized():
        return
    _export_rendezvous()
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_min))


def _export_rendezvous() -> None:
    """torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; a submitit SLURM task gets them from
    submitit's helper (multi-node included); a lone process makes a group of one on localhost."""
    if "RANK" in os.environ:
        return
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
        import submitit
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})


def _quiet_file_logs() -> None:
    """Ranks other than 0 keep their console but write nothing into the run folder's log."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        root.removeHandler(handler)
        handler.close()


def active() -> bool:
    return _setup is not None


def rank() -> int:
    return _setup.rank if _setup else 0


def world_size() -> int:
    return _setup.world_size if _setup else 1


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device | None:
    return _setup.device if _setup else None


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast(obj):
    """Rank 0's `obj` on every rank (a decision all ranks must share, e.g. "the cache has it")."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (it may build caches: the synthetic world, the tiny model, lm-eval's
    datasets), then the other ranks run it and find them built."""
    if active() and not is_main():
        dist.barrier()
    try:
        yield
    finally:
        if active() and is_main():
            dist.barrier()


def on_main(fn):
    """`fn()` run by rank 0 alone (e.g. sampling text once), its value on every rank; an error it raises
    is raised on every rank, and every rank continues from rank 0's CPU random state."""
    if not active():
        return fn()
    outcome = None
    if is_main():
        try:
            outcome = ("value", fn(), torch.get_rng_state())
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            outcome = ("error", e, torch.get_rng_state())
    kind, value, rng = broadcast(outcome)
    torch.set_rng_state(rng)
    if kind == "error":
        raise value
    return value


@contextlib.contextmanager
def on_device(model: nn.Module):
    """The plain model on this rank's GPU for the block (e.g. to generate text), back in host memory
    after; in one process, or on the CPU, the model stays where it is."""
    if not active() or _setup.device.type == "cpu":
        yield model
        return
    model.to(_setup.device)
    try:
        yield model
    finally:
        model.to("cpu")


# ---------------------------------------------------------------------------------------------
# Batches and losses
# ---------------------------------------------------------------------------------------------

def local_part(batch, device: torch.device | None = None):
    """This rank's rows of a global batch (a dict of tensors, or a dict of such dicts), on `device`.
    In one process: the whole batch."""
    if isinstance(batch, dict):
        return {k: local_part(v, device) for k, v in batch.items()}
    if not torch.is_tensor(batch):
        return batch
    if active():
        if batch.shape[0] < world_size():
            raise ConfigError(f"a batch of {batch.shape[0]} rows across {world_size()} ranks: every rank needs a "
                              "row; allowed batch sizes >= the number of ranks")
        batch = torch.tensor_split(batch, world_size())[rank()]
    return batch if device is None else batch.to(device)


def global_sum(x: torch.Tensor) -> torch.Tensor:
    """Σ over ranks of `x`, as a constant: the denominator of a mean over the global batch."""
    if not active():
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x


def batch_mean(values: torch.Tensor) -> torch.Tensor:
    """This rank's share of the mean of `values` over the global batch (one process: the mean)."""
    if not active():
        return values.mean()
    return values.sum() / global_sum(torch.tensor(values.numel(), device=values.device))


def total(x: torch.Tensor) -> torch.Tensor:
    """Σ over ranks of the shares `x`, with gradient to each rank's own share: the value of a global
    mean, when a loss applies something non-linear to it (its result then goes through `share`)."""
    if not active():
        return x
    from torch.distributed.nn.functional import all_reduce
    return all_reduce(x)


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """The rows of `x` from every rank, in global-batch order, with gradient to this rank's rows: for
    loss terms that couple the rows of a batch (RepNoise's MMD). Wrap the term in `share`."""
    if not active():
        return x
    from torch.distributed.nn.functional import all_gather
    counts = [torch.zeros((), dtype=torch.long, device=x.device) for _ in range(world_size())]
    dist.all_gather(counts, torch.tensor(x.shape[0], device=x.device))
    width = int(max(counts))
    padded = torch.cat([x, x.new_zeros((width - x.shape[0], *x.shape[1:]))]) if x.shape[0] < width else x
    parts = all_gather(padded)
    return torch.cat([p[:int(n)] for p, n in zip(parts, counts)])


def share(x: torch.Tensor) -> torch.Tensor:
    """This rank's share of a term every rank computed whole (from `gather_rows` or `total`)."""
    return x / world_size() if active() else x


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order (one process: [obj])."""
    if not active():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def sum_over_ranks(value: float) -> float:
    """Σ over ranks of a Python number (the logged loss: the sum of the ranks' shares)."""
    if not active():
        return value
    t = torch.tensor(value, dtype=torch.float64)
    dist.all_reduce(t)
    return float(t)


# ---------------------------------------------------------------------------------------------
# The sharded twin
# ---------------------------------------------------------------------------------------------

def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def sharded(model: nn.Module, *, write_back: bool = True):
    """For the block: `model` sharded across the ranks (a twin on this rank's device); in one process,
    or when `model` already is sharded, `model` itself. With `write_back` the twin's weights are copied
    into `model` when the block ends without an error, so `model` is the trained plain model again."""
    if not active() or is_sharded(model):
        yield model
        return
    twin = shard(model)
    yield twin
    if write_back:
        copy_full_weights(twin, model)


def shard(model: nn.Module) -> nn.Module:
    """A twin of `model` with every parameter split across the ranks: `fully_shard` on each decoder block,
    then on the root (embeddings, final norm, head). Built on the meta device, so no second full copy
    of the weights is ever made; each rank then receives only its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, OffloadPolicy, fully_shard
    s = _setup
    blocks_of = decoder_blocks(model)  # checked on the plain model: a clear error before any copy
    twin = _meta_twin(model)
    if s.activation_checkpointing:
        _checkpoint_blocks(twin)
    options = {"reshard_after_forward": s.reshard_after_forward,
               "offload_policy": CPUOffloadPolicy() if s.cpu_offload else OffloadPolicy()}
    names = {type(b).__name__ for b in blocks_of}
    for block in [m for m in twin.modules() if type(m).__name__ in names]:
        fully_shard(block, **options)
    # the root (embeddings, final norm, head) stays gathered from forward to backward, which needs it at
    # once; losses that read the norm and head after the forward (RepNoise's logit lens) need it too
    fully_shard(twin, **{**options, "reshard_after_forward": False})
    twin.to_empty(device="cpu" if s.cpu_offload else s.device)
    set_model_state_dict(twin, model.state_dict(), options=StateDictOptions(full_state_dict=True))
    with torch.no_grad():  # non-persistent buffers (e.g. rotary frequencies) are not in the state dict
        for name, buffer in model.named_buffers():
            twin.get_buffer(name).copy_(buffer)
    for module in twin.modules():
        if isinstance(module, FSDPModule):  # the ranks' losses are shares: their gradients add up
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # a plain sum (gloo has no pre-multiplied sum)
    twin.train(model.training)
    return twin


def reshard(model: nn.Module) -> None:
    """Free the gathered weights a forward pass left behind (the root keeps its own from forward to
    backward): an optimizer that changes the weights between forward passes without a backward (MeZO)
    must make the next forward gather them again. In one process: nothing."""
    from torch.distributed.fsdp import FSDPModule
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def frozen(model: nn.Module) -> nn.Module:
    """A sharded copy of `model` that never trains (a defense's reference model): every rank holds
    only its shards, and its forward passes gather one block at a time."""
    twin = shard(model)
    twin.requires_grad_(False)
    return twin.eval()


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP shards one at a time: the classes a Hugging Face model names in
    `_no_split_modules` (LlamaDecoderLayer, GPTNeoXLayer, ...), whatever modules sit inside them."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model
    names = set(getattr(base, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ConfigError(f"dist=fsdp with a {type(base).__name__}: it names no decoder block class in "
                          "`_no_split_modules`; allowed a Hugging Face causal LM that does")
    return blocks


def _meta_twin(model: nn.Module) -> nn.Module:
    """A deep copy whose parameters are on the meta device (no memory); buffers and attributes are copied."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def _checkpoint_blocks(model: nn.Module) -> None:
    """Recompute each decoder block's activations in backward (Hugging Face gradient checkpointing)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ConfigError(f"dist.activation_checkpointing=true with a {type(base).__name__}: it does not support "
                          "gradient checkpointing; allowed activation_checkpointing=false")
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


@torch.no_grad()
def copy_full_weights(twin: nn.Module, model: nn.Module) -> None:
    """Gather the twin's weights, one parameter at a time, into the plain model's parameters."""
    from torch.distributed.tensor import DTensor
    params = dict(model.named_parameters())
    for name, p in twin.named_parameters():
        params[name].copy_(p.full_tensor() if isinstance(p, DTensor) else p)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded tensor, differentiably; other tensors as they are."""
    from torch.distributed.tensor import DTensor
    return t.to_local() if isinstance(t, DTensor) else t


# ---------------------------------------------------------------------------------------------
# One run folder for every rank
# ---------------------------------------------------------------------------------------------

try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra is a dependency; this keeps the module importable alone
    Callback = object


class SameRunFolder(Callback):
    """torchrun starts one Hydra per rank, and each would resolve `${now:...}` at its own second. Rank 0
    resolves the run (or sweep) folder and hands its resolver cache to every rank before any folder is
    made; the other ranks also leave `.hydra/` to rank 0. (SLURM tasks need none of this: each job's
    config carries the cache of the process that submitted it.)"""

    def on_run_start(self, config, **kwargs) -> None:
        self._agree(config, "hydra.run.dir")

    def on_multirun_start(self, config, **kwargs) -> None:
        self._agree(config, "hydra.sweep.dir")

    @staticmethod
    def _agree(config, key: str) -> None:
        from omegaconf import OmegaConf, open_dict
        if launched_world_size() <= 1 or "RANK" not in os.environ:
            return
        join(rank_device(config.model.device) if config.dist.name == "fsdp" else torch.device("cpu"),
             config.dist.get("timeout_min", 30))
        if dist.get_rank() == 0:
            str(OmegaConf.select(config, key))  # resolves ${now:...} into the config's resolver cache
        box = [OmegaConf.get_cache(config)]
        dist.broadcast_object_list(box, src=0)
        OmegaConf.set_cache(config, box[0])
        if dist.get_rank():
            with open_dict(config.hydra):
                config.hydra.output_subdir = None
