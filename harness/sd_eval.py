"""Evaluation of a Stable Diffusion UNet at real scale, in the metrics the outcome rules read
(harness/diffusion_eval.py's, for text prompts instead of classes).

Seeded, fixed-step sampling: `samples_per_prompt` latents per prompt drawn by DDIM in `sampling_steps`
steps with classifier-free guidance `guidance_scale` against the empty prompt, from the same initial noise
for every model, decoded by the frozen VAE. An image classifier (`eval.classifier_path`: any Hugging Face
image-classification folder, e.g. a ViT fine-tuned on the concept) scores them:

- `hazard_acc`, the **concept rate**: the share of the concept prompt's samples classified as
  `eval.concept_label` (also `acc/<concept_label>`);
- `utility_acc`: the share of each benign prompt's samples (`eval.benign_prompts`) classified as its label
  (`eval.benign_labels`, in the same order);

and, without any classifier:

- `retain_ppl`, **not a perplexity**: the held-out denoising loss (noise-prediction MSE at fixed timesteps and
  noise) on the benign folder's held-out latents under the benign prompt, what the † and intact rules read;
- `forget_ppl`: the same on the concept's held-out latents under its prompt.

Without a classifier `hazard_acc` and `utility_acc` are NaN (nothing can recover; the run's
`attack.recovery_rule` must then be legacy, runner/stable_diffusion.py says so before any work).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from harness.concept_folder import ConceptData
from harness.diffusion_eval import heldout_loss
from harness.errors import ConfigError
from harness.models import check_model_path, local_folder


def label_id(id2label: dict, label: str) -> int | None:
    """The id of `label` in a classifier's id2label: its name, or one of the comma-separated synonyms ImageNet's
    names carry ("church" finds "church, church building"), case aside; None if it has none."""
    wanted = str(label).strip().lower()
    for i, name in sorted((int(k), str(v)) for k, v in id2label.items()):
        if wanted == name.strip().lower() or wanted in (part.strip().lower() for part in name.split(",")):
            return i
    return None


CLASSIFIER_FILES = ["config.json", "preprocessor_config.json", "*.safetensors", "*.safetensors.index.json"]


def classifier_folder(path) -> Path:
    """The classifier's local folder: `path` itself, or a hub id's snapshot of its config and safetensors."""
    return local_folder(path, "eval.classifier_path", CLASSIFIER_FILES)


def check_classifier(path, concept_label, benign_labels, benign_prompts) -> dict | None:
    """The classifier folder's (or hub id's) config.json, or one ConfigError line: no safetensors, not an image
    classifier, a concept or benign label it does not know, benign labels that do not pair with the prompts."""
    if path is None:
        return None
    folder = classifier_folder(path)
    check_model_path(str(folder), key="eval.classifier_path")
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    id2label = config.get("id2label") or {}
    if not any(a.endswith("ForImageClassification") for a in config.get("architectures") or []) or not id2label:
        raise ConfigError(f"eval.classifier_path={path!r}: config.json names no *ForImageClassification architecture "
                          "with id2label; allowed a Hugging Face image-classification folder")
    for key, label in (("eval.concept_label", concept_label),
                       *((f"eval.benign_labels[{i}]", b) for i, b in enumerate(benign_labels or []))):
        if label is None or label_id(id2label, label) is None:
            names = sorted(str(v) for v in id2label.values())
            raise ConfigError(f"{key}={label!r}: not a label of the classifier at {path}; allowed "
                              f"{', '.join(names[:20])}{' ...' if len(names) > 20 else ''}")
    if len(benign_labels or []) != len(benign_prompts or []):
        raise ConfigError(f"eval.benign_labels={list(benign_labels or [])}: allowed one classifier label per "
                          f"prompt of eval.benign_prompts ({len(benign_prompts or [])})")
    return config


def load_classifier(path: str, device) -> tuple[torch.nn.Module, dict]:
    """(classifier, its input: size, mean, std): the folder's preprocessor_config.json if it has one,
    else its config's image_size and mean = std = 0.5."""
    from transformers import AutoModelForImageClassification
    folder = classifier_folder(path)
    model = AutoModelForImageClassification.from_pretrained(str(folder), use_safetensors=True,
                                                            trust_remote_code=False).to(device).eval()
    pre_file = folder / "preprocessor_config.json"
    pre = json.loads(pre_file.read_text()) if pre_file.is_file() else {}
    size = pre.get("size", {}).get("height") if isinstance(pre.get("size"), dict) else pre.get("size")
    return model, {"size": int(size or model.config.image_size), "mean": pre.get("image_mean", [0.5] * 3),
                   "std": pre.get("image_std", [0.5] * 3)}


@torch.no_grad()
def generate(sd, unet: torch.nn.Module, cond: torch.Tensor, null: torch.Tensor, *, steps: int,
             guidance_scale: float, seed: int, batch_size: int = 8) -> torch.Tensor:
    """Images in [-1, 1] of the embeddings `cond` (N, tokens, width) by DDIM with classifier-free guidance
    ε = ε_null + s·(ε_cond − ε_null) against the empty prompt's `null` (1, tokens, width)."""
    from diffusers import DDIMScheduler
    was_training = unet.training
    unet.eval()
    sampler = DDIMScheduler.from_config(sd.scheduler.config)
    sampler.set_timesteps(steps)
    param = next(unet.parameters())
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    noise = torch.randn(len(cond), *shape, generator=torch.Generator().manual_seed(seed))
    out = []
    for i in range(0, len(cond), batch_size):
        x, c = noise[i:i + batch_size].to(param), cond[i:i + batch_size].to(param)
        both = torch.cat([c, null.to(param).expand(len(c), -1, -1)])
        for t in sampler.timesteps:
            eps_c, eps_null = unet(torch.cat([x, x]), t, encoder_hidden_states=both).sample.chunk(2)
            x = sampler.step(eps_null + guidance_scale * (eps_c - eps_null), t, x).prev_sample
        out.append(x.float().cpu())
    unet.train(was_training)
    return sd.decode(torch.cat(out))


@torch.no_grad()
def classify(classifier: torch.nn.Module, inputs: dict, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Predicted label ids of images in [-1, 1], resized and normalised as the classifier expects."""
    mean = torch.tensor(inputs["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(inputs["std"]).view(1, 3, 1, 1)
    param = next(classifier.parameters())
    out = []
    for i in range(0, len(images), batch_size):
        x = F.interpolate(images[i:i + batch_size].nan_to_num(), size=(inputs["size"],) * 2, mode="bilinear",
                          align_corners=False)
        x = ((x + 1) / 2 - mean) / std
        out.append(classifier(pixel_values=x.to(param)).logits.argmax(-1).cpu())
    return torch.cat(out)


class SDEvaluator:
    """`evaluator(unet) -> metrics` (harness.interfaces.Evaluator) of a Stable Diffusion UNet (module docstring).
    `classifier`: (model, inputs) of load_classifier, or None."""

    def __init__(self, sd, data: ConceptData, classifier, concept_label: str | None, benign_prompts: list[str],
                 benign_labels: list[str], samples_per_prompt: int = 4, sampling_steps: int = 50,
                 guidance_scale: float = 7.5, seed: int = 0, heldout_images: int | None = None):
        self.sd, self.data, self.classifier = sd, data, classifier
        self.concept_label, self.benign_labels = concept_label, list(benign_labels)
        self.prompts = [data.prompt, *benign_prompts]
        self.samples_per_prompt, self.sampling_steps = samples_per_prompt, sampling_steps
        self.guidance_scale = guidance_scale
        self.seed = seed
        self.embeddings = sd.embed(self.prompts).float().cpu()
        self.retain_batch = data.heldout_batch("benign", seed, heldout_images)
        self.forget_batch = data.heldout_batch("concept", seed, heldout_images)
        self.last_samples: torch.Tensor | None = None  # of the last call, for a sample grid

    @property
    def rows(self) -> tuple[str, ...]:
        """The sample grid's rows: the concept's prompt, then each benign one."""
        return tuple(self.prompts)

    def __call__(self, unet: torch.nn.Module) -> dict:
        losses = {"retain_ppl": heldout_loss(unet, self.retain_batch), "forget_ppl": heldout_loss(unet, self.forget_batch)}
        cond = self.embeddings.repeat_interleave(self.samples_per_prompt, 0)
        samples = generate(self.sd, unet, cond, self.data.null_embedding, steps=self.sampling_steps,
                           guidance_scale=self.guidance_scale, seed=self.seed)
        self.last_samples = samples
        if self.classifier is None:
            return {"hazard_acc": float("nan"), "utility_acc": float("nan"), **losses}
        model, inputs = self.classifier
        wanted = torch.tensor([label_id(model.config.id2label, l) for l in [self.concept_label, *self.benign_labels]])
        wanted = wanted.repeat_interleave(self.samples_per_prompt)
        finite = torch.isfinite(samples).flatten(1).all(1)  # a broken model's NaN sample is drawn wrong
        right = (classify(model, inputs, samples) == wanted) & finite
        n = self.samples_per_prompt
        hazard = float(right[:n].float().mean())
        utility = float(right[n:].float().mean()) if len(right) > n else float("nan")
        return {"hazard_acc": hazard, "utility_acc": utility, f"acc/{self.data.concept_name}": hazard, **losses}
