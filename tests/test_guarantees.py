"""What the harness guarantees: safe loading, no secrets in outputs, bit-identical reruns, atomic records."""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harness.models import from_pretrained
from harness.record import read_record
from runner.pipeline import defend, run
from tests.conftest import compose_cfg

REPO = Path(__file__).resolve().parents[1]


class _Payload:
    """Unpickling this runs code: what a malicious pytorch_model.bin does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_pickle_checkpoint_is_refused(tiny_path, tmp_path):
    evil = tmp_path / "evil_model"
    evil.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_path / name, evil / name)
    marker = tmp_path / "payload_ran"
    with open(evil / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _Payload(marker)}, f)
    with pytest.raises(OSError, match="safetensors"):
        from_pretrained(evil)
    assert not marker.exists()


def test_no_unsafe_torch_load_in_the_code_base():
    """Every torch.load in the project passes weights_only=True (no arbitrary unpickling)."""
    offenders = []
    for path in REPO.rglob("*.py"):
        if any(part in (".git", "outputs", "multirun") for part in path.parts) or path.name == Path(__file__).name:
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\btorch\.load\(", line) and "weights_only=True" not in line:
                offenders.append(f"{path.relative_to(REPO)}:{lineno}")
    assert offenders == []


def test_trust_remote_code_is_off_by_default(base_cfg):
    assert base_cfg.model.trust_remote_code is False
    paper = compose_cfg("model=llama31_8b_instruct")
    assert paper.model.trust_remote_code is False


def _small_run(*overrides):
    return compose_cfg("attack.steps=4", "attack.eval_every=2", "eval.limit=30", "resume=false", *overrides)


def test_same_config_and_seed_give_bit_identical_records(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEF_OUTPUTS", str(tmp_path / "outputs"))
    cfg = _small_run("lr=3e-3", "seed=7")
    first = run(cfg, tmp_path / "a")
    second = run(cfg, tmp_path / "b")
    assert first["metrics"] == second["metrics"]
    assert first["attack"]["trajectory"] == second["attack"]["trajectory"]
    assert first["attack"]["trajectory"][-1]["loss"] is not None
    assert first["config_hash"] == second["config_hash"] and first["seed"] == 7
    other_seed = run(_small_run("lr=3e-3", "seed=8"), tmp_path / "c")
    assert other_seed["attack"]["trajectory"][1]["loss"] != first["attack"]["trajectory"][1]["loss"]


def test_secrets_never_reach_records_config_dumps_or_logs(tmp_path):
    secrets = {"WANDB_API_KEY": "wandb-secret-0123456789", "HF_TOKEN": "hf_secret_abcdefghijkl"}
    env = {**os.environ, **secrets, "WANDB_MODE": "offline", "SPECDEF_OUTPUTS": str(tmp_path / "outputs")}
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, "run.py", "logger=wandb", "attack.steps=2", "attack.eval_every=2",
                          "eval.limit=20", f"hydra.run.dir={run_dir}"], cwd=REPO, capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "result.json" for p in written) and any("wandb" in str(p) for p in written)
    for path in written:
        blob = path.read_bytes()
        for value in secrets.values():
            assert value.encode() not in blob, f"{value} leaked into {path}"
    for value in secrets.values():
        assert value not in out.stdout + out.stderr


def test_sigkill_mid_attack_leaves_no_record_and_a_rerun_completes(tmp_path):
    env = {**os.environ, "SPECDEF_OUTPUTS": str(tmp_path / "outputs")}
    run_dir = tmp_path / "run"
    args = [sys.executable, "run.py", "attack.steps=30", "attack.eval_every=5", "attack.checkpoint_every=5",
            "eval.limit=20", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not list(run_dir.glob("attack_checkpoint/*/meta.json")):
        time.sleep(0.2)  # kill once the attack has saved a checkpoint, i.e. mid-attack
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(run_dir.glob("attack_checkpoint/*/meta.json"))
    assert read_record(run_dir / "result.json") is None
    assert not list(run_dir.glob("*.tmp")) and not (tmp_path / "outputs/records").exists()
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    record = read_record(run_dir / "result.json")
    assert record is not None and record["attack"]["steps"] == 30
    assert record["attack"]["extra"]["resumed_from_step"] >= 5  # continued, not restarted from zero
    assert [p["step"] for p in record["attack"]["trajectory"]] == list(range(0, 31, 5))
    assert json.loads((run_dir / "result.json").read_text())["status"] == "complete"


class _CountingDefense:
    """A cheap defense that scales one weight; counts how often it really runs."""
    name = "counting"

    def __init__(self):
        self.calls, self.info = 0, {}

    def __call__(self, model, tokenizer, data):
        self.calls += 1
        with torch.no_grad():
            model.lm_head.weight.mul_(1.5)
        self.info = {"calls": self.calls}
        return model


def test_defended_cache_is_keyed_by_the_input_weights(tiny_path, data, tmp_path):
    """Same config, same input model: served from the cache. Same config, other input weights (a
    regenerated tiny model, a new hub revision): trained again, never a stale copy."""
    cfg, defense = compose_cfg("defense=rmu"), _CountingDefense()
    first = defend(cfg, defense, from_pretrained(tiny_path)[0], None, data, tmp_path)
    again = defend(cfg, defense, from_pretrained(tiny_path)[0], None, data, tmp_path)
    assert defense.calls == 1 and torch.equal(first.lm_head.weight, again.lm_head.weight)
    other, _ = from_pretrained(tiny_path)
    with torch.no_grad():
        other.model.norm.weight.add_(0.01)
    defend(cfg, defense, other, None, data, tmp_path)
    assert defense.calls == 2


def test_parallel_jobs_build_a_defended_model_once(tiny_path, data, tmp_path):
    """Two jobs of a sweep that need the same defended model: the second waits on the first's lock,
    then loads what the first cached instead of training the defense again."""
    import threading
    from filelock import FileLock
    from runner.pipeline import _cache_defended
    cfg, defense = compose_cfg("defense=rmu"), _CountingDefense()
    defend(cfg, defense, from_pretrained(tiny_path)[0], None, data, tmp_path)
    folder = next(p for p in (tmp_path / "defended").iterdir() if p.is_dir())
    shutil.rmtree(folder)  # the first job is still building: it holds the lock, no folder yet
    lock, second = FileLock(str(folder) + ".lock"), {}
    lock.acquire()
    job = threading.Thread(target=lambda: second.update(
        model=defend(cfg, defense, from_pretrained(tiny_path)[0], None, data, tmp_path)))
    job.start()
    job.join(timeout=2)
    assert job.is_alive() and defense.calls == 1, "the second job trained while the first held the lock"
    _cache_defended(defense(from_pretrained(tiny_path)[0], None, data), defense, folder)  # the first finishes
    lock.release()
    job.join(timeout=60)
    assert not job.is_alive() and defense.calls == 2, "the second job trained the defense again"
    assert second["model"] is not None


def test_the_defense_is_built_under_the_default_attention_whatever_the_attack(tmp_path, monkeypatch):
    """A second-order attack runs on eager attention, but the defended model it starts from is built
    under the default kernel: the cache serves one model to every attack of a sweep, and which attack
    built it first must not change its weights (eager and SDPA round differently)."""
    from attacks.relearn import Relearn
    from runner import pipeline
    seen = {}
    defend_ = pipeline.defend

    def spy_defend(cfg, defense, model, *args):
        seen["defense"] = model.config._attn_implementation
        return defend_(cfg, defense, model, *args)

    call = Relearn.__call__

    def spy_attack(self, model, *args, **kwargs):
        seen["attack"] = model.config._attn_implementation
        return call(self, model, *args, **kwargs)

    monkeypatch.setenv("SPECDEF_OUTPUTS", str(tmp_path / "outputs"))
    monkeypatch.setattr(pipeline, "defend", spy_defend)
    monkeypatch.setattr(Relearn, "__call__", spy_attack)
    run(_small_run("attack=sophia", "attack.steps=2", "lr=1e-3"), tmp_path / "run")
    assert seen == {"defense": "sdpa", "attack": "eager"}
