"""README "Adding a defense or an attack": a defense is one Python file and one config, nothing else.

The defense below lives outside the repository (a folder on PYTHONPATH) and its config in a folder
Hydra searches (`hydra.searchpath`), so no file of the harness names it: the memory plan says it has
no estimate for it instead of borrowing another method's, and a short run goes through.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from harness.record import read_record

REPO = Path(__file__).resolve().parents[1]

DEFENSE = '''"""A throw-away defense: scales the output head (1.0 leaves the model as it is)."""
import torch


class ShrinkHead:
    name = "shrink_head"

    def __init__(self, factor: float):
        self.factor = factor
        self.info: dict = {}

    def __call__(self, model, tokenizer, data):
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(self.factor)
        self.info["factor"] = self.factor
        return model
'''
CONFIG = "_target_: throwaway_defense.ShrinkHead\nfactor: 0.5\n"


def _run(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    (tmp_path / "throwaway_defense.py").write_text(DEFENSE)
    (tmp_path / "conf" / "defense").mkdir(parents=True, exist_ok=True)
    (tmp_path / "conf" / "defense" / "throwaway.yaml").write_text(CONFIG)
    env = {**os.environ, "SPECDEF_OUTPUTS": str(tmp_path / "outputs"),
           "PYTHONPATH": os.pathsep.join([str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, "run.py", "defense=throwaway", f"hydra.searchpath=[file://{tmp_path}/conf]",
                           *overrides], cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


def test_plan_of_a_defense_without_a_memory_hook_says_so(tmp_path):
    out = _run(tmp_path, "plan=true")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "defense: shrink_head: no memory estimate for throwaway_defense.ShrinkHead" in out.stdout
    assert "attack: adam" in out.stdout and "fits;" in out.stdout  # counted as nothing, not refused


def test_a_defense_from_one_file_and_one_config_runs(tmp_path, tiny_path):
    out = _run(tmp_path, "attack.steps=2", "attack.eval_every=1", "eval.limit=20", f"hydra.run.dir={tmp_path}/run")
    assert out.returncode == 0, out.stderr[-3000:]
    record = read_record(tmp_path / "run" / "result.json")
    assert record["defense"]["name"] == "shrink_head" and record["defense"]["factor"] == 0.5
    assert [p["step"] for p in record["attack"]["trajectory"]] == [0, 1, 2]
