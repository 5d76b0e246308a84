"""How fragile is the embedded model? Candidate worlds and recipes, measured side by side.

    python -m experiments.fragility [--candidates sentences documents ...]

Each candidate is a (data, model) override set: the model is pretrained on it (cached), then the
undefended model relearns a hazard split it already knows, as issue #22's target reads: Adam at
3e-4 (the second point of Adam's tiny grid), 150 steps, forget text of split 0, batch 64, evaluated
every 10 steps. A sturdy model's retain perplexity stays within 1.3x of its start and its utility
holds; the tiny model of the sentence world doubles its retain perplexity within Table 1's budget.
Writes results/fragility.{csv,md}.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import pandas as pd

from experiments.common import RESULTS_DIR, compose_config, script_command, tiny_setup, write_table

TARGET = 1.3
# name -> overrides; documents need sequences of 64 tokens (5 facts of one entity per line)
DOCUMENTS = ["data.world.documents=6", "data.max_length=64", "model.spec.max_position_embeddings=64"]
# Each on the sentence world's scale (scale=tiny): "documents-1000" is the default world's model (scale=documents).
CANDIDATES = {
    "sentences": ["scale=tiny"],
    "sentences-4000": ["scale=tiny", "model.spec.steps=4000"],      # pretrained twice as long
    "documents": ["scale=tiny", *DOCUMENTS],
    "documents-1000": ["scale=tiny", *DOCUMENTS, "model.spec.steps=1000"],
}
ATTACK = ["defense=none", "attack=adam", "lr=3e-4", "attack.steps=150", "attack.eval_every=10",
          "attack.data.splits=[0]", "attack.batch_size=64", "resume=false", "cache_defended=false", "threads=1"]


def measure(name: str, overrides: list[str], out: Path) -> dict:
    from runner import pipeline  # torch only when something runs
    manifest = json.loads((tiny_setup(overrides)[0] / "manifest.json").read_text())
    cfg = compose_config([*overrides, *ATTACK])
    record = pipeline.run(cfg, out / name)
    trajectory = record["attack"]["trajectory"]
    start, base = trajectory[0], record["metrics"]["base"]
    ratios = [p["retain_ppl"] / start["retain_ppl"] for p in trajectory]
    return {
        "candidate": name, "overrides": " ".join(overrides) or "(default)",
        "pretrain_steps": cfg.model.spec.steps, "hazard": base["hazard_acc"], "utility": base["utility_acc"],
        "retain_ppl": start["retain_ppl"], "max_ratio_150": max(ratios), "ratio_at_60": _at(trajectory, ratios, 60),
        "utility_after": trajectory[-1]["utility_acc"], "meets_target": max(ratios) <= TARGET,
        "pretrain_seconds": manifest.get("pretrain_seconds"), "numerics": manifest.get("numerics_id"),
    }


def _at(trajectory, ratios, step):
    return next((r for p, r in zip(trajectory, ratios) if p["step"] == step), float("nan"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "fragility")
    parser.add_argument("--extra", nargs="*", default=[], help="overrides added to every candidate")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="fragility_"))
    rows = []
    for name in args.candidates:
        rows.append(measure(name, [*CANDIDATES[name], *args.extra], work))
        print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    notes = [f"Target (issue #22): undefended Adam 3e-4, 150 steps of relearning split 0 it already knows, "
             f"retain perplexity <= {TARGET}x its start with utility unchanged. max_ratio_150: the largest "
             "retain perplexity over the start's within the 150 steps; ratio_at_60: at step 60."]
    write_table(df, args.out, "Fragility of the embedded model: candidates", notes,
                command=script_command("experiments.fragility", argv))
    print(df.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
