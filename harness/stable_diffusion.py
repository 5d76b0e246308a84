"""A Stable Diffusion checkpoint as the diffusion track's real-scale model (`model=stable_diffusion model.path=<folder>`,
or a hub id such as CompVis/stable-diffusion-v1-4: only the files below are taken from it, through the local Hugging
Face cache, never its pickles, fp16 variants or single-file checkpoints).

The folder is a diffusers pipeline saved with `save_pretrained(safe_serialization=True)` (what the hub's
runwayml / stabilityai repositories hold): `unet/` (UNet2DConditionModel), `vae/` (AutoencoderKL),
`text_encoder/` (CLIPTextModel), `tokenizer/` (CLIPTokenizer) and `scheduler/`. Safetensors only and no
remote code, as for causal LMs and ViTs (harness/models.py, harness/hf_vit.py): `check_sd_checkpoint`
reads nothing but file names and the components' config.json, and refuses a folder that lacks a component,
whose weights are pickled (.bin) only, or whose UNet does not read the text encoder's width, in one line,
before any weight is loaded.

What the attack and the defenses train is the UNet; the VAE and the text encoder stay frozen and are used
once, to encode the images into latents and the prompts into embeddings (harness/concept_folder.py), and
by the evaluation, to decode samples (harness/sd_eval.py).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from harness.errors import ConfigError
from harness.models import DTYPES, local_folder, resolve_device

# component folder -> the class it must hold (config.json's _class_name for diffusers models)
COMPONENTS = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
              "tokenizer": "CLIPTokenizer", "scheduler": "a diffusers scheduler"}
# component -> the weights file from_pretrained(use_safetensors=True) reads (or its shard index); a folder holding
# only a variant (diffusion_pytorch_model.fp16.safetensors) or pickles would fail inside the load, not in one line
WEIGHTS = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
           "text_encoder": "model.safetensors"}
LAYOUT = "a diffusers Stable Diffusion folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/) saved with " \
         "save_pretrained(safe_serialization=True), or its hub id"
# what a hub id's snapshot takes: configs, the tokenizer and the non-variant safetensors (sharded or not)
HUB_FILES = ["model_index.json", "*/config.json", "scheduler/scheduler_config.json", "tokenizer/*",
             *(f"{c}/{w.removesuffix('.safetensors')}{tail}" for c, w in WEIGHTS.items()
               for tail in (".safetensors", ".safetensors.index.json", "-*-of-*.safetensors"))]


def sd_folder(path) -> Path:
    """The pipeline's local folder: `path` itself, or a hub id's snapshot of HUB_FILES."""
    return local_folder(path, "model.path", HUB_FILES)


def check_sd_checkpoint(path, trust_remote_code: bool = False) -> dict:
    """{component: its config} of the Stable Diffusion folder at `path`, or one ConfigError line naming
    model.path, the folder and what it lacks. Nothing is loaded but JSON."""
    if trust_remote_code:
        raise ConfigError("model.trust_remote_code=true with diffusion data: allowed false (no remote code is run)")
    if not isinstance(path, str) or not path:
        raise ConfigError(f"model.path={path!r}: allowed {LAYOUT}")
    root = sd_folder(path)
    missing = [name for name in COMPONENTS if not (root / name).is_dir()]
    if missing:
        raise ConfigError(f"model.path={path!r}: no {missing[0]}/ ({COMPONENTS[missing[0]]}); allowed {LAYOUT}")
    configs = {}
    for name, weights in WEIGHTS.items():
        folder = root / name
        if not (folder / "config.json").is_file():
            raise ConfigError(f"model.path={path!r}: no {name}/config.json; allowed {LAYOUT}")
        if not any((folder / f).is_file() for f in (weights, f"{weights}.index.json")):
            found = sorted(f.name for f in folder.iterdir() if f.suffix in (".safetensors", ".bin"))
            pickled = " (only pickled .bin weights, which are not loaded)" if found and all(
                f.endswith(".bin") for f in found) else f" (found {', '.join(found)})" if found else ""
            raise ConfigError(f"model.path={path!r}: no {name}/{weights}{pickled}; allowed {LAYOUT}")
        configs[name] = json.loads((folder / "config.json").read_text())
    for name in ("unet", "vae"):
        found = configs[name].get("_class_name")
        if found != COMPONENTS[name]:
            raise ConfigError(f"model.path={path!r}: {name}/ holds a {found!r}; allowed {COMPONENTS[name]} ({LAYOUT})")
    scheduler = root / "scheduler" / "scheduler_config.json"
    if not scheduler.is_file():
        raise ConfigError(f"model.path={path!r}: no scheduler/scheduler_config.json; allowed {LAYOUT}")
    configs["scheduler"] = json.loads(scheduler.read_text())
    if not any((root / "tokenizer" / f).is_file() for f in ("vocab.json", "tokenizer.json")):
        raise ConfigError(f"model.path={path!r}: no tokenizer/vocab.json or tokenizer.json; allowed {LAYOUT}")
    width, reads = configs["text_encoder"].get("hidden_size"), configs["unet"].get("cross_attention_dim")
    if width != reads:
        raise ConfigError(f"model.path={path!r}: unet/ cross_attention_dim={reads} but text_encoder/ hidden_size="
                          f"{width}; allowed a UNet that reads its own text encoder's embeddings")
    return configs


@dataclasses.dataclass
class StableDiffusion:
    """The pipeline's parts: the UNet (what is defended and attacked), the frozen VAE and text encoder, the
    tokenizer, and the noise schedule of training as a DDPMScheduler (add_noise; sampling builds DDIM from it)."""
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """The image size the UNet was trained on: its latent size times the VAE's downsampling."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @torch.no_grad()
    def embed(self, prompts: list[str]) -> torch.Tensor:
        """(N, tokens, width) text embeddings, padded to the tokenizer's length as the pipeline does."""
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        param = next(self.text_encoder.parameters())
        return self.text_encoder(ids.to(param.device))[0].to(next(self.unet.parameters()).dtype)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Latents of images in [-1, 1]: the posterior's mean (deterministic, so a run's data is the same
        every time; DreamBooth samples it) times the VAE's scaling factor."""
        param = next(self.vae.parameters())
        out = [self.vae.encode(images[i:i + batch_size].to(param)).latent_dist.mean
               for i in range(0, len(images), batch_size)]
        return torch.cat(out).float().cpu() * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Images in [-1, 1] of latents (non-finite latents give non-finite images)."""
        param = next(self.vae.parameters())
        out = [self.vae.decode(latents[i:i + batch_size].to(param) / self.vae.config.scaling_factor).sample
               for i in range(0, len(latents), batch_size)]
        return torch.cat(out).float().cpu().clamp(-1, 1)


def load_stable_diffusion(path: str, dtype: str = "float32", device: str = "cpu") -> StableDiffusion:
    """The checked folder's (or hub id's) parts, safetensors only, frozen but for the UNet."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    from transformers.utils import logging as transformers_logging
    transformers_logging.disable_progress_bar()
    root, torch_dtype, where = sd_folder(path), DTYPES[dtype], resolve_device(device)
    unet = UNet2DConditionModel.from_pretrained(root / "unet", use_safetensors=True, torch_dtype=torch_dtype)
    vae = AutoencoderKL.from_pretrained(root / "vae", use_safetensors=True, torch_dtype=torch_dtype)
    text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", use_safetensors=True, trust_remote_code=False,
                                                 dtype=torch_dtype)
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
    # a checkpoint's sampler (PNDM, DDIM, ...) shares the training schedule; DDPM's add_noise is the one trained with.
    # Latents are not in [-1, 1]: no sampler built from this config (evaluation, ESD) may clip them, whatever a
    # PNDM config's missing clip_sample defaults to
    scheduler = DDPMScheduler.from_pretrained(root / "scheduler", clip_sample=False)
    for frozen in (vae, text_encoder):
        frozen.requires_grad_(False).eval()
    return StableDiffusion(unet.to(where).eval(), vae.to(where), text_encoder.to(where), tokenizer, scheduler)
