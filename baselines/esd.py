"""ESD, Erasing Concepts from Diffusion Models (Gandikota et al., ICCV 2023), for a class-conditioned denoiser.

ESD fine-tunes the model's conditional prediction for the concept c towards the negatively guided
prediction of the frozen original θ*:

    L = || ε_θ(x_t, c, t) − [ ε_θ*(x_t, ∅, t) − η (ε_θ*(x_t, c, t) − ε_θ*(x_t, ∅, t)) ] ||²

with η the negative guidance. As in the authors' code, the x_t are the model's own: each iteration
draws a timestep index among `ddim_steps` DDIM steps and samples from noise down to it with the
frozen original, conditioned on c, at classifier-free guidance `start_guidance` (no training image is
needed). The class condition plays the role of the prompt and the null class that of the empty prompt.

`train_method` chooses what trains, as the authors' `--train_method` does for Stable Diffusion:
`noxattn` (ESD-u) every layer but those that read the condition, `xattn` (ESD-x) only those, `selfattn`
the self-attention layers, `full` everything. A UNet2DModel has no cross-attention: the class embedding is
added to the timestep embedding, which each ResNet block reads through its `time_emb_proj`, so those
(with the class embedding itself) are its "cross-attention" layers.

At real scale (`model=stable_diffusion`, harness/stable_diffusion.py) the condition is the prompt's text
embedding, as in the paper: c is the concept prompt's (data.prompt), ∅ the empty prompt's, x_t are latents,
and the layers are the authors' own (train-esd.py): `xattn` the cross-attention blocks (`attn2`), `noxattn`
every other layer but the time embedding and the output convolution, `selfattn` the `attn1` blocks.

Training goes through the one loop (harness.train.train_loop) with Adam, as the authors'.
"""
from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F

from baselines.common import BATCH_SIZE, LR, TermLog, frozen_copy, only_train, run_info
from harness.concept_folder import ConceptData
from harness.diffusion import DiffusionData
from harness.errors import ConfigError
from harness.rules import MISSING, Rule, check_rules, get, non_negative, one_of, positive_int
from harness.train import train_loop

log = logging.getLogger(__name__)
TRAIN_METHODS = ("noxattn", "xattn", "selfattn", "full")
CONDITION_READERS = ("class_embedding", "time_emb_proj")  # the UNet2DModel's analogue of cross-attention
# UNet2DConditionModel (text): what the authors' --train_method trains, in diffusers' names for their ldm ones
# (attn2: cross-attention; noxattn leaves out attn2, time_embed and the output layer `out.`: conv_out here)
TEXT_CHOICES = {"xattn": lambda parts: "attn2" in parts, "selfattn": lambda parts: "attn1" in parts,
                "noxattn": lambda parts: not {"attn2", "time_embedding", "conv_out"} & set(parts),
                "full": lambda parts: True}
# ESD's own keys (harness/rules.py), checked before any model loads (`ESD.check_config`)
RULES: list[Rule] = [
    ("iterations", positive_int, "an integer >= 1"), BATCH_SIZE, LR,
    ("negative_guidance", non_negative, "a number >= 0"),
    ("start_guidance", non_negative, "a number >= 0"),
    ("ddim_steps", positive_int, "an integer >= 1"),
    ("train_method", one_of(*TRAIN_METHODS), ", ".join(TRAIN_METHODS)),
]


def esd_parameters(model: torch.nn.Module, train_method: str) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of what `train_method` trains (module docstring)."""
    if any(".attn2." in n for n, _ in model.named_parameters()):  # text-conditioned: the authors' own choice
        return [(n, p) for n, p in model.named_parameters() if TEXT_CHOICES[train_method](n.split("."))]

    def reads_condition(name: str) -> bool:
        return any(part in name.split(".") for part in CONDITION_READERS)

    chosen = {
        "full": lambda n: True,
        "xattn": reads_condition,
        "noxattn": lambda n: not reads_condition(n),
        "selfattn": lambda n: ".attentions." in f".{n}",
    }[train_method]
    return [(n, p) for n, p in model.named_parameters() if chosen(n)]


class ESD:
    """`defense=esd` (conf/defense/esd.yaml; the authors' values at real scale in conf/defense_scale/paper/esd.yaml).

    negative_guidance: η.  start_guidance: the guidance x_t is sampled with.  ddim_steps: the DDIM schedule
    x_t is drawn from.  iterations: optimizer steps of `batch_size` x_t each (the authors: 1 each).
    forget_splits: the hazard classes to erase (indices into data.world.hazard), one drawn per x_t.
    """
    name = "esd"

    @staticmethod
    def check_config(cfg, node, key: str) -> None:
        """Its keys, and the concept's classes against the run's world, before any model loads."""
        check_rules(node, RULES, f"{key}.")
        data = get(cfg, "data.name")
        if data is not MISSING and get(cfg, "data.kind") != "diffusion":
            raise ConfigError(f"defense=esd with data={data}: allowed the diffusion world (experiment=diffusion)")
        hazard = get(cfg, "data.world.hazard")
        splits = node.get("forget_splits")
        if data == "concept_folder" and splits is not None and list(splits) != [0]:
            raise ConfigError(f"defense.forget_splits={list(splits)}: allowed [0] (the concept of data.prompt)")
        if hazard is not MISSING and splits is not None:
            _check_splits(list(splits), list(hazard))

    def __init__(self, negative_guidance: float = 1.0, start_guidance: float = 3.0, train_method: str = "noxattn",
                 lr: float = 1e-5, iterations: int = 1000, batch_size: int = 1, ddim_steps: int = 50,
                 max_grad_norm: float | None = None, forget_splits=(0, 1), seed: int = 0):
        if train_method not in TRAIN_METHODS:
            raise ConfigError(f"defense.train_method={train_method!r}: allowed {', '.join(TRAIN_METHODS)}")
        self.negative_guidance, self.start_guidance, self.train_method = negative_guidance, start_guidance, train_method
        self.lr, self.iterations, self.batch_size, self.ddim_steps = lr, iterations, batch_size, ddim_steps
        self.max_grad_norm, self.forget_splits, self.seed = max_grad_norm, list(forget_splits), seed
        self.info: dict = {}

    def conditions(self, data) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...], list[str]]:
        """(concept conditions, the null condition (one row), the shape of x_t, the erased concepts' names):
        class labels and the null class on the image world; the concept prompt's and the empty prompt's
        text embeddings, and latents, on a concept folder (model=stable_diffusion)."""
        if isinstance(data, ConceptData):
            if self.forget_splits != [0]:
                raise ConfigError(f"defense.forget_splits={self.forget_splits}: allowed [0] (the concept of data.prompt)")
            return data.prompt_embedding, data.null_embedding, data.latent_shape, [data.prompt]
        concepts = self.concept_labels(data)
        shape = (3, data.resolution, data.resolution)
        return torch.tensor(concepts), torch.tensor([data.null_label]), shape, [data.classes[c] for c in concepts]

    def concept_labels(self, data) -> list[int]:
        if not isinstance(data, DiffusionData):
            raise ConfigError(f"defense=esd on {type(data).__name__}: allowed a diffusion world (experiment=diffusion)")
        _check_splits(self.forget_splits, list(data.world.hazard))
        return [data.hazard_labels[s] for s in self.forget_splits]

    def batches(self, ref: torch.nn.Module, data, concepts: torch.Tensor, null: torch.Tensor, shape: tuple[int, ...]):
        """Endless {sample: x_t, timestep, condition: c, target}: x_t sampled by the frozen original down
        to a random DDIM step, the target its negatively guided prediction there (module docstring)."""
        from diffusers import DDIMScheduler
        sampler = DDIMScheduler.from_config(data.scheduler.config)
        sampler.set_timesteps(self.ddim_steps)
        g = torch.Generator().manual_seed(self.seed)
        param = next(ref.parameters())
        # embeddings take the model's dtype, labels stay integers
        place = (lambda v: v.to(param)) if concepts.is_floating_point() else (lambda v: v.to(param.device))
        while True:
            until = int(torch.randint(0, self.ddim_steps, (1,), generator=g))
            c = place(concepts[torch.randint(0, len(concepts), (self.batch_size,), generator=g)])
            x = torch.randn(self.batch_size, *shape, generator=g).to(param)
            u = place(null[torch.zeros(self.batch_size, dtype=torch.long)])
            with torch.no_grad():
                for t in sampler.timesteps[:until]:
                    x = sampler.step(_cfg(ref, x, t, c, u, self.start_guidance), t, x).prev_sample
                t = sampler.timesteps[until]
                eps_c, eps_null = _both(ref, x, t, c, u)
                target = eps_null - self.negative_guidance * (eps_c - eps_null)
            yield {"sample": x, "timestep": t.expand(self.batch_size), "condition": c, "target": target}

    def __call__(self, model, tokenizer, data):
        t0 = time.perf_counter()
        torch.manual_seed(self.seed)
        concepts, null, shape, names = self.conditions(data)
        ref = frozen_copy(model)
        named = esd_parameters(model, self.train_method)
        terms = TermLog()

        def loss(m, batch):
            pred = _predict(m, batch["sample"], batch["timestep"], batch["condition"])
            value = F.mse_loss(pred.float(), batch["target"].float())
            terms(esd=value)
            return value

        with only_train(model, [p for _, p in named]) as params:
            opt = torch.optim.Adam(params, lr=self.lr)
            result = train_loop(model, self.batches(ref, data, concepts, null, shape), loss, [opt], steps=self.iterations,
                                max_grad_norm=self.max_grad_norm, desc="defense esd", progress=False)
        self.info = run_info(t0, {"train": result}, terms, train_method=self.train_method,
                             trained_parameters=sum(p.numel() for _, p in named),
                             erased_classes=names)
        log.info("esd: %s", self.info)
        return model


def _check_splits(splits: list, hazard: list) -> None:
    if not splits or any(not (isinstance(s, int) and 0 <= s < len(hazard)) for s in splits):
        raise ConfigError(f"defense.forget_splits={splits}: allowed a non-empty list of indices "
                          f"0..{len(hazard) - 1} of the hazard classes {hazard}")


def _predict(model, x, t, condition: torch.Tensor) -> torch.Tensor:
    """ε(x, t, condition): a class label (UNet2DModel) or a text embedding (UNet2DConditionModel)."""
    if condition.is_floating_point():
        return model(x, t, encoder_hidden_states=condition).sample
    return model(x, t, class_labels=condition).sample


def _both(model, x, t, c, u) -> tuple[torch.Tensor, torch.Tensor]:
    """(ε(x, c), ε(x, ∅)) in one batched pass."""
    return _predict(model, torch.cat([x, x]), t, torch.cat([c, u])).chunk(2)


def _cfg(model, x, t, c, u, scale: float) -> torch.Tensor:
    eps_c, eps_null = _both(model, x, t, c, u)
    return eps_null + scale * (eps_c - eps_null)
