"""What the scripts beyond one run share (experiments/*.py, benchmarks/*.py): the config `run.py`
would run with, the cached tiny model and its data as the harness builds them, and a result table
written as CSV + Markdown with its provenance."""
from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import pandas as pd
from hydra import compose, initialize_config_dir

from harness import synthetic, tiny
from harness.data import Data, load_data
from harness.models import tiny_spec

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
RESULTS_DIR = REPO / "results"


def script_command(module: str, argv: Sequence[str] | None) -> str:
    """The command line that ran `python -m <module>` with `argv` (None: this process's)."""
    return " ".join(["python -m", module, shlex.join(sys.argv[1:] if argv is None else argv)]).rstrip()


def run_sweep(folder: Path, overrides: Sequence[str]) -> None:
    """`python run.py -m <overrides>` into the sweep folder `folder` (runs already complete there are
    reused: the sweep resumes); stops the script if the sweep fails."""
    command = [sys.executable, "run.py", "-m", *overrides, f"hydra.sweep.dir={Path(folder).resolve()}"]
    subprocess.run(command, cwd=REPO, check=True)


def compose_config(overrides: Sequence[str] = (), return_hydra_config: bool = False):
    """The config `python run.py <overrides>` runs with (and Hydra's own, e.g. the sweep and launcher)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=return_hydra_config)


def tiny_setup(overrides: Sequence[str] = (), progress: bool = True) -> tuple[Path, Data]:
    """(folder of the pretrained tiny model, its data), training the model once if not cached."""
    cfg = compose_config(overrides)
    cache = Path(cfg.paths.cache_dir).expanduser()
    data = load_data(cfg.data, cache)
    path = tiny.ensure_tiny(synthetic.WorldConfig(**cfg.data.world), tiny_spec(cfg.model), data.root, cache,
                            progress=progress)
    return path, data


def write_table(df: pd.DataFrame, stem: Path, title: str, notes: Sequence[str] = (),
                command: str | None = None, body: str | None = None) -> list[Path]:
    """stem.csv (full precision) and stem.md (a titled table, the provenance of `command`, notes);
    `body`: the Markdown table when it should not be df's own at 3 significant digits."""
    if command:
        from reporting.provenance import provenance_text
        notes = [provenance_text(command).strip(), *notes]
    stem.parent.mkdir(parents=True, exist_ok=True)
    csv, md = stem.with_suffix(".csv"), stem.with_suffix(".md")
    df.to_csv(csv, index=False)
    body = df.to_markdown(index=False, floatfmt=".3g") if body is None else body
    md.write_text("\n\n".join([f"# {title}", body, *notes]) + "\n")
    return [csv, md]
