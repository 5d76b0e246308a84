"""A real 2-job multirun through hydra-submitit-launcher on a single-node SLURM cluster on localhost."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from harness.record import read_record
from tests.slurm_cluster import LocalSlurm, missing_requirements

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = missing_requirements()
    if reason:
        pytest.skip(reason)
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


def test_two_job_multirun_on_slurm(slurm, tmp_path, tiny_path):
    sweep = tmp_path / "sweep"
    out = subprocess.run(
        [sys.executable, "run.py", "-m", "hydra/launcher=slurm", "hydra.launcher.partition=debug",
         "hydra.launcher.mem_gb=2", "hydra.launcher.cpus_per_task=1", "attack.steps=2", "attack.eval_every=1",
         "eval.limit=20", "lr=1e-4,1e-3", f"hydra.sweep.dir={sweep}"],
        cwd=REPO, capture_output=True, text=True, env=slurm.env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    records = [read_record(p) for p in sorted(sweep.glob("*/result.json"))]
    assert len(records) == 2 and all(records)
    assert sorted(r["config"]["lr"] for r in records) == [1e-4, 1e-3]
    assert all(len(r["attack"]["trajectory"]) == 3 for r in records)
    # each ran as a SLURM array task (submitit writes its logs per job id)
    assert len(list((sweep / ".submitit").glob("*/*_log.out"))) == 2


def test_two_task_sharded_job_on_slurm(slurm, tmp_path, tiny_path):
    """One Hydra job as 2 SLURM tasks (2 FSDP ranks whose rendezvous submitit's helper exports): one record."""
    sweep = tmp_path / "sweep"
    out = subprocess.run(
        [sys.executable, "run.py", "-m", "hydra/launcher=slurm", "hydra.launcher.partition=debug",
         "hydra.launcher.tasks_per_node=2", "hydra.launcher.mem_gb=4", "hydra.launcher.cpus_per_task=1",
         "dist=fsdp", "attack.steps=2", "attack.eval_every=2", "eval.limit=20", f"hydra.sweep.dir={sweep}"],
        cwd=REPO, capture_output=True, text=True, env={**slurm.env, "SPECDEF_OUTPUTS": str(tmp_path / "outputs")},
        timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    records = [read_record(p) for p in sweep.glob("*/result.json")]
    assert len(records) == 1 and records[0] is not None
    assert records[0]["provenance"]["world_size"] == 2 and len(records[0]["attack"]["trajectory"]) == 2
    assert len(list((sweep / ".submitit").glob("*/*_log.out"))) == 2  # one log per task
