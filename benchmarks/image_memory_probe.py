"""Measured memory of fine-tuning an image track's model (tests/test_image_memory_plan.py checks the image
memory plan, runner/image_memory_plan.py, against it).

`python -m benchmarks.image_memory_probe vision|diffusion BATCH [OVERRIDES...]` prints, as JSON, the growth of
this process's resident memory from just before the model is built to its peak over two Adam steps of the
attack's loss on BATCH random inputs, the model built as the plan builds it (untrained weights: memory does
not depend on them). Run it with MALLOC_MMAP_THRESHOLD_ fixed, as benchmarks/memory_probe.py is: resident
memory then follows the live tensors. A warm-up on a throwaway model first touches the code and pools.
"""
from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import torch

from benchmarks.memory_probe import peak, resident


def built(track: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from runner.image_memory_plan import build
    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"experiment={track}", *overrides])
    meta = build(cfg)
    return meta, meta.model.to_empty(device="cpu")


def materialise(inputs: dict) -> dict:
    return {k: (torch.randn(v.shape, dtype=v.dtype) if v.is_floating_point() else torch.zeros(v.shape, dtype=v.dtype))
            for k, v in inputs.items()}


def steps(meta, model, batch: int, n: int = 2) -> None:
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    for _ in range(n):
        meta.loss(model, materialise(meta.inputs(batch))).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def measure(track: str, batch: int, overrides: list[str]) -> dict:
    torch.set_num_threads(1)
    meta, model = built(track, overrides)
    steps(meta, model, 2)  # warm-up
    del model
    gc.collect()
    before = resident()
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from here
    meta, model = built(track, overrides)
    steps(meta, model, batch)
    return {"grown": peak() - before, "params": sum(p.numel() for p in model.parameters())}


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], int(sys.argv[2]), sys.argv[3:])))
