"""Any Hugging Face ViT image classifier as the vision track's model (`model=vit model.path=<folder>`, or a hub id
such as google/vit-base-patch16-224, the condition-number paper's ImageNet-pretrained ViT-B/16: its config,
preprocessor and safetensors are taken through the local Hugging Face cache, never its pickles).

Safetensors only and no remote code, as for causal LMs (harness/models.py). Before anything loads, the folder
must hold a ViT classifier: config.json's model_type `vit`, and weights holding the encoder (`vit.*`) and a
classification head (`classifier.weight`); a checkpoint normalising its input other than with mean = std = 0.5
(the harness's `pixel_values`, the google/vit-* checkpoints' own) is refused too. The head is then fitted to the
run's classes (`fit_head`): a class the checkpoint names (its id2label, or one of the comma-separated synonyms
ImageNet's names carry) keeps its row; a class it does not know (a fine-grained harmful task's) gets a new row
of zeros, for the attacker to learn.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from harness.errors import ConfigError
from harness.models import DTYPES, check_model_path, local_folder, resolve_device

MODEL_TYPE = "vit"
# what a hub id's snapshot takes: the config, the preprocessor's statistics and the safetensors (sharded or not)
HUB_FILES = ["config.json", "preprocessor_config.json", "model.safetensors", "model.safetensors.index.json",
             "model-*-of-*.safetensors"]


def vit_folder(path) -> Path:
    """The checkpoint's local folder: `path` itself, or a hub id's snapshot of HUB_FILES (the local cache offline)."""
    return local_folder(path, "model.path", HUB_FILES)


def check_vit_checkpoint(path, trust_remote_code: bool = False) -> dict:
    """config.json of a ViT classifier checkpoint at `path`, or one ConfigError line saying what is missing."""
    if trust_remote_code:
        raise ConfigError("model.trust_remote_code=true with image data: allowed false (no remote code is run)")
    folder = vit_folder(path)  # a hub id out of reach stops here
    check_model_path(str(folder))  # a folder without *.safetensors stops here
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(str(folder)).to_dict()
    if config.get("model_type") != MODEL_TYPE:
        raise ConfigError(f"model.path={path!r}: a {config.get('model_type')!r} checkpoint (config.json model_type); "
                          "allowed a ViT image classifier (model_type vit, ViTForImageClassification)")
    _check_weights(path, folder)
    _check_normalisation(path, folder)
    return config


def _check_weights(path: str, folder: Path) -> None:
    """The safetensors headers (no tensor is read) must name the encoder and a classification head."""
    from safetensors import safe_open
    keys: set[str] = set()
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            keys.update(st.keys())
    # a ViTModel's own keys have no `vit.` prefix: its encoder loads, but it has no head to classify with
    encoder = any(k.startswith(("vit.embeddings.", "embeddings.")) for k in keys)
    missing = [what for what, ok in (("the ViT encoder (vit.embeddings.*)", encoder),
                                     ("a classification head (classifier.weight)", "classifier.weight" in keys))
               if not ok]
    if missing:
        raise ConfigError(f"model.path={path!r}: its weights lack {' and '.join(missing)}; allowed a "
                          "ViTForImageClassification checkpoint saved with save_pretrained")


def _check_normalisation(path: str, folder: Path) -> None:
    pre = folder / "preprocessor_config.json"
    if not pre.is_file():
        return
    cfg = json.loads(pre.read_text())
    for key in ("image_mean", "image_std"):
        values = cfg.get(key)
        if values is not None and any(abs(v - 0.5) > 1e-6 for v in values):
            raise ConfigError(f"model.path={path!r}: preprocessor_config.json {key}={values}; allowed 0.5 per channel "
                              "(images are normalised to [-1, 1], harness/images.py pixel_values)")


def load_hf_vit(path: str, dtype: str = "float32", device: str = "cpu"):
    from transformers import ViTForImageClassification
    from transformers.utils import logging as transformers_logging
    transformers_logging.disable_progress_bar()
    model = ViTForImageClassification.from_pretrained(str(vit_folder(path)), use_safetensors=True, trust_remote_code=False,
                                                      dtype=DTYPES[dtype])
    return model.to(resolve_device(device)).eval()


def _names(label: str) -> set[str]:
    """A checkpoint's class name and its comma-separated synonyms ("tench, Tinca tinca"), lower case."""
    return {label.strip().lower(), *(part.strip().lower() for part in label.split(","))}


def fit_head(model: nn.Module, classes: tuple[str, ...]) -> dict:
    """Make the classification head's outputs the run's `classes`, in order: a class the checkpoint knows keeps
    its row, an unknown one gets a zero row. Returns {kept: {class: original label}, new: [class]}."""
    id2label = {int(i): str(name) for i, name in model.config.id2label.items()}
    lookup: dict[str, int] = {}
    for i, name in sorted(id2label.items()):
        for n in _names(name):
            lookup.setdefault(n, i)
    rows = [lookup.get(c.lower()) for c in classes]
    old = model.classifier
    head = nn.Linear(old.in_features, len(classes), bias=old.bias is not None, dtype=old.weight.dtype,
                     device=old.weight.device)
    with torch.no_grad():
        head.weight.zero_()
        if head.bias is not None:
            head.bias.zero_()
        for j, i in enumerate(rows):
            if i is not None:
                head.weight[j] = old.weight[i]
                if head.bias is not None:
                    head.bias[j] = old.bias[i]
    model.classifier = head
    model.num_labels = len(classes)
    model.config.num_labels = len(classes)
    model.config.id2label = dict(enumerate(classes))
    model.config.label2id = {c: j for j, c in enumerate(classes)}
    return {"kept": {c: i for c, i in zip(classes, rows) if i is not None},
            "new": [c for c, i in zip(classes, rows) if i is None]}
