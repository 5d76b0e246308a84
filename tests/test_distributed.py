"""dist=fsdp on CPU with gloo: two ranks train like one process, a killed rank's run resumes, what cannot
be sharded refuses, and the memory plan matches measured memory."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from harness import memory_plan
from harness.errors import ConfigError
from harness.record import read_record
from harness.validate import validate
from tests import dist_worker
from tests.conftest import compose_cfg

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone"]


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "SPECDEF_OUTPUTS": str(tmp_path / "outputs"), "OMP_NUM_THREADS": "1"}


def _relative(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float(((a - b).abs() / b.abs().clamp_min(1e-12)).max())


def test_two_ranks_train_like_one_process(tiny_path, tmp_path):
    """Adam, LoRA and NPO (a reference model) on the tiny model with SpecDef in every block: the 2-rank
    run's losses and final weights equal the 1-process run's, and so do its evaluation's metrics."""
    sharded = tmp_path / "sharded"
    out = subprocess.run([*TORCHRUN, "-m", "tests.dist_worker", str(sharded), "dist=fsdp"], cwd=REPO,
                         capture_output=True, text=True, env=_env(tmp_path), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    whole = tmp_path / "whole"
    whole.mkdir()
    one = dist_worker.scenarios(whole)
    two = json.loads((sharded / "results.json").read_text())
    assert two["metrics"] == pytest.approx(one["metrics"], rel=1e-6)
    for name in ("adam", "lora", "npo"):
        assert len(two[name]) == len(one[name]) == 3
        assert _relative(two[name], one[name]) < 1e-5, name
        w1, w2 = load_file(whole / f"{name}.safetensors"), load_file(sharded / f"{name}.safetensors")
        assert w1.keys() == w2.keys() and w1
        assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-5, name
    assert any("comp" in k for k in load_file(sharded / "adam.safetensors"))  # SpecDef's layers trained too
