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


def check_hub_model(cfg) -> None:
    """Stop before any work if a hub model is neither a local folder nor reachable."""
    path = cfg.path
    if os.path.isdir(path):
        return
    if path.startswith((".", "/", "~")):
        raise ConfigError(f"model.path={path!r}: no such folder. Point it at a local model folder "
                          "(saved with save_pretrained, safetensors weights).")
    try:
        AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - offline, gated, or missing all read the same to the user
        raise ConfigError(f"model.path={path!r}: not in the local Hugging Face cache and not reachable "
                          f"({type(e).__name__}). Download it where the hub is reachable "
                          f"(`hf download {path}`) or set model.path=<local folder>.") from None


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
        check_hub_model(cfg)
        path = cfg.path
    return from_pretrained(path, dtype=cfg.dtype, device=device or cfg.device, trust_remote_code=cfg.trust_remote_code,
                           attn_implementation=attn_implementation)
