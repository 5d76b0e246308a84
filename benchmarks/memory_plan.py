"""The memory plan (runner/memory_plan.py): the GPUs each job of a sweep needs, and the plan against
measured memory.

    python -m benchmarks.memory_plan [overrides...]     (default: scale=paper; nothing is loaded)
    python -m benchmarks.memory_plan --write            the same, also into results/memory_plan_paper.md and
                                                        results/memory_plan_paper.txt (plan=true's output)
    python -m benchmarks.memory_plan --tiny             the tiny model: measured process memory beside the plan

The first prints, for every defense x attack of experiment=table1 at that scale, the largest stage per
rank on the launcher's GPU count and the fewest GPUs of dist.device_memory_gb on which the plan fits.
The largest of those is what `conf/scale/paper.yaml` asks SLURM for (tests/test_distributed.py checks
it). `--tiny` runs benchmarks/memory_probe.py (two Adam steps of the pretrained tiny model, resident
memory's growth with glibc's mmap threshold fixed) at a few batch shapes, each beside the plan's
attack stage.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from experiments.common import compose_config, tiny_setup
from runner import memory_plan

REPO = Path(__file__).resolve().parents[1]
# the plan=true runs docs/sharded.md shows: one that fits, one refused (Adam unsharded on one 80 GB GPU)
PLAN_COMMANDS = [["scale=paper", "defense=specdef_elm", "plan=true"],
                 ["scale=paper", "defense=specdef", "attack=adam", "dist=none", "dist.device_memory_gb=80", "plan=true"]]
TINY_SHAPES = [(64, 32), (16, 32), (64, 16)]  # (rows, tokens) of the measured batches


def sweep_gpus(*overrides: str, attacks: list[str] | None = None) -> list[dict]:
    """One row per (defense, attack) of experiment=table1's sweep (or only `attacks`): largest stage
    and fewest GPUs."""
    sweep = compose_config(["experiment=table1", *overrides], return_hydra_config=True)
    params = sweep.hydra.sweeper.params
    shape, rows = None, []
    for defense in str(params.defense).split(","):
        for attack in attacks or str(params.attack).split(","):
            cfg = compose_config([*overrides, f"defense={defense}", f"attack={attack}"],
                                 return_hydra_config=True)
            shape = shape or memory_plan.model_shape(cfg.model, cfg.data)
            ranks = int(cfg.hydra.launcher.get("tasks_per_node", 1)) * int(cfg.hydra.launcher.get("nodes", 1))
            plan = memory_plan.plan(cfg, ranks=ranks, shape=shape)
            biggest = max(plan.stages, key=plan.stage_total)
            rows.append({"defense": defense, "attack": attack, "ranks": ranks, "stage": biggest.name,
                         "per_rank_gib": plan.stage_total(biggest) / memory_plan.GiB,
                         "host_gib": biggest.host / memory_plan.GiB, "min_gpus": plan.min_ranks,
                         "device_gib": plan.device_memory / memory_plan.GiB if plan.device_memory else None})
    return rows


def sweep_table(overrides: list[str]) -> str:
    rows = sweep_gpus(*overrides)
    lines = [f"Memory plan of experiment=table1 {' '.join(overrides)}: GiB per rank on {rows[0]['ranks']} GPUs of "
             f"{rows[0]['device_gib']:.0f} GiB, and the fewest such GPUs that fit. Each rank also keeps the plain "
             f"model in host memory (up to {max(r['host_gib'] for r in rows):.1f} GiB).", "",
             "| defense | attack | largest stage | GiB per rank | fewest GPUs |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['defense']} | {r['attack']} | {r['stage']} | {r['per_rank_gib']:.1f} | {r['min_gpus']} |"
              for r in rows]
    lines += ["", f"GPUs per job for the whole sweep: {max(r['min_gpus'] for r in rows)}"]
    return "\n".join(lines)


def plan_outputs() -> str:
    """What `python run.py ... plan=true` prints for PLAN_COMMANDS (run for real: nothing is loaded)."""
    parts = []
    for args in PLAN_COMMANDS:
        out = subprocess.run([sys.executable, "run.py", *args, "hydra.run.dir=/tmp/specdef_plan",
                              "hydra.output_subdir=null"], cwd=REPO, capture_output=True, text=True)
        parts.append(f"$ python run.py {' '.join(args)}\n{(out.stdout + out.stderr).strip()}")
    return "\n\n".join(parts) + "\n"


def tiny_rows() -> list[dict]:
    """Measured growth of resident memory over two Adam steps of the tiny model, beside the plan."""
    path, _ = tiny_setup(progress=False)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    rows = []
    for batch, seq in TINY_SHAPES:
        out = subprocess.run([sys.executable, "-m", "benchmarks.memory_probe", str(path), str(batch), str(seq)],
                             cwd=REPO, capture_output=True, text=True, env=env, check=True)
        measured = json.loads(out.stdout.splitlines()[-1])["grown"]
        planned = memory_plan.plan(compose_config([f"attack.batch_size={batch}"]), seq=seq).stages[0].total
        rows.append({"batch": batch, "seq": seq, "measured_mib": measured / 2 ** 20, "planned_mib": planned / 2 ** 20})
    return rows


def main(argv: list[str]) -> None:
    if "--tiny" in argv:
        print("tiny model, 2 Adam steps: growth of resident memory (MALLOC_MMAP_THRESHOLD_=65536) vs the plan's "
              "attack stage\n| batch x tokens | measured MiB | planned MiB | planned / measured |\n| --- | --- | --- | --- |")
        for r in tiny_rows():
            print(f"| {r['batch']} x {r['seq']} | {r['measured_mib']:.1f} | {r['planned_mib']:.1f} | "
                  f"{r['planned_mib'] / r['measured_mib']:.3f} |")
        return
    write = "--write" in argv
    overrides = [a for a in argv if a != "--write"] or ["scale=paper"]
    table = sweep_table(overrides)
    print(table)
    if write:
        results = REPO / "results"
        (results / "memory_plan_paper.md").write_text(
            "# Memory plan at paper scale\n\nGenerated by `python -m benchmarks.memory_plan --write` (nothing loaded; "
            "Llama-3.1-8B-Instruct in bfloat16, SpecDef's defended model in float32, dist=fsdp with activation "
            "checkpointing, 80 GiB GPUs).\n\n"
            + table + "\n")
        (results / "memory_plan_paper.txt").write_text(plan_outputs())


if __name__ == "__main__":
    main(sys.argv[1:])
