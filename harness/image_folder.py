"""A local image folder as the vision track's data (`data=image_folder data.path=<folder>`): the real-scale
counterpart of the embedded glyph world, in the shape of the condition-number paper (an ImageNet-pretrained
ViT; a fine-grained dataset such as Stanford Cars as the harmful task).

Layout, as torchvision's ImageFolder reads it: one subfolder per class, named by the class,
`<path>/<class>/*.{jpg,jpeg,png,bmp,webp}`, split into train and eval here (`eval_fraction` of each class,
a seeded draw); or the split given, `<path>/train/<class>/...` and `<path>/val/<class>/...`. `data.hazard`
names the hazard classes by folder name; the other classes are benign (utility). Images are read with
PIL, converted to RGB and resized to the model's input size (as transformers' ViTImageProcessor does,
no crop), and held in memory as uint8: the same `ImageData` the glyph world gives, so every defense,
attack and the evaluation take either.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from harness.errors import ConfigError
from harness.images import ImageData

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SPLITS = ("train", "val")


@dataclasses.dataclass(frozen=True)
class FolderWorld:
    """What the run's data says about its classes (the glyph world's `ImageWorldConfig` counterpart)."""
    path: str
    classes: tuple[str, ...]
    hazard: tuple[str, ...]
    files: dict = dataclasses.field(repr=False, compare=False, hash=False)  # split -> class -> [file]


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)


def _class_folders(root: Path) -> dict[str, list[Path]]:
    return {d.name: _images_in(d) for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")}


def scan_image_folder(path, hazard, eval_fraction: float = 0.2, seed: int = 0,
                      max_per_class: int | None = None) -> FolderWorld:
    """The folder's classes and files per split, or one ConfigError line naming what is wrong: no such
    folder, no class subfolders, no images (in the folder or in one class), a hazard name it lacks."""
    if not isinstance(path, str) or not path:
        raise ConfigError(f"data.path={path!r}: allowed a folder of class subfolders (<path>/<class>/*.jpg)")
    if max_per_class is not None and not (isinstance(max_per_class, int) and max_per_class >= 1):
        raise ConfigError(f"data.max_per_class={max_per_class!r}: allowed null or an integer >= 1")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ConfigError(f"data.path={path!r}: no such folder; allowed a folder of class subfolders")
    given = {s: root / s for s in SPLITS if (root / s).is_dir()}
    if len(given) == len(SPLITS):
        by_split = {"train": _class_folders(given["train"]), "eval": _class_folders(given["val"])}
    else:
        by_split = _split(_class_folders(root), eval_fraction, seed)
    classes = tuple(by_split["train"])
    if not classes:
        raise ConfigError(f"data.path={path!r}: no class subfolders; allowed <path>/<class>/*.jpg "
                          "(or <path>/train/<class>/ and <path>/val/<class>/)")
    if not any(files for split in by_split.values() for files in split.values()):
        raise ConfigError(f"data.path={path!r}: no images ({', '.join(EXTENSIONS)}) in its class subfolders")
    for split, per_class in by_split.items():
        empty = [c for c in classes if not per_class.get(c)]
        if empty:
            raise ConfigError(f"data.path={path!r}: no {split} images of class {empty[0]!r}; allowed class "
                              f"subfolders holding images ({', '.join(EXTENSIONS)})")
    hazard = tuple(hazard or ())
    for name in hazard:
        if name not in classes:
            raise ConfigError(f"data.hazard: unknown class {name!r}; allowed {', '.join(classes)} (the class "
                              f"subfolders of {path})")
    if not hazard or len(set(hazard)) == len(classes):
        raise ConfigError(f"data.hazard={list(hazard)}: allowed at least one hazard and one benign class of "
                          f"{', '.join(classes)}")
    if max_per_class is not None:
        by_split = {s: {c: files[:max_per_class] for c, files in per_class.items()} for s, per_class in by_split.items()}
    return FolderWorld(str(root), classes, hazard, by_split)


def _split(per_class: dict[str, list[Path]], eval_fraction: float, seed: int) -> dict:
    """Each class's images, a seeded `eval_fraction` of them (at least one, if it has two) held out."""
    if not 0 < eval_fraction < 1:
        raise ConfigError(f"data.eval_fraction={eval_fraction!r}: allowed a number in (0, 1)")
    out: dict = {"train": {}, "eval": {}}
    for i, (name, files) in enumerate(per_class.items()):
        order = np.random.Generator(np.random.PCG64([seed, i])).permutation(len(files))
        n_eval = min(len(files) - 1, max(1, round(eval_fraction * len(files)))) if len(files) > 1 else 0
        out["eval"][name] = sorted(files[j] for j in order[:n_eval])
        out["train"][name] = sorted(files[j] for j in order[n_eval:])
    return out


def read_image(path: Path, size: int) -> torch.Tensor:
    """(3, size, size) uint8: RGB, resized with bicubic interpolation (ViTImageProcessor's)."""
    from PIL import Image
    with Image.open(path) as im:
        im = im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)


def _read_split(world: FolderWorld, split: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels, classes interleaved (a prefix of the split is class-balanced while it lasts)."""
    per_class = [world.files[split][c] for c in world.classes]
    images, labels = [], []
    for i in range(max(len(files) for files in per_class)):
        for label, files in enumerate(per_class):
            if i < len(files):
                images.append(read_image(files[i], size))
                labels.append(label)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


def folder_data(world: FolderWorld, size: int) -> ImageData:
    """The folder's images at the model's input size (`size` x `size`), as the run's ImageData."""
    return ImageData(world, *_read_split(world, "train", size), *_read_split(world, "eval", size))
