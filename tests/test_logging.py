"""harness.loggers and runner.report: a wandb offline run holds the run's tables and plots, is closed
even when the run raises (so multirun jobs never merge), and no API key or token lands in any file
written."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from harness.loggers import NullLogger, WandbLogger
from harness.record import write_json_atomic
from runner.report import log_run_report
from tests.test_report import make_record

SECRETS = {"WANDB_API_KEY": "secret-xyz-wandb", "HF_TOKEN": "hf_secret_abc123"}


@pytest.fixture()
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    # wandb's caches and settings stay in tmp_path, not in $HOME
    for var in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    return tmp_path


def _eventually(check, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _run_dirs(root: Path) -> list[Path]:
    return sorted(root.rglob("offline-run-*"))


def _tables(run_dir: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in (run_dir / "files" / "media" / "table").rglob("*.table.json")}


def test_run_report_lands_in_the_offline_run_as_table_and_images(offline):
    record = make_record("none", "adam", 1e-3, recover=10, final=0.63)
    run_dir = offline / "run"
    with WandbLogger(project="test", dir=str(run_dir)) as logger:
        logger.start(record["config"], run_dir)
        for point in record["attack"]["trajectory"]:
            logger.log(point, step=point["step"])
        images = log_run_report(logger, record, run_dir)
    (wandb_run,) = _run_dirs(run_dir)
    tables = sorted(_tables(wandb_run).values(), key=lambda t: t["columns"])
    assert len(tables) == 2  # the summary (best lr per optimizer) and the adam block
    assert tables[0]["columns"] == ["defense", "initial acc", "adam"]
    assert tables[0]["data"] == [["none", "0.600", "✓10 / 0.630 at lr=1e-3"]]
    assert tables[1]["columns"] == ["defense", "initial acc", "lr=1e-3"]
    assert tables[1]["data"] == [["none", "0.600", "✓10 / 0.630"]]
    assert {p.name for p in images} == {"hazard_adam.png", "loss_adam.png"}
    assert len(list((wandb_run / "files" / "media" / "images").rglob("*.png"))) == 2
    # offline, per-step history lives only in the run's protobuf log (no Python reader in wandb 0.31):
    # its items carry the metric keys and JSON values as plain bytes. wandb-core may still be
    # flushing it when finish() returns, hence the wait.
    (history,) = wandb_run.glob("*.wandb")
    assert _eventually(lambda: b"hazard_acc" in history.read_bytes() and b"0.63" in history.read_bytes())


def test_run_is_closed_when_the_run_raises(offline):
    import wandb
    with pytest.raises(RuntimeError, match="boom"):
        with WandbLogger(project="test", dir=str(offline / "a")) as logger:
            logger.start({"lr": 1e-3}, offline / "a")
            raise RuntimeError("boom")
    assert wandb.run is None and logger.run is None
    with WandbLogger(project="test", dir=str(offline / "b")) as logger:  # the next multirun job
        logger.start({"lr": 1e-4}, offline / "b")
        logger.log({"hazard_acc": 0.5}, step=1)
    assert len(_run_dirs(offline / "a")) == 1 and len(_run_dirs(offline / "b")) == 1


def test_no_secret_in_any_written_file(offline, monkeypatch):
    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(sys, "argv", ["run.py", f"model.path=hf://x?token={SECRETS['HF_TOKEN']}"])
    record = make_record("none", "adam", 1e-3, recover=10, final=0.63)
    # a token reaching the config by mistake: as a value and under a secret-looking key
    record["config"]["model"] = {"path": f"hub/{SECRETS['HF_TOKEN']}", "hub_token": "another-token-value"}
    record["config"]["logger"] = {"api_key": SECRETS["WANDB_API_KEY"]}
    run_dir = offline / "run"
    with WandbLogger(project="test", dir=str(run_dir)) as logger:
        logger.start(record["config"], run_dir)
        logger.log({"hazard_acc": 0.5}, step=1)
        logger.summary({"note": f"used {SECRETS['WANDB_API_KEY']}"})
        log_run_report(logger, record, run_dir)
    write_json_atomic(run_dir / "result.json", record)
    (history,) = run_dir.rglob("offline-run-*/*.wandb")
    assert _eventually(lambda: b"hazard_acc" in history.read_bytes())  # wandb-core has flushed the run
    files = [p for p in offline.rglob("*") if p.is_file()]
    assert len(files) > 10  # the wandb run, the report and the record were all written
    leaks = [str(p) for p in files for s in [*SECRETS.values(), "another-token-value"] if s.encode() in p.read_bytes()]
    assert leaks == []


def test_null_logger_draws_nothing(tmp_path):
    with NullLogger() as logger:
        logger.start({}, tmp_path)
        assert log_run_report(logger, make_record(), tmp_path) == []
        logger.table("t", pd.DataFrame({"a": [1]}))
    assert list(tmp_path.iterdir()) == []


def test_online_mode_is_a_choice_and_typos_are_refused():
    from harness.errors import ConfigError
    assert WandbLogger(mode="online").kwargs["mode"] == "online"
    with pytest.raises(ConfigError, match="logger.mode='offine'"):
        WandbLogger(mode="offine")


def test_report_logs_the_sweep_tables_to_wandb(offline):
    from reporting import report
    from tests.test_report import RECORDS
    sweep = offline / "sweep"
    for i, rec in enumerate(RECORDS):
        write_json_atomic(sweep / str(i) / "result.json", rec)
    out = offline / "report"
    assert report.main([str(sweep), "--out", str(out), "--no-plots", "--wandb"]) == 0
    (wandb_run,) = _run_dirs(out)
    tables = _tables(wandb_run)
    assert len(tables) == 6  # summary, relearning x3 optimizers, utility, ablations
    assert any(t["columns"][:2] == ["ablation", "defense"] for t in tables.values())


def test_redaction_keeps_package_versions_and_special_tokens():
    """Secret-looking keys are matched on their end: the record's `packages.tokenizers` version and a
    tokenizer's `pad_token` stay readable, a token or key under its usual names does not."""
    from harness.record import redact
    kept = {"packages": {"tokenizers": "0.22.1"}, "tokenizer": {"pad_token": "<pad>"}, "max_tokens": "64"}
    assert redact(kept) == kept
    hidden = {"hf_token": "a", "HUB-TOKEN": "b", "token": "c", "wandb": {"api_key": "d"}, "client_secret": "e"}
    assert set(redact(hidden)["wandb"].values()) == {"<redacted>"}
    assert {k: v for k, v in redact(hidden).items() if k != "wandb"} == dict.fromkeys(["hf_token", "HUB-TOKEN", "token", "client_secret"], "<redacted>")
