"""Which parameters each attack optimizer gets, and what the optimizer side knows of each class.

The optimizers themselves are library classes named by `_target_` in `conf/attack/<name>.yaml`
(torch.optim.SGD / Adam / AdamW / Muon, pytorch_optimizer.SophiaH / AdaHessian); nothing here
re-implements an update rule. What the runner must know of an optimizer before building it is read
from its class: `forward_only` and `needs_double_backward` class attributes, and its optimizer state
per parameter (`states_per_parameter`: a class attribute, or a static method of the optimizer's config
node, else the STATES registry by class name).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from harness.errors import ConfigError

# Optimizers that estimate the Hessian diagonal from the gradient's graph (Hutchinson products
# inside `step()`), so the loop must run `backward(create_graph=True)` under a double-backward-able
# attention kernel. These are every pytorch_optimizer class that calls `compute_hutchinson_hessian`
# (checked on pytorch_optimizer 4.1). A custom optimizer can opt in with a truthy class attribute
# `needs_double_backward`.
SECOND_ORDER = frozenset({"SophiaH", "AdaHessian"})
PARAM_SPLITS = ("muon",)
# Optimizer state kept per trained parameter, by class name, for the memory plan (e.g. Adam's two
# moments). A class of ours says it itself with a `states_per_parameter` class attribute.
STATES = {"Adam": 2, "AdamW": 2, "SGD": 1, "Muon": 1, "SophiaH": 2, "AdaHessian": 2, "Lion": 1, "SignSGD": 1,
          "Adagrad": 1, "ScheduleFreeAdamW": 2}


def needs_double_backward(optimizer: torch.optim.Optimizer) -> bool:
    if getattr(optimizer, "needs_double_backward", False):
        return True
    return any(cls.__name__ in SECOND_ORDER for cls in type(optimizer).__mro__)


def config_needs_double_backward(attack_cfg) -> bool:
    """The same decision from the config alone, before anything is built (the pipeline uses it to
    switch the defended model to eager attention): `second_order: true`, or an optimizer `_target_` whose
    class is known to be second-order."""
    if attack_cfg is None:
        return False
    if attack_cfg.get("second_order", False):
        return True
    targets = [(attack_cfg.get(key) or {}).get("_target_") for key in ("optimizer", "aux_optimizer")]
    return any(t.rsplit(".", 1)[-1] in SECOND_ORDER for t in targets if isinstance(t, str))


def optimizer_class(node) -> type | None:
    """The class an optimizer config's `_target_` names; None if it has none or cannot be imported
    (Hydra reports that, with its own message, when it builds the optimizer)."""
    target = (node or {}).get("_target_")
    if not isinstance(target, str):
        return None
    try:
        from hydra.utils import get_class
        return get_class(target)
    except Exception:  # noqa: BLE001
        return None


def forward_only(node) -> bool:
    """A zeroth-order optimizer (class attribute `forward_only`, e.g. attacks.mezo.MeZO): no gradient."""
    return bool(getattr(optimizer_class(node), "forward_only", False))


def states_per_parameter(node, default: int) -> int:
    """Optimizer state per trained parameter of the optimizer `node` configures (`default`: unknown)."""
    cls = optimizer_class(node)
    if cls is not None and hasattr(cls, "states_per_parameter"):
        states = cls.states_per_parameter  # a number, or a function of the node (e.g. MeZO's exact_restore)
        return int(states(node) if callable(states) else states)
    name = cls.__name__ if cls is not None else str((node or {}).get("_target_", "")).rsplit(".", 1)[-1]
    if name == "SGD" and not (node or {}).get("momentum", 0):
        return 0  # plain SGD keeps no momentum buffer
    return STATES.get(name, default)


def optimizer_counts(attack, params: int, matrices: Callable[[], int], adapters: Callable[[], int]) -> tuple[int, int, int]:
    """(parameters held, parameters trained, optimizer states) of `attack` on a model of `params` parameters, for
    a memory plan: LoRA adds and trains `adapters()`; Muon's split keeps its optimizer's states on the
    `matrices()` hidden 2-D weights and the auxiliary optimizer's on the rest; else one optimizer trains all."""
    optimizer = attack.optimizer
    if attack.get("peft") is not None:
        trained = adapters()
        return params + trained, trained, states_per_parameter(optimizer, 2) * trained
    if attack.get("param_split") == "muon":
        hidden = matrices()
        states = states_per_parameter(optimizer, 1) * hidden + states_per_parameter(attack.aux_optimizer, 2) * (params - hidden)
        return params, params, states
    return params, params, states_per_parameter(optimizer, 2) * params


def check_optimizer_config(attack) -> None:
    """What the optimizer cannot take, from the attack's config alone (before anything is built)."""
    target = (attack.get("optimizer") or {}).get("_target_")
    if not isinstance(target, str):
        return
    # torch.optim.Muon orthogonalises matrices: it rejects embeddings' 1-D neighbours (norms, biases)
    if target.endswith("Muon") and attack.get("param_split") is None and attack.get("peft") is None:
        raise ConfigError(f"attack.param_split=None with attack.optimizer._target_={target}: Muon takes only the "
                          "hidden 2-D weights; allowed attack.param_split=muon (AdamW on the rest) or LoRA")
    # a zeroth-order optimizer computes no gradient: clipping, a double backward or a second optimizer cannot apply
    for key in ("max_grad_norm", "second_order", "param_split"):
        value = attack.get(key)
        if forward_only(attack.optimizer) and value not in (None, False):
            raise ConfigError(f"attack.{key}={value!r} with attack.optimizer._target_={target}: allowed null/false "
                              "(a forward-only optimizer takes no gradient)")


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def muon_split(model: torch.nn.Module) -> tuple[list, list]:
    """(hidden 2-D weights, the rest): the standard Muon recipe.

    Muon orthogonalises matrix updates, which suits the Linear weights inside the decoder blocks but
    not lookup tables: input embeddings and the output head (even when 2-D: an LM's lm_head, an image
    classifier's `classifier`) and every 1-D parameter (norms, biases) go to the auxiliary optimizer, as
    do tensors of other ranks (a ViT's patch convolution and position table, a UNet's convolutions), which
    torch.optim.Muon refuses.
    """
    tables = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None and isinstance(getattr(model, "classifier", None), torch.nn.Linear):
        head = model.classifier  # transformers' *ForImageClassification: no output embeddings, a linear head
    if head is not None:
        tables |= {id(p) for p in head.parameters()}
    hidden, rest = [], []
    for p in trainable(model):
        (hidden if p.ndim == 2 and id(p) not in tables else rest).append(p)
    return hidden, rest


def build_optimizers(model: torch.nn.Module, optimizer: Callable, param_split: str | None = None,
                     aux_optimizer: Callable | None = None) -> list[torch.optim.Optimizer]:
    """One optimizer over all trainable parameters, or (param_split=muon) `optimizer` on the hidden
    2-D weights and `aux_optimizer` on the rest."""
    if param_split is None:
        if aux_optimizer is not None:
            raise ConfigError("attack.aux_optimizer is set but attack.param_split=null: "
                              "allowed param_split=muon with an aux_optimizer, or aux_optimizer=null")
        return [optimizer(trainable(model))]
    if param_split not in PARAM_SPLITS:
        raise ConfigError(f"attack.param_split={param_split!r}: allowed null or {', '.join(PARAM_SPLITS)}")
    if aux_optimizer is None:
        raise ConfigError("attack.param_split=muon needs attack.aux_optimizer (for embeddings, head, 1-D params)")
    hidden, rest = muon_split(model)
    if not hidden:
        raise ConfigError("attack.param_split=muon: the model has no trainable hidden 2-D weights")
    # LoRA leaves only 2-D adapter matrices trainable, so `rest` can be empty.
    return [optimizer(hidden)] + ([aux_optimizer(rest)] if rest else [])


def current_lr(optimizers: Sequence[torch.optim.Optimizer]) -> float:
    """The scheduled learning rate of the first optimizer's first group (the sweep's `lr` times the
    schedule factor); what 2/lr is compared against in the sharpness log."""
    return float(optimizers[0].param_groups[0]["lr"])
