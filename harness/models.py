"""Model loading: the cached tiny Llama or any Hugging Face causal LM, safetensors only."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as transformers_logging

from harness import synthetic, tiny
from harness.errors import ConfigError

log = logging.getLogger(__name__)

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def from_pretrained(path: str | Path, *, dtype: str = "float32", device: str = "cpu",
                    trust_remote_code: bool = False, attn_implementation: str | None = None,
                    revision: str | None = None):
    """Load a causal LM and its tokenizer. Weights come from safetensors only (no pickle)."""
    transformers_logging.disable_progress_bar()  # a bar per load buries the attack's own progress
    kwargs = {"use_safetensors": True, "trust_remote_code": trust_remote_code, "dtype": DTYPES[dtype],
              "revision": revision}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs).to(resolve_device(device))
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code, revision=revision)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def check_model_path(path, *, key: str = "model.path", revision: str | None = None,
                     trust_remote_code: bool = False) -> None:
    """Stop before any work, in one line naming `key`, unless `path` is a local folder of safetensors
    weights or a hub id in reach (the local Hugging Face cache, or the hub itself)."""
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{key}={path!r}: allowed a hub id (owner/name) or a local model folder")
    local = os.path.expanduser(path)
    if os.path.isdir(local):
        if not any(Path(local).glob("*.safetensors")):
            raise ConfigError(f"{key}={path!r}: no *.safetensors in that folder; allowed a folder saved with "
                              "save_pretrained(safe_serialization=True) (pickled weights are not loaded)")
        return
    if path.startswith((".", "/", "~")):
        raise ConfigError(f"{key}={path!r}: no such folder; allowed a local model folder or a hub id")
    try:
        AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - offline, gated, or missing all read the same to the user
        raise ConfigError(f"{key}={path!r}: not in the local Hugging Face cache and not reachable "
                          f"({type(e).__name__}); allowed a local folder, or download it where the hub is "
                          f"reachable (`hf download {path}`)") from None


def local_folder(path, key: str, patterns: list[str], revision: str | None = None) -> Path:
    """`path` as a local folder: itself, or the snapshot of a hub id (owner/name) holding only the files that
    match `patterns`, from the local Hugging Face cache (offline) or downloaded into it; else one ConfigError
    line naming `key`. The patterns keep a hub repository's pickles, variants and checkpoints out."""
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{key}={path!r}: allowed a local folder or a hub id (owner/name)")
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise ConfigError(f"{key}={path!r}: no such folder; allowed a local folder or a hub id (owner/name)")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(path, revision=revision, allow_patterns=list(patterns)))
    except Exception as e:  # noqa: BLE001 - offline, gated, or missing all read the same to the user
        raise ConfigError(f"{key}={path!r}: not in the local Hugging Face cache and not reachable "
                          f"({type(e).__name__}); allowed a local folder, or download it where the hub is "
                          f"reachable (`hf download {path}`)") from None


def tiny_spec(cfg) -> tiny.TinySpec:
    spec = dict(cfg.spec)
    spec["exclude_splits"] = tuple(spec.get("exclude_splits") or ())
    return tiny.TinySpec(**spec)


def load_model(cfg, data_cfg, data, cache_dir: Path, attn_implementation: str | None = None,
               device: str | None = None):
    """(model, tokenizer) for `cfg.model` (on `device`, default `cfg.device`); builds and caches the tiny
    model on first use."""
    if cfg.source == "tiny":
        if data_cfg.name != "synthetic":
            raise ConfigError(f"model=tiny with data={data_cfg.name}: the tiny model only knows the "
                              "synthetic world; use data=synthetic or a real model")
        world = synthetic.WorldConfig(**data_cfg.world)
        path = tiny.ensure_tiny(world, tiny_spec(cfg), data.root, cache_dir)
    else:
        check_model_path(cfg.path, trust_remote_code=cfg.trust_remote_code)
        path = cfg.path
    return from_pretrained(path, dtype=cfg.dtype, device=device or cfg.device, trust_remote_code=cfg.trust_remote_code,
                           attn_implementation=attn_implementation)
