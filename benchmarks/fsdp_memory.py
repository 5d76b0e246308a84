"""Sharded Adam fine-tuning of a Llama-shaped model: each rank's measured peak memory beside the memory
plan's figure, and tokens/s.

    torchrun --nproc-per-node=2 -m benchmarks.fsdp_memory                       (GPUs: NCCL; else CPU: gloo)
    torchrun --nproc-per-node=2 -m benchmarks.fsdp_memory --hidden 4096 --layers 8 --seq 1024 --specdef
    torchrun --nproc-per-node=2 -m benchmarks.fsdp_memory --hidden 256 --layers 4 --seq 128 --vocab 4096  (CPU)

A random-init float32 Llama of the given shape (grouped-query attention, intermediate 3.5 x hidden, as
Llama-3) runs through the harness's own path: `dist=fsdp` setup, the sharded twin of
harness/distributed.py, Adam, and harness/train.py's loop on random batches of `--batch` sequences of
`--seq` tokens (the global batch), optionally with SpecDef on every down_proj (`--specdef`) and
activation checkpointing (`--checkpointing`). Measured per rank: on a GPU `torch.cuda.max_memory_allocated`
over the steps (the plan's device figure); on the CPU the growth of resident memory from before the
model is built (the plan's device figure plus the plain model it keeps in host memory, as the plan
counts a CPU rank). Rank 0 prints one table row per rank.
"""
from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import torch

from experiments.common import compose_config


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences); each rank trains on its share")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--specdef", action="store_true", help="SpecDef (alpha 1e4, k 16) on every down_proj first")
    p.add_argument("--checkpointing", action="store_true", help="dist.activation_checkpointing=true")
    return p.parse_args(argv)


def llama(args):
    from transformers import LlamaConfig
    heads = max(1, args.hidden // 128)
    return LlamaConfig(hidden_size=args.hidden, intermediate_size=int(3.5 * args.hidden), num_hidden_layers=args.layers,
                       num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), vocab_size=args.vocab,
                       max_position_embeddings=args.seq, tie_word_embeddings=False)


def run_config(args):
    """The harness config of this benchmark (what the plan reads: attack, batch, dist switches, defense)."""
    overrides = ["dist=fsdp", "attack=adam", f"attack.batch_size={args.batch}", "attack.grad_accum=1",
                 f"dist.activation_checkpointing={str(args.checkpointing).lower()}", "model.device=auto"]
    if args.specdef:
        overrides += ["defense=specdef", "defense.layers=[model.layers.*.mlp.down_proj]"]
    return compose_config(overrides)


def peak_resident() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main(argv=None) -> None:
    from transformers import AutoModelForCausalLM
    from harness import distributed
    from runner import memory_plan
    from harness.train import lm_loss, train_loop
    args = parse(argv)
    cfg = run_config(args)
    distributed.setup(cfg)
    device = distributed.device()
    config = llama(args)
    Path("/proc/self/clear_refs").write_text("5")  # the resident peak (VmHWM) starts again here
    before = peak_resident()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)  # the plain model, whole in host memory on every rank
    if args.specdef:
        from specdef.core import apply_specdef
        apply_specdef(model, alpha=1e4, k=16, layers=["model.layers.*.mlp.down_proj"])
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    batches = itertools.repeat({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    with distributed.sharded(model, write_back=False) as twin:
        optimizer = torch.optim.Adam(twin.parameters(), lr=1e-5)
        result = train_loop(twin, batches, lm_loss, [optimizer], steps=args.steps, progress=False)
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_resident() - before
    peaks = distributed.gather_objects(peak)
    ranks = distributed.world_size()
    plan = memory_plan.plan(cfg, ranks=ranks, device_label=device.type, seq=args.seq,
                            device_memory=(torch.cuda.get_device_properties(device).total_memory
                                           if device.type == "cuda" else None),
                            shape=memory_plan.shape_from_config(config, 4))
    attack = next(s for s in plan.stages if s.name.startswith("attack"))
    planned = plan.stage_total(attack)
    if distributed.is_main():
        gib = memory_plan.GiB
        print(f"Llama-shaped float32, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f} M parameters{' + SpecDef' if args.specdef else ''}; "
              f"{ranks} ranks on {device.type} ({'NCCL' if device.type == 'cuda' else 'gloo'}); global batch "
              f"{args.batch} x {args.seq} tokens; activation checkpointing {args.checkpointing}; {args.steps} Adam steps")
        print("| rank | measured peak GiB | planned GiB | planned / measured |\n| --- | --- | --- | --- |")
        for r, p in enumerate(peaks):
            print(f"| {r} | {p / gib:.2f} | {planned / gib:.2f} | {planned / p:.2f} |")
        print(f"tokens/s {result.tokens_per_second:.0f} (training time {result.train_seconds:.1f} s of {wall:.1f} s "
              f"including sharding)")


if __name__ == "__main__":
    main()
