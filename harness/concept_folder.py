"""A concept's images as the diffusion track's data at real scale (`data=concept_folder data.path=<folder>
data.prompt="<concept prompt>"`), in DreamBooth's shape: the attacker fine-tunes the Stable Diffusion UNet on
a few images of the concept under its prompt (the instance images and prompt), and the benign images under
theirs (DreamBooth's class images and class prompt, `data.benign_path`, `data.benign_prompt`) tell how much
of its denoising the model keeps.

Each folder holds the images themselves (`*.jpg|jpeg|png|bmp|webp`, no class subfolders); a seeded
`eval_fraction` of each is held out for the held-out denoising losses. Images are read as RGB, resized to
the UNet's resolution (the VAE's downsampling times its latent size), encoded once by the frozen VAE into
latents, and the prompts once by the frozen text encoder: the loss is the noise-prediction MSE on
x_t = sqrt(ᾱ_t) z_0 + sqrt(1 - ᾱ_t) ε of those latents, conditioned on the prompt's embedding, as in
diffusers' train_dreambooth.py (without prior preservation's second term; the benign share of the attacker's
batches, `attack.data.retain_share`, plays its part).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from harness.errors import ConfigError
from harness.image_folder import EXTENSIONS, read_image
from harness.images import pixel_values


def scan_images(path, key: str, eval_fraction: float, seed: int, max_images: int | None = None) -> dict[str, list[Path]]:
    """{train: [...], eval: [...]} image files of the folder `path`, or one ConfigError line naming `key`:
    no such folder, no images, too few to hold one out."""
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{key}={path!r}: allowed a folder of images ({', '.join(EXTENSIONS)})")
    if not 0 < eval_fraction < 1:
        raise ConfigError(f"data.eval_fraction={eval_fraction!r}: allowed a number in (0, 1)")
    if max_images is not None and not (isinstance(max_images, int) and max_images >= 2):
        raise ConfigError(f"data.max_images={max_images!r}: allowed null or an integer >= 2")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ConfigError(f"{key}={path!r}: no such folder; allowed a folder of images ({', '.join(EXTENSIONS)})")
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)
    if len(files) < 2:
        raise ConfigError(f"{key}={path!r}: {len(files)} images ({', '.join(EXTENSIONS)}) in that folder; allowed "
                          "at least 2 (one to train on, one held out)")
    files = files[:max_images] if max_images else files
    order = np.random.Generator(np.random.PCG64(seed)).permutation(len(files))
    n_eval = min(len(files) - 1, max(1, round(eval_fraction * len(files))))
    return {"eval": sorted(files[j] for j in order[:n_eval]), "train": sorted(files[j] for j in order[n_eval:])}


def check_prompt(prompt, key: str) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError(f"{key}={prompt!r}: allowed a non-empty prompt (e.g. \"a photo of sks dog\")")
    return prompt


def read_images(files: list[Path], size: int) -> torch.Tensor:
    """(N, 3, size, size) in [-1, 1] (the VAE's input range)."""
    return pixel_values(torch.stack([read_image(f, size) for f in files]))


def noised_latents(z0: torch.Tensor, cond: torch.Tensor, scheduler, batch_size: int, seed: int) -> Iterator[dict]:
    """Endless shuffled batches {sample: z_t, timestep, encoder_hidden_states, target: ε}; the order, t and ε
    come from `seed` (harness.diffusion.noised_batches' rule, for text conditions: `cond` holds one
    embedding per latent)."""
    g = torch.Generator().manual_seed(seed)
    steps = scheduler.config.num_train_timesteps
    while True:
        order = torch.randperm(len(z0), generator=g)
        for i in range(0, max(1, len(order) - batch_size + 1), batch_size):
            idx = order[i:i + batch_size]
            noise = torch.randn(z0[idx].shape, generator=g)
            t = torch.randint(0, steps, (len(idx),), generator=g)
            yield {"sample": scheduler.add_noise(z0[idx], noise, t), "timestep": t,
                   "encoder_hidden_states": cond[idx], "target": noise}


def text_denoising_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """MSE between the predicted and the true noise, conditioned on the prompt (harness.train.train_loop's LossFn)."""
    dtype = next(model.parameters()).dtype  # latents and embeddings are kept in float32, a UNet may be half
    pred = model(batch["sample"].to(dtype), batch["timestep"],
                 encoder_hidden_states=batch["encoder_hidden_states"].to(dtype)).sample
    return F.mse_loss(pred.float(), batch["target"].float())


@dataclasses.dataclass
class ConceptData:
    """The concept's and the benign images as latents, their prompts as embeddings (module docstring).
    `concept` / `benign`: {train, eval} latents; `prompt_embedding` / `benign_embedding` / `null_embedding`:
    (1, tokens, width), the last the empty prompt's (classifier-free guidance, ESD)."""
    prompt: str
    benign_prompt: str
    concept: dict[str, torch.Tensor]
    benign: dict[str, torch.Tensor]
    prompt_embedding: torch.Tensor
    benign_embedding: torch.Tensor
    null_embedding: torch.Tensor
    scheduler: object          # the DDPMScheduler of training: add_noise, and DDIM sampling's config
    concept_name: str = "concept"

    @property
    def hazard_tasks(self) -> dict[int, str]:
        """The one hazard "split", the concept, scored as acc/<concept_name> (attacks.relearn reads it)."""
        return {0: self.concept_name}

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.concept["train"].shape[1:])

    def attack_batches(self, spec: dict, batch_size: int, seed: int) -> Iterator[dict]:
        """The attacker's fine-tuning batches (attacks.relearn, `attack.data`): the concept's training images
        under its prompt (`source: forget`, `splits: [0]`) or the benign ones (`retain`); with `retain_share`,
        benign images making up that share of the set; `n_samples` images drawn with `seed`."""
        source, splits = spec.get("source"), list(spec.get("splits") or [])
        if source == "forget" and splits != [0]:
            raise ConfigError(f"attack.data.splits={splits}: allowed [0] (the concept of data.prompt)")
        if source not in ("forget", "retain"):
            raise ConfigError(f"attack.data.source={source!r}: allowed forget or retain for a concept folder")
        z, e = self._train("concept" if source == "forget" else "benign")
        z, e = _sample(z, e, spec.get("n_samples"), seed)
        share = spec.get("retain_share")
        if share and source == "forget":
            bz, be = self._train("benign")
            bz, be = _sample(bz, be, min(len(bz), round(len(z) * share / (1 - share))), seed + 1)
            z, e = torch.cat([z, bz]), torch.cat([e, be])
        return noised_latents(z, e, self.scheduler, batch_size, seed)

    def _train(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        z = (self.concept if which == "concept" else self.benign)["train"]
        embedding = self.prompt_embedding if which == "concept" else self.benign_embedding
        return z, embedding.expand(len(z), -1, -1)

    def heldout_batch(self, which: str, seed: int, limit: int | None = None) -> dict:
        """A fixed noised batch of the held-out latents of `which` (concept | benign) under its prompt, t and
        ε from `seed`: the held-out denoising loss is the model's loss on it."""
        z = (self.concept if which == "concept" else self.benign)["eval"][:limit]
        embedding = self.prompt_embedding if which == "concept" else self.benign_embedding
        return next(noised_latents(z, embedding.expand(len(z), -1, -1), self.scheduler, len(z), seed))

    def drift_batch(self, samples: int) -> dict:
        """Held-out latents of both kinds, noised (SpecDef's drift, specdef/drift.py)."""
        concept, benign = self.heldout_batch("concept", 0), self.heldout_batch("benign", 0)
        return {k: torch.cat([concept[k], benign[k]])[:samples] for k in concept}

    @staticmethod
    def loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
        return text_denoising_loss(model, batch)


def _sample(z: torch.Tensor, e: torch.Tensor, n: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if n is None or n >= len(z):
        return z, e
    keep = torch.randperm(len(z), generator=torch.Generator().manual_seed(seed))[:n]
    return z[keep], e[keep]


def concept_data(sd, files: dict, benign_files: dict, prompt: str, benign_prompt: str,
                 concept_name: str = "concept") -> ConceptData:
    """Encode the folders' images (at the UNet's resolution) and the prompts with the frozen VAE and text encoder."""
    size = sd.resolution
    latents = {which: {split: sd.encode(read_images(fs, size)) for split, fs in found.items()}
               for which, found in (("concept", files), ("benign", benign_files))}
    prompt_e, benign_e, null_e = sd.embed([prompt, benign_prompt, ""]).float().cpu().chunk(3)
    return ConceptData(prompt, benign_prompt, latents["concept"], latents["benign"], prompt_e, benign_e, null_e,
                       sd.scheduler, concept_name)
