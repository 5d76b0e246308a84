"""The run record (`result.json`) and its provenance. Written atomically: complete or absent."""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

SCHEMA_VERSION = 1
RECORD_NAME = "result.json"
PACKAGES = ["torch", "transformers", "datasets", "lm_eval", "hydra-core", "omegaconf", "peft", "pandas",
            "pytorch_optimizer", "wandb", "submitit", "safetensors", "tokenizers", "diffusers"]
# Environment variables whose values must never reach a record, config dump or log.
SECRET_ENV = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_API_TOKEN", "OPENAI_API_KEY")


def _jsonable(x):
    """NaN/inf are not JSON: they become strings so the record stays strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


# Keys whose values are credentials, matched on the key's end, not as a substring: "tokenizers" (a
# package version) is not a secret, "hub_token" is; a tokenizer's special tokens ("pad_token") are text.
SECRET_KEY_ENDS = ("token", "api_key", "apikey", "secret", "password", "passwd")
SPECIAL_TOKENS = ("pad_token", "bos_token", "eos_token", "unk_token", "sep_token", "cls_token", "mask_token")


def _secret_key(key: str) -> bool:
    key = key.lower().replace("-", "_")
    return key.endswith(SECRET_KEY_ENDS) and not key.endswith(SPECIAL_TOKENS)


def redact(obj):
    """Replace any value equal to a secret from the environment (or under a secret-looking key)."""
    secrets = {os.environ[k] for k in SECRET_ENV if os.environ.get(k)}

    def walk(x, key=""):
        if isinstance(x, dict):
            return {k: walk(v, str(k)) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, str):
            if x and _secret_key(key):
                return "<redacted>"
            for secret in secrets:
                x = x.replace(secret, "<redacted>")
        return x
    return walk(obj)


def write_json_atomic(path: Path, obj) -> None:
    """temp file in the same folder + fsync + rename: a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_jsonable(redact(obj)), f, indent=2, sort_keys=True, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_record(path: Path) -> dict | None:
    """The record if it is complete and parseable, else None (a truncated file counts as absent)."""
    try:
        rec = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("status") == "complete" else None


def config_hash(resolved_cfg: dict) -> str:
    """Identity of a run: the resolved config minus fields that do not change its result."""
    # where and how it ran (dist: one process or sharded; plan) does not change the result
    cfg = {k: v for k, v in resolved_cfg.items()
           if k not in ("paths", "logger", "resume", "cache_defended", "dist", "plan")}
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), for "which machine produced this"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    import torch
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def provenance() -> dict:
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    # results/ holds generated files: a script writing its table must not call its own code dirty
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ":(top)", ":(top,exclude)results")
    return {"git_sha": _git("rev-parse", "HEAD"), "git_dirty": bool(status) if status is not None else None,
            "python": sys.version.split()[0], "platform": platform.platform(), "machine": machine(),
            "packages": versions, "argv": redact(sys.argv), "numerics": _numerics()}


def _numerics() -> dict:
    """This process's kernels and the pin this machine would use (harness/numerics.py). Runs compute natively;
    only the tiny model's pretraining runs under a pin (recorded in its cache manifest)."""
    from harness import numerics
    return numerics.describe()
