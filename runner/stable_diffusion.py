"""The diffusion track at real scale: Stable Diffusion -> concept folder -> defense -> relearning attack -> sampled
evaluation -> record.

runner/diffusion.py sends a diffusion config whose model is a Stable Diffusion folder (`model=stable_diffusion
model.path=<folder>`, `data=concept_folder`; `scale=diffusion_paper` sets both) here for its checks and its
steps; the record, the logger and the resumption are runner/diffusion.py's. The steps are the embedded
track's: the same defense and attack `_target_` configs through the same interfaces, the UNet as the model,
the concept's latents and prompt embedding as the data (harness/concept_folder.py), the one training loop
inside them, and an evaluation that samples from the UNet and has an image classifier score the samples
(harness/sd_eval.py). Every bad input stops in one line before anything is loaded.
"""
from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf

from harness.concept_folder import check_prompt, concept_data, scan_images
from harness.errors import ConfigError
from harness.models import resolve_device
from harness.rules import check_rules, non_negative, or_none, positive_int, unit_interval
from harness.sd_eval import SDEvaluator, check_classifier, load_classifier
from harness.stable_diffusion import check_sd_checkpoint, load_stable_diffusion
from runner.pipeline import timed

log = logging.getLogger(__name__)
EVAL_RULES = [
    ("eval.samples_per_prompt", positive_int, "an integer >= 1"),
    ("eval.sampling_steps", positive_int, "an integer >= 1"),
    ("eval.guidance_scale", non_negative, "a number >= 0"),
    ("eval.heldout_images", or_none(positive_int), "null or an integer >= 1"),
    ("eval.recover_fraction", unit_interval, "a number in [0, 1]"),
]


def is_stable_diffusion(cfg: DictConfig) -> bool:
    return OmegaConf.select(cfg, "model.source") == "stable_diffusion"


def check_stable_diffusion(cfg: DictConfig) -> None:
    """What a Stable Diffusion run cannot take, in one line each, before any work: a concept or benign folder
    without images, an empty prompt, a classifier that does not know the concept's label, a bad checkpoint
    folder or hub id (a component missing, pickled weights)."""
    if OmegaConf.select(cfg, "data.name") != "concept_folder":
        raise ConfigError(f"data={OmegaConf.select(cfg, 'data.name')} with model=stable_diffusion: allowed "
                          "data=concept_folder (data.path=<the concept's images> data.prompt=<its prompt>)")
    check_rules(cfg, EVAL_RULES)
    folders(cfg)
    d, e = cfg.data, cfg.eval
    check_prompt(d.prompt, "data.prompt")
    check_prompt(d.benign_prompt, "data.benign_prompt")
    for i, prompt in enumerate(e.benign_prompts or []):
        check_prompt(prompt, f"eval.benign_prompts[{i}]")
    benign_labels = list(e.benign_labels or [])
    check_attack_data(OmegaConf.to_container(cfg.attack.data, resolve=True))
    intact = OmegaConf.select(cfg, "attack.recovery_rule") == "intact" and cfg.attack.steps > 0
    if intact and (e.classifier_path is None or not benign_labels):
        raise ConfigError(f"eval.classifier_path={e.classifier_path!r} with eval.benign_labels={benign_labels}: the "
                          "intact rule needs a utility accuracy; allowed a classifier with a label per benign prompt, "
                          "or attack.recovery_rule=legacy (the held-out denoising losses alone)")
    # last, as a hub id's snapshot may be downloaded here: every cheaper mistake has been said by now
    check_classifier(e.classifier_path, e.concept_label, benign_labels, list(e.benign_prompts or []))
    check_sd_checkpoint(cfg.model.path, bool(OmegaConf.select(cfg, "model.trust_remote_code")))


def check_attack_data(data: dict) -> None:
    source, splits = data.get("source"), list(data.get("splits") or [])
    if source not in ("forget", "retain"):
        raise ConfigError(f"attack.data.source={source!r}: allowed forget or retain for a concept folder")
    if source == "forget" and splits != [0]:
        raise ConfigError(f"attack.data.splits={splits}: allowed [0] (the concept of data.prompt)")


def folders(cfg: DictConfig) -> tuple[dict, dict]:
    """{train, eval} image files of the concept's folder and of the benign one."""
    d = cfg.data
    return (scan_images(d.path, "data.path", d.eval_fraction, d.seed, d.max_images),
            scan_images(d.benign_path, "data.benign_path", d.eval_fraction, d.seed, d.max_images))


def prepare_stable_diffusion(cfg: DictConfig, timings: dict):
    """(UNet, concept data, evaluator, the sample grid's row names, the record's `concept` entry): what
    runner/diffusion.py's defend-and-attack steps take, at real scale."""
    d, e = cfg.data, cfg.eval
    with timed(timings, "load_model"):
        sd = load_stable_diffusion(cfg.model.path, cfg.model.dtype, cfg.model.device)
        classifier = (load_classifier(e.classifier_path, resolve_device(cfg.model.device))
                      if e.classifier_path is not None else None)
    with timed(timings, "data"):
        concept, benign = folders(cfg)
        data = concept_data(sd, concept, benign, d.prompt, d.benign_prompt, e.concept_label or "concept")
    evaluator = SDEvaluator(sd, data, classifier, e.concept_label, list(e.benign_prompts or []),
                            list(e.benign_labels or []), e.samples_per_prompt, e.sampling_steps, e.guidance_scale,
                            e.seed, e.heldout_images)
    record = {"concept": {"prompt": d.prompt, "benign_prompt": d.benign_prompt, "label": e.concept_label,
                          "images": {k: len(v) for k, v in concept.items()},
                          "benign_images": {k: len(v) for k, v in benign.items()},
                          "resolution": sd.resolution, "latent_shape": list(data.latent_shape)}}
    return sd.unet, data, evaluator, evaluator.rows, record
