"""The diffusion track's data: the image world (harness/images.py) as a denoiser's training set.

The world is the vision track's own (same seed, classes and hazard classes, so the tiny ViT pretrained
on it, harness/tiny_vit.py, is the classifier that scores what a denoiser generates). A class-conditioned
denoiser learns it at `resolution` (16: each 2x2 block of the 32x32 glyphs averaged), since a UNet step
at 32x32 costs 4x as much on one core; the ViT classifies 16x16 images upsampled back to 32x32 as well as
the originals (0.98 on the eval split, bilinear).

A training batch is a noised one: x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε for a uniform timestep t and
Gaussian ε, all drawn from the batch's seed, and the loss is the MSE between the denoiser's prediction
and ε (`prediction_type: epsilon`). Labels are dropped to the extra "null" class with probability
`cond_dropout`, which trains the unconditional prediction classifier-free guidance and ESD read.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import torch
import torch.nn.functional as F

from harness.errors import ConfigError
from harness.images import SIZE, ImageData, pixel_values


def to_model_space(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 (N, 3, 32, 32) world images -> float32 in [-1, 1] at `resolution` (block means, exact)."""
    x = pixel_values(images)
    factor = SIZE // resolution
    return F.avg_pool2d(x, factor) if factor > 1 else x


def to_classifier_space(samples: torch.Tensor) -> torch.Tensor:
    """Generated samples in [-1, 1] at any resolution -> the classifier's input: 32x32 in [-1, 1]."""
    x = samples.float().clamp(-1, 1)
    if x.shape[-1] != SIZE:
        x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return x


def check_resolution(resolution: int) -> None:
    if not (isinstance(resolution, int) and resolution >= 4 and SIZE % resolution == 0):
        raise ConfigError(f"model.spec.resolution={resolution!r}: allowed a divisor of {SIZE} that is >= 4 "
                          "(e.g. 16 or 32)")


def noised_batches(x0: torch.Tensor, labels: torch.Tensor, scheduler, batch_size: int, seed: int,
                   cond_dropout: float, null_label: int) -> Iterator[dict]:
    """Endless shuffled batches {sample: x_t, timestep: t, class_labels, target: ε}; the order, the labels
    dropped to `null_label`, t and ε all come from `seed`, so a run sees the same batches every time."""
    if len(labels) == 0:
        raise ConfigError("no images to train on: the selection of classes is empty")
    g = torch.Generator().manual_seed(seed)
    steps = scheduler.config.num_train_timesteps
    while True:
        order = torch.randperm(len(labels), generator=g)
        for i in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
            idx = order[i:i + batch_size]
            clean, y = x0[idx], labels[idx].clone()
            y[torch.rand(len(y), generator=g) < cond_dropout] = null_label
            noise = torch.randn(clean.shape, generator=g)
            t = torch.randint(0, steps, (len(y),), generator=g)
            yield {"sample": scheduler.add_noise(clean, noise, t), "timestep": t, "class_labels": y, "target": noise}


def denoising_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """MSE between the predicted and the true noise (the diffusion `LossFn` of harness.train.train_loop)."""
    pred = model(batch["sample"], batch["timestep"], class_labels=batch["class_labels"]).sample
    return F.mse_loss(pred.float(), batch["target"])


@dataclasses.dataclass
class DiffusionData:
    """The image world as a diffusion run's data: what pretraining and attacks train on, what the
    evaluation scores. `images` is the world (labels, hazard classes); `scheduler` the noise schedule."""
    images: ImageData
    resolution: int
    scheduler: object          # a diffusers DDPMScheduler: add_noise and the timesteps of training
    cond_dropout: float = 0.1  # share of an attacker's labels dropped to null (as in pretraining)

    @property
    def world(self):
        return self.images.world

    @property
    def classes(self) -> tuple[str, ...]:
        return self.images.classes

    @property
    def null_label(self) -> int:
        """The extra class of the unconditional prediction (classifier-free guidance, ESD)."""
        return len(self.classes)

    @property
    def hazard_labels(self) -> list[int]:
        return self.images.hazard_labels

    @property
    def benign_labels(self) -> list[int]:
        return self.images.benign_labels

    @property
    def hazard_tasks(self) -> dict[int, str]:
        """Hazard "split" -> the name its concept rate is scored under (`acc/<class>`), as the vision track."""
        return self.images.hazard_tasks

    def model_images(self, split: str, labels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(images in the model's space, labels) of `split` for the classes `labels`."""
        x, y = self.images._select(split, labels)
        return to_model_space(x, self.resolution), y

    def batches(self, labels: list[int], batch_size: int, seed: int, cond_dropout: float | None = None):
        x, y = self.model_images("train", labels)
        dropout = self.cond_dropout if cond_dropout is None else cond_dropout
        return noised_batches(x, y, self.scheduler, batch_size, seed, dropout, self.null_label)

    def attack_batches(self, spec: dict, batch_size: int, seed: int) -> Iterator[dict]:
        """The attacker's fine-tuning batches (attacks.relearn, `attack.data`): the training images of the
        hazard classes in `splits` (indices into world.hazard), or of the benign ones (`retain`); with
        `retain_share`, benign images making up that share of the set; `n_samples` images drawn with `seed`."""
        source = spec.get("source")
        if source == "forget":
            splits = list(spec.get("splits") or [])
            bad = [s for s in splits if not (isinstance(s, int) and 0 <= s < len(self.world.hazard))]
            if bad or not splits:
                raise ConfigError(f"attack.data.splits={splits}: allowed indices 0..{len(self.world.hazard) - 1} "
                                  f"of the hazard classes {list(self.world.hazard)}")
            labels = [self.hazard_labels[s] for s in splits]
        elif source == "retain":
            labels = self.benign_labels
        else:
            raise ConfigError(f"attack.data.source={source!r}: allowed forget or retain for the diffusion world")
        x, y = self.model_images("train", labels)
        x, y = _sample(x, y, spec.get("n_samples"), seed)
        share = spec.get("retain_share")
        if share:
            bx, by = self.model_images("train", self.benign_labels)
            bx, by = _sample(bx, by, min(len(by), round(len(y) * share / (1 - share))), seed + 1)
            x, y = torch.cat([x, bx]), torch.cat([y, by])
        return noised_batches(x, y, self.scheduler, batch_size, seed, self.cond_dropout, self.null_label)

    @staticmethod
    def loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
        return denoising_loss(model, batch)


def _sample(x: torch.Tensor, y: torch.Tensor, n: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if n is None or n >= len(y):
        return x, y
    keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n]
    return x[keep], y[keep]


def heldout_batch(data: DiffusionData, labels: list[int], per_class: int, seed: int) -> dict:
    """A fixed noised batch of eval images of `labels` (a class-balanced prefix of the split, conditional
    labels, t and ε from `seed`): the held-out denoising loss is the model's loss on it."""
    x, y = data.model_images("eval", labels)
    n = per_class * len(labels)
    x, y = x[:n], y[:n]
    return next(noised_batches(x, y, data.scheduler, len(y), seed, 0.0, data.null_label))
