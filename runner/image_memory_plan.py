"""The memory plan of the image tracks: per-stage bytes of a ViT or UNet run from its config, nothing loaded but
config files (`python run.py experiment=vision plan=true`, `scale=diffusion_paper ... plan=true`).

The model is built on the meta device from its config: the tiny ViT's or UNet's spec, a ViT folder's
config.json, a Stable Diffusion folder's unet/config.json. Weights, gradients and optimizer state are counted
as the language plan counts them (harness/memory.py: P·b, T·b, k·T·b with the optimizer's own k). Activations
have no formula here: the attack's loss runs once on the meta device at the attack's batch, and every tensor
autograd saves for backward is counted once (torch.autograd.graph.saved_tensors_hooks). Attention is counted as
the fused kernels of a GPU or CPU keep it (q, k, v, the output and its log-sum-exp), not as the meta device's
math fallback, which would keep every score matrix. What else stays on the device is counted apart: the frozen
VAE and text encoder of Stable Diffusion, the tiny UNet's classifier.

Defenses: SpecDef's compensation layers (out² parameters and their saved inputs per defended layer) are counted
in the attack and the evaluation; a defense's own training has no estimate on these tracks yet and says so.
The image tracks run in one process (dist=none). The plan is printed, not enforced: `plan=true` only.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from harness.errors import ConfigError
from harness.memory import DTYPE_BYTES, Stage, no_estimate
from harness.models import local_folder
from runner.memory_plan import Plan, _device_label, _device_memory


@dataclasses.dataclass
class ImagePlan(Plan):
    def needs(self) -> str:
        return f"it needs {self.per_rank / 2 ** 30:.2f} GiB of one device (the image tracks run in one process)"


@dataclasses.dataclass
class Built:
    """The model on the meta device, one batch of its inputs and its loss, what else the run keeps on the device."""
    model: torch.nn.Module
    inputs: callable        # batch size -> the model's keyword arguments (meta tensors)
    loss: callable          # (model, inputs) -> a scalar
    frozen_params: int      # parameters of the frozen parts (VAE, text encoder, classifier)


def plan(cfg) -> ImagePlan:
    built = build(cfg)
    dtype_bytes = DTYPE_BYTES[cfg.model.dtype]
    defended = specdef_layers(cfg.defense, built.model)
    extra = sum(m.out_features ** 2 for m in defended.values())
    stages = [dataclasses.replace(s, name=f"defense: {s.name}") for s in defense_stages(cfg.defense)]
    stages.append(attack_stage(cfg.attack, built, defended, extra, dtype_bytes))
    stages.append(evaluation_stage(cfg, built, extra, dtype_bytes))
    label = _device_label(cfg)
    return ImagePlan(1, False, _device_memory(cfg, label), label, stages, shardable=False)


def defense_stages(defense) -> list[Stage]:
    """SpecDef trains nothing itself; every other defense (or SpecDef's base) has no estimate on these tracks."""
    target = str(defense.get("_target_") or "")
    if target.endswith("NoDefense") or not target:
        return []
    if target.startswith("specdef."):
        base = defense.get("base")
        return [Stage(f"specdef over {base}: no memory estimate on the image tracks", {})] if base else []
    return [no_estimate(defense)]


def specdef_layers(defense, model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The Linear layers SpecDef's patterns match (each gets an out x out compensation); none for other defenses."""
    if not str(defense.get("_target_") or "").startswith("specdef.") or defense.get("layers") is None:
        return {}
    from specdef.core import match_layers
    names = match_layers(model, list(defense.layers))
    return {n: model.get_submodule(n) for n in names}


def attack_stage(attack, built: Built, defended: dict, extra: int, dtype_bytes: int) -> Stage:
    from attacks.optimizers import config_needs_double_backward, forward_only, muon_split, optimizer_counts
    undo = bool(attack.get("undo"))
    peft, optimizer = attack.get("peft"), attack.optimizer
    params, trained, states = optimizer_counts(
        attack, sum(p.numel() for p in built.model.parameters()) + (0 if undo else extra),
        lambda: sum(p.numel() for p in muon_split(built.model)[0]),
        lambda: lora_params(built.model, list(peft.target_modules), int(peft.r)))
    if forward_only(optimizer):  # no graph: a forward pass's largest outputs only
        gradients, activations = 0, forward_peak(built, attack.batch_size)
    else:
        gradients = trained * dtype_bytes
        activations = saved_activations(built, attack.batch_size, [] if undo else list(defended.values()))
        activations *= 2 if config_needs_double_backward(attack) else 1  # the gradients keep their graph
    name = f"attack: {attack.name}{' + lora' if peft is not None and not attack.name.endswith('lora') else ''}"
    return Stage(name, {"weights": params * dtype_bytes, "gradients": gradients, "optimizer": states * dtype_bytes,
                        "activations": activations, "frozen parts": built.frozen_params * dtype_bytes})


def evaluation_stage(cfg, built: Built, extra: int, dtype_bytes: int) -> Stage:
    params = sum(p.numel() for p in built.model.parameters()) + extra
    return Stage("evaluation", {"weights": params * dtype_bytes, "activations": forward_peak(built, eval_batch(cfg)),
                                "frozen parts": built.frozen_params * dtype_bytes})


def eval_batch(cfg) -> int:
    """Inputs of the evaluation's largest forward pass: a vision batch, or the sampled images with their
    unconditional twins (classifier-free guidance)."""
    e = cfg.eval
    if e.get("batch_size") is not None:
        return int(e.batch_size)
    if e.get("samples_per_prompt") is not None:
        return 2 * int(e.samples_per_prompt)
    from harness.tiny_vit import world_from_dict
    classes = len(world_from_dict(OmegaConf.to_container(cfg.data.world, resolve=True)).classes)
    return min(256, 2 * int(e.samples_per_class) * classes)


def lora_params(model: torch.nn.Module, targets: list[str], r: int) -> int:
    """r·(in + out) of every Linear whose name is a target or ends with `.target` (peft's matching)."""
    return sum(r * (m.in_features + m.out_features) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and any(n == t or n.endswith(f".{t}") for t in targets))


# ---------------------------------------------------------------------------------------------
# Counting on the meta device
# ---------------------------------------------------------------------------------------------

class FusedAttention(torch.autograd.Function):
    """scaled_dot_product_attention as a fused kernel keeps it for backward: q, k, v, the output, the log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1]))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fused_sdpa(q, k, v, *args, **kwargs):
    return FusedAttention.apply(q, k, v)


def saved_activations(built: Built, batch: int, defended: list) -> int:
    """Bytes autograd saves for backward over one forward of the attack's loss (each tensor, or its base, once),
    plus the inputs SpecDef's compensations would save (the defended layers' outputs)."""
    saved: dict[int, torch.Tensor] = {}

    def pack(t):
        base = t._base if t._base is not None else t
        saved[id(base)] = base  # kept alive, so an id is never reused within the pass
        return t

    compensation = []
    handles = [m.register_forward_hook(lambda _m, _i, out: compensation.append(out.numel() * out.element_size()))
               for m in defended]
    sdpa = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_sdpa
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            built.loss(built.model, built.inputs(batch))
    finally:
        F.scaled_dot_product_attention = sdpa
        for h in handles:
            h.remove()
    return sum(t.numel() * t.element_size() for t in saved.values()) + sum(compensation)


def forward_peak(built: Built, batch: int) -> int:
    """A forward pass without a graph: about its two largest outputs alive at once."""
    sizes = []
    handles = [m.register_forward_hook(lambda _m, _i, out: sizes.append(_nbytes(out))) for m in built.model.modules()]
    try:
        with torch.no_grad():
            built.loss(built.model, built.inputs(batch))
    finally:
        for h in handles:
            h.remove()
    return 2 * max(sizes, default=0)


def _nbytes(out) -> int:
    """Bytes of a module's output: a tensor, a tuple's first, or a model output's `sample` / `logits`."""
    if isinstance(out, tuple):
        out = out[0] if out else None
    for key in ("sample", "logits"):
        if not isinstance(out, torch.Tensor) and isinstance(getattr(out, key, None), torch.Tensor):
            out = getattr(out, key)
    return out.numel() * out.element_size() if isinstance(out, torch.Tensor) else 0


# ---------------------------------------------------------------------------------------------
# The models from their configs
# ---------------------------------------------------------------------------------------------

def build(cfg) -> Built:
    source = cfg.model.source
    dtype = getattr(torch, cfg.model.dtype)
    with torch.device("meta"):
        if source in ("tiny_vit", "hf_vit"):
            model = _cast(vit_model(cfg), dtype)
            size = model.config.image_size
            return Built(model, lambda b: {"pixel_values": torch.empty(b, 3, size, size, dtype=dtype, device="meta")},
                         _classification_loss, 0)
        if source == "tiny_unet":
            return tiny_unet_built(cfg, dtype)
        if source == "stable_diffusion":
            return sd_built(cfg, dtype)
    raise ValueError(f"model.source={source!r}: no image memory plan")


def _cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    return model if dtype == torch.float32 else model.to(dtype)  # diffusers warns on every cast, a no-op one too


def vit_model(cfg):
    from transformers import AutoConfig, ViTForImageClassification
    if cfg.model.source == "tiny_vit":
        from harness.tiny_vit import model_config, spec_from_dict, world_from_dict
        world = world_from_dict(OmegaConf.to_container(cfg.data.world, resolve=True))
        return ViTForImageClassification(model_config(spec_from_dict(OmegaConf.to_container(cfg.model.spec)), world))
    return ViTForImageClassification(AutoConfig.from_pretrained(str(config_folder(cfg.model.path, ["config.json"]))))


def _classification_loss(model, inputs):
    logits = model(**inputs).logits
    return F.cross_entropy(logits.float(), torch.zeros(len(logits), dtype=torch.long, device=logits.device))


def _denoising_loss(model, inputs):
    return model(**inputs).sample.float().pow(2).mean()


def tiny_unet_built(cfg, dtype) -> Built:
    from diffusers import UNet2DModel
    from transformers import ViTForImageClassification
    from harness.tiny_unet import spec_from_dict, unet_config
    from harness.tiny_vit import model_config, spec_from_dict as vit_spec, world_from_dict
    world = world_from_dict(OmegaConf.to_container(cfg.data.world, resolve=True))
    model = _cast(UNet2DModel(**unet_config(spec_from_dict(OmegaConf.to_container(cfg.model.spec)), world)), dtype)
    classifier = ViTForImageClassification(model_config(vit_spec(OmegaConf.to_container(cfg.eval.classifier)), world))
    size = model.config.sample_size

    def inputs(b):
        return {"sample": torch.empty(b, model.config.in_channels, size, size, dtype=dtype, device="meta"),
                "timestep": torch.zeros(b, dtype=torch.long, device="meta"),
                "class_labels": torch.zeros(b, dtype=torch.long, device="meta")}
    return Built(model, inputs, _denoising_loss, sum(p.numel() for p in classifier.parameters()))


def sd_built(cfg, dtype) -> Built:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    root = config_folder(cfg.model.path, [f"{c}/config.json" for c in ("unet", "vae", "text_encoder")])
    unet = _cast(UNet2DConditionModel.from_config(json.loads((root / "unet" / "config.json").read_text())), dtype)
    vae = AutoencoderKL.from_config(json.loads((root / "vae" / "config.json").read_text()))
    text = CLIPTextModel(CLIPTextConfig.from_pretrained(str(root / "text_encoder")))
    tokens = _tokenizer_length(root)
    size, width = unet.config.sample_size, unet.config.cross_attention_dim

    def inputs(b):
        return {"sample": torch.empty(b, unet.config.in_channels, size, size, dtype=dtype, device="meta"),
                "timestep": torch.zeros(b, dtype=torch.long, device="meta"),
                "encoder_hidden_states": torch.empty(b, tokens, width, dtype=dtype, device="meta")}
    frozen = sum(p.numel() for m in (vae, text) for p in m.parameters())
    return Built(unet, inputs, _denoising_loss, frozen)


def config_folder(path, configs: list[str]) -> Path:
    """The local folder (or a hub id's snapshot of its config files) holding `configs`, or one ConfigError line."""
    root = local_folder(path, "model.path", [*configs, "tokenizer/tokenizer_config.json"])
    missing = [c for c in configs if not (root / c).is_file()]
    if missing:
        raise ConfigError(f"model.path={path!r}: no {missing[0]}; allowed a model folder or hub id with its config "
                          "files (the plan reads nothing else)")
    return root


def _tokenizer_length(root: Path) -> int:
    config = root / "tokenizer" / "tokenizer_config.json"
    length = json.loads(config.read_text()).get("model_max_length") if config.is_file() else None
    return int(length) if isinstance(length, int) and length < 10_000 else 77
