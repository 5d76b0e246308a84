"""Release format of a defended model: Hugging Face safetensors + a SpecDef manifest.

`save_defended` writes
- `model.safetensors` (`save_pretrained`): every weight under its name in the defended model, so the
  amplified layers sit under `<layer>.inner.` (a plain `from_pretrained` of the folder misses them,
  loudly, instead of silently running W' without its compensation);
- `specdef.safetensors`: the compensation matrices `<layer>.comp.weight`;
- the tokenizer, and `manifest.json` with the defended layers (name, shapes, bias, α, k, method),
  the dtype, the k policy with the layers it clipped or skipped, and the sha256 of every file.
`load_defended` checks the checksums, loads the model through `from_pretrained` itself (renaming
`<layer>.inner.` back to `<layer>.`), so weight conversions, tied weights and non-persistent buffers
come out as from any `from_pretrained`, then wraps each listed layer with its compensation. No
pickle anywhere; the round trip is bit-exact.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from harness.errors import ConfigError
from harness.models import DTYPES
from harness.manifest import verify_manifest, write_manifest
from specdef.core import set_module, specdef_modules
from specdef.modules import output_weights, wrap

FORMAT = "specdef-release"
FORMAT_VERSION = 2
COMP_FILE = "specdef.safetensors"
# what a SpecDef run record adds to the manifest (k requested, and which layers it did not get)
RECORD_KEYS = ("k", "k_policy", "layers_clipped", "layers_skipped", "blocks_without_defended_layer")


def _inner_shape(module: nn.Module) -> list[int]:
    # (out, in) of a Linear or Conv1D, (E, out, in) of experts
    weight, _ = output_weights(module)
    return list(weight.shape[1:]) if weight.shape[0] == 1 else list(weight.shape)


def layer_entries(model: nn.Module) -> list[dict]:
    return [{"name": name, "inner_shape": _inner_shape(m.inner), "bias": output_weights(m.inner)[1] is not None,
             "comp_shape": list(m.comp.weight.shape), "alpha": m.alpha, "k": m.k, "method": m.method}
            for name, m in specdef_modules(model)]


def manifest_record(info: dict) -> dict:
    """The part of a SpecDef run record (`SpecDef.info`) that the manifest keeps."""
    return {key: info[key] for key in RECORD_KEYS if key in info}


def save_defended(model: nn.Module, tokenizer, directory: str | Path, record: dict | None = None) -> Path:
    """Write the defended model, its tokenizer and the manifest into `directory` (created).
    `record`: extra manifest fields (`manifest_record(SpecDef.info)`: k policy, clipped and skipped layers)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    comps = {f"{name}.comp.weight" for name, _ in specdef_modules(model)}
    state = model.state_dict()
    # transformers >= 5 always writes safetensors. save_original_format=False keeps the keys of
    # model.state_dict(): the legacy renaming (e.g. GPT-NeoX lm_head -> embed_out, Mixtral's fused
    # experts -> one tensor per expert) knows nothing of the SpecDef modules.
    model.save_pretrained(directory, state_dict={k: v for k, v in state.items() if k not in comps},
                          save_original_format=False)
    if comps:
        save_file({k: state[k].contiguous() for k in sorted(comps)}, str(directory / COMP_FILE))
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    write_manifest(directory, {"format": FORMAT, "format_version": FORMAT_VERSION, "dtype": dtype,
                               "layers": layer_entries(model), **(record or {})})
    return directory


def read_manifest(directory: Path) -> dict:
    problem = verify_manifest(directory)
    if problem is not None:
        raise ConfigError(f"release={str(directory)!r}: {problem}; allowed a folder written by "
                          "specdef.release.save_defended, unmodified")
    manifest = json.loads((directory / "manifest.json").read_text())
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"release={str(directory)!r}: manifest format {manifest.get('format')!r} version "
                          f"{manifest.get('format_version')!r}; allowed {FORMAT!r} version {FORMAT_VERSION} "
                          "(re-run the defense to rewrite older releases)")
    return manifest


def _check_loading(directory: Path, info: dict, comps: set[str]) -> None:
    unexpected = sorted(set(info.get("unexpected_keys", ())) - comps)
    missing = sorted(info.get("missing_keys", ()))
    problems = [f"{what} {keys[:3]}" for what, keys in (("weights without a place", unexpected),
                                                       ("no saved weights for", missing)) if keys]
    if problems:
        raise ConfigError(f"release={str(directory)!r}: {'; '.join(problems)}; allowed a complete release whose "
                          "manifest lists every SpecDef layer")


def _insert(model: nn.Module, entry: dict, comp_weight: torch.Tensor, directory: Path) -> None:
    inner = model.get_submodule(entry["name"])
    weight, _ = output_weights(inner)
    shape = _inner_shape(inner)
    if shape != entry["inner_shape"] or list(comp_weight.shape) != entry["comp_shape"]:
        raise ConfigError(f"release={str(directory)!r}: layer {entry['name']} has shape {shape} and compensation "
                          f"{list(comp_weight.shape)}; the manifest says {entry['inner_shape']} and "
                          f"{entry['comp_shape']}")
    comp = nn.Linear(comp_weight.shape[1], comp_weight.shape[0], bias=False, device="meta")
    # trainable like the layer it compensates (output_weights gives a detached view: never use its flag)
    comp.weight = nn.Parameter(comp_weight.to(weight.device),
                               requires_grad=any(p.requires_grad for p in inner.parameters()))
    set_module(model, entry["name"], wrap(inner, comp, entry["alpha"], entry["k"], entry["method"]))


@torch.no_grad()
def _own_aligned_memory(model: nn.Module) -> None:
    """Copy tensors that sit at an unaligned offset of the memory-mapped file into their own memory.

    Safetensors places tensors back to back after a header of any length, so their alignment
    depends on the key names; CPU matmul kernels round differently on unaligned operands (measured:
    a float64 PhiMoE release differed by 1.6e-14 in the logits), so a release would not be bit-exact.
    """
    for module in model.modules():
        for tensor in [*module._parameters.values(), *module._buffers.values()]:
            if tensor is not None and tensor.device.type == "cpu" and tensor.data_ptr() % 64:
                tensor.data = tensor.data.clone()


def load_defended(directory: str | Path, **from_pretrained_kwargs):
    """(model, tokenizer) of a release written by `save_defended`; logits equal the saved model's.

    Extra keyword arguments go to `from_pretrained` (e.g. attn_implementation, experts_implementation,
    device_map); weights load from safetensors only and remote code stays off.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    names = [entry["name"] for entry in manifest["layers"]]
    comps = {f"{name}.comp.weight" for name in names}
    model, info = AutoModelForCausalLM.from_pretrained(
        directory, dtype=DTYPES[manifest["dtype"]], use_safetensors=True, trust_remote_code=False,
        key_mapping={rf"^{re.escape(name)}\.inner\.": f"{name}." for name in names},
        output_loading_info=True, **from_pretrained_kwargs)
    _check_loading(directory, info, comps)
    _own_aligned_memory(model)
    if names:
        with safe_open(str(directory / COMP_FILE), framework="pt") as f:
            for entry in manifest["layers"]:
                _insert(model, entry, f.get_tensor(f"{entry['name']}.comp.weight"), directory)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(directory) if (directory / "tokenizer_config.json").is_file() else None
    return model, tokenizer


# A defended model that is not a Hugging Face causal LM (the image tracks' ViT and UNets): its whole state dict
# in one safetensors file, rebuilt onto a fresh copy of the undefended model, which supplies the architecture.
STATE_FILE = "defended.safetensors"


def save_defended_state(model: nn.Module, directory: str | Path, record: dict | None = None) -> Path:
    """Write `model`'s state dict and a manifest of its SpecDef layers (none for a baseline) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(directory / STATE_FILE))
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    write_manifest(directory, {"format": FORMAT, "format_version": FORMAT_VERSION, "dtype": dtype,
                               "layers": layer_entries(model), **(record or {})})
    return directory


def load_defended_state(model: nn.Module, directory: str | Path) -> nn.Module:
    """`model` (the undefended one the defense started from) turned into the saved defended model: each SpecDef
    layer of the manifest wrapped with its compensation, then every tensor loaded, strictly; bit-exact."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    with safe_open(str(directory / STATE_FILE), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    for entry in manifest["layers"]:
        _insert(model, entry, state[f"{entry['name']}.comp.weight"], directory)
    problems = model.load_state_dict(state, strict=False)
    _check_loading(directory, problems._asdict(), set())
    return model.eval()
