"""The README's summary: Table 1 at each optimizer's best learning rate, with what held-out recovery
says of each defense (knowledge hidden or removed).

    python -m reporting.summary [--table1 results/table1_tiny] [--heldout results/heldout_tiny]

Reads the two published reports (`summary.csv` of Table 1's, `heldout.csv` of experiment=heldout's)
and writes `summary_tiny.md` and `.csv` into results/, which the README embeds.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from reporting.tables import HIDDEN_RATIO, markdown_report

REPO = Path(__file__).resolve().parents[1]
COLUMN = "knowledge (held-out)"


def with_knowledge(table1: pd.DataFrame, heldout: pd.DataFrame) -> pd.DataFrame:
    """Table 1's summary with one more column: the held-out verdict of each defense ('—': not run)."""
    verdicts = heldout.drop_duplicates("defense").set_index("defense")["knowledge"]
    return table1.assign(**{COLUMN: table1["defense"].map(verdicts).fillna("—")})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table1", type=Path, default=REPO / "results" / "table1_tiny")
    parser.add_argument("--heldout", type=Path, default=REPO / "results" / "heldout_tiny")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "summary_tiny")
    args = parser.parse_args(argv)
    missing = [p for p in (args.table1 / "summary.csv", args.heldout / "heldout.csv") if not p.is_file()]
    if missing:
        print(f"error: {', '.join(map(str, missing))} not generated yet (run the presets first)")
        return 1
    frame = with_knowledge(pd.read_csv(args.table1 / "summary.csv", keep_default_na=False),
                           pd.read_csv(args.heldout / "heldout.csv", keep_default_na=False))
    note = (f"_{COLUMN}: relearning one hazard split with Adam (experiment=heldout), held-out gain / relearned "
            f"gain ≥ {HIDDEN_RATIO} is hidden (the split never trained on comes back too), below it removed. "
            f"Sources: `results/{args.table1.name}/summary.csv`, `results/{args.heldout.name}/heldout.csv` "
            "(a page that embeds this table links them itself)._")
    frame.to_csv(args.out.with_suffix(".csv"), index=False)
    args.out.with_suffix(".md").write_text(markdown_report({"summary": frame}) + note + "\n")
    print(f"wrote {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
