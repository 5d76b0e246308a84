"""Attack checkpoints, so a preempted or killed attack continues from its last saved step.

A checkpoint folder holds the model weights (safetensors), the optimizer and scheduler states and the
torch RNG state (`torch.save`, read back with `weights_only=True`), and `meta.json` (step, trajectory,
losses, timing). It is written to a temporary folder and renamed over the previous one, so a kill at
any moment leaves either the old checkpoint or the new one, never a mixture.

Under dist=fsdp the weights and optimizer states are sharded: every rank writes its shards through
`torch.distributed.checkpoint` (folder `sharded/`, loadable by any number of ranks), rank 0 writes the
rest and renames the folder once every rank's shards are on disk. An optimizer that keeps no
per-parameter state (SGLD, MeZO: their step counter lives in the param group) is saved whole by rank
0 instead: torch's `get_state_dict` / `set_state_dict` "initialise" an optimizer with an empty state
by stepping it at lr 0, which MeZO refuses and which moves SGLD's noise on by a step at every save
and load. A run resumes only from a
checkpoint written the same way (sharded or not); DCP reads its own metadata with pickle, so resume
only from checkpoint folders your own runs wrote.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_model, save_model
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from harness import distributed
from harness.record import write_json_atomic

log = logging.getLogger(__name__)
SHARDED = "sharded"  # the torch.distributed.checkpoint folder inside a checkpoint


class AttackCheckpoint:
    """Save every `every` steps into `folder`; `None` for either disables checkpointing."""

    def __init__(self, folder: str | Path | None, every: int | None):
        self.folder = Path(folder) if folder is not None and every else None
        self.every = every

    def due(self, step: int) -> bool:
        return self.folder is not None and step % self.every == 0

    def save(self, step: int, model, optimizers, schedulers, meta: dict) -> None:
        pid = distributed.broadcast(os.getpid())  # one temporary folder for all ranks
        tmp = self.folder.with_name(f"{self.folder.name}.tmp{pid}")
        if distributed.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        distributed.barrier()
        whole = _saved_whole(optimizers)
        if distributed.active():
            sharded = [o for i, o in enumerate(optimizers) if i not in whole]
            dcp.save(_sharded_state(model, sharded), checkpoint_id=tmp / SHARDED)  # returns once all ranks wrote
        else:
            save_model(model, str(tmp / "model.safetensors"))  # handles tied weights
        if distributed.is_main():
            torch.save({"optimizers": [optimizers[i].state_dict() for i in whole], "whole": whole,
                        "schedulers": [s.state_dict() for s in schedulers], "rng": torch.get_rng_state()},
                       tmp / "state.pt")
            write_json_atomic(tmp / "meta.json", {"step": step, "sharded": distributed.active(), **meta})
            old = self.folder.with_name(f"{self.folder.name}.old{pid}")
            if self.folder.exists():
                self.folder.rename(old)
            tmp.rename(self.folder)
            shutil.rmtree(old, ignore_errors=True)
        distributed.barrier()

    def load(self, model, optimizers, schedulers) -> dict | None:
        """Restore the states in place and return the saved meta (with `step`), or None."""
        if self.folder is None or not (self.folder / "meta.json").is_file():
            return None
        meta = json.loads((self.folder / "meta.json").read_text())
        if meta.get("sharded", False) != distributed.active():
            log.warning("attack checkpoint %s was written with dist=%s, this run has dist=%s: starting the attack "
                        "over", self.folder, *(("fsdp", "none") if meta.get("sharded") else ("none", "fsdp")))
            return None
        state = torch.load(self.folder / "state.pt", weights_only=True)
        # checkpoints written before "whole": every optimizer whole in one process, every one sharded under fsdp
        whole = state.get("whole", [] if distributed.active() else list(range(len(optimizers))))
        if distributed.active():
            rest = [o for i, o in enumerate(optimizers) if i not in whole]
            sharded = _sharded_state(model, rest)
            dcp.load(sharded, checkpoint_id=self.folder / SHARDED)
            set_state_dict(model, rest, model_state_dict=sharded["model"], optim_state_dict=sharded["optim"])
        else:
            load_model(model, str(self.folder / "model.safetensors"))
        for i, saved in zip(whole, state["optimizers"], strict=True):
            optimizers[i].load_state_dict(saved)
        for sched, saved in zip(schedulers, state["schedulers"], strict=True):
            sched.load_state_dict(saved)
        torch.set_rng_state(state["rng"])
        log.info("attack resumed from its checkpoint at step %d (%s)", meta["step"], self.folder)
        return meta

    def clear(self) -> None:
        if self.folder is not None and distributed.is_main():
            shutil.rmtree(self.folder, ignore_errors=True)


def _saved_whole(optimizers) -> list[int]:
    """Which optimizers rank 0 saves whole: in one process all; sharded, those without per-parameter
    state (nothing in them is sharded, and torch's sharded state dict would step them to initialise them)."""
    return [i for i, o in enumerate(optimizers) if not distributed.active() or not o.state]


def _sharded_state(model, optimizers) -> dict:
    """The model's and optimizers' sharded state dicts, as torch.distributed.checkpoint saves and loads them."""
    model_state, optim_state = get_state_dict(model, optimizers)
    return {"model": model_state, "optim": optim_state}
