"""GPUs each job of a sweep needs, by the memory plan (harness/memory_plan.py): nothing is loaded.

    python -m benchmarks.memory_plan [overrides...]        (default: scale=paper)

For every defense × attack of experiment=table1 at that scale, prints the largest stage per rank on
the launcher's GPU count, and the fewest GPUs of dist.device_memory_gb on which the plan fits. The
largest of those is what `conf/scale/paper.yaml` asks SLURM for (tests/test_distributed.py checks it).
"""
from __future__ import annotations

import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from harness import memory_plan

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def _compose(overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def sweep_gpus(*overrides: str, attacks: list[str] | None = None) -> list[dict]:
    """One row per (defense, attack) of experiment=table1's sweep (or only `attacks`): largest stage
    and fewest GPUs."""
    sweep = _compose(["experiment=table1", *overrides])
    params = sweep.hydra.sweeper.params
    shape, rows = None, []
    for defense in str(params.defense).split(","):
        for attack in attacks or str(params.attack).split(","):
            cfg = _compose([*overrides, f"defense={defense}", f"attack={attack}"])
            shape = shape or memory_plan.model_shape(cfg.model, cfg.data)
            ranks = int(cfg.hydra.launcher.get("tasks_per_node", 1)) * int(cfg.hydra.launcher.get("nodes", 1))
            plan = memory_plan.plan(cfg, ranks=ranks, shape=shape)
            biggest = max(plan.stages, key=plan.stage_total)
            rows.append({"defense": defense, "attack": attack, "ranks": ranks, "stage": biggest.name,
                         "per_rank_gib": plan.stage_total(biggest) / memory_plan.GiB,
                         "host_gib": biggest.host / memory_plan.GiB, "min_gpus": plan.min_ranks,
                         "device_gib": plan.device_memory / memory_plan.GiB if plan.device_memory else None})
    return rows


def main(argv: list[str]) -> None:
    overrides = argv or ["scale=paper"]
    rows = sweep_gpus(*overrides)
    print(f"Memory plan of experiment=table1 {' '.join(overrides)}: GiB per rank on {rows[0]['ranks']} GPUs of "
          f"{rows[0]['device_gib']:.0f} GiB, and the fewest such GPUs that fit. Each rank also keeps the plain "
          f"model in host memory (up to {max(r['host_gib'] for r in rows):.1f} GiB).\n")
    print(f"| defense | attack | largest stage | GiB per rank | fewest GPUs |\n| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['defense']} | {r['attack']} | {r['stage']} | {r['per_rank_gib']:.1f} | {r['min_gpus']} |")
    print(f"\nGPUs per job for the whole sweep: {max(r['min_gpus'] for r in rows)}")


if __name__ == "__main__":
    main(sys.argv[1:])
