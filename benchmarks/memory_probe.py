"""Measured memory of training the tiny model (tests/test_distributed.py and `python -m benchmarks.memory_plan --tiny` check the memory plan against it).

`python -m benchmarks.memory_probe TINY_PATH BATCH SEQ` prints, as JSON, the growth of this process's resident
memory from just before the model is loaded to its peak over two Adam steps on BATCH sequences of SEQ
tokens. Run it with MALLOC_MMAP_THRESHOLD_ fixed (see the test): glibc then maps every tensor of 64 KiB
or more on its own and unmaps it when freed, so resident memory follows the live tensors. A warm-up on
a throwaway model of the same shape first touches the code and allocator pools the steps use.
"""
from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from harness.models import from_pretrained


def resident() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def batch(vocab: int, rows: int, seq: int) -> dict:
    ids = torch.randint(4, vocab, (rows, seq), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def steps(model, b: dict, n: int = 2) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    model.train()
    for _ in range(n):
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def measure(tiny_path: str, rows: int, seq: int) -> dict:
    torch.set_num_threads(1)
    config = AutoConfig.from_pretrained(tiny_path)
    steps(AutoModelForCausalLM.from_config(config), batch(config.vocab_size, 2, seq))  # warm-up
    gc.collect()
    before = resident()
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from here
    model, _ = from_pretrained(tiny_path)
    steps(model, batch(config.vocab_size, rows, seq))
    return {"grown": peak() - before, "params": sum(p.numel() for p in model.parameters())}


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
