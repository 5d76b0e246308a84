"""The relearning (tampering) attack: fine-tune on some text, evaluate every N steps, stop once every dagger rule fired.

Every optimizer is a `_target_` config (`conf/attack/<name>.yaml`); this class only wires the model's
parameters to it (`attacks.optimizers`), optionally undoes a defense or wraps the model in LoRA first,
draws the relearning data and keeps the trajectory. Training goes through the shared
`harness.train.train_loop`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import warnings
from typing import Callable

import torch

from attacks.checkpoint import AttackCheckpoint
from attacks.optimizers import (PARAM_SPLITS, build_optimizers, check_optimizer_config, config_needs_double_backward,
                                current_lr, forward_only, needs_double_backward, optimizer_counts,
                                trainable as trainable_params)
from attacks.partial import apply as apply_partial, check_patterns
from harness import distributed
from harness.batches import batch_iterator
from harness.data import split_task_names
from harness.errors import ConfigError
from harness.interfaces import NoAttack  # noqa: F401 - conf/attack/none.yaml's _target_ (see there)
from harness.memory import Costs, Defended, Shape, Stage, lora_params
from harness.outcome import (DAGGER_RULES, RECOVERY_RULES, AttackResult, DaggerRule, RecoveryRule, best, first_event,
                             steps_to_recover)
from harness.rules import (MISSING, Rule, check_rules, get, non_negative_int, one_of, or_none, positive, positive_int,
                           unit_interval)
from harness.train import lm_loss, lr_lambda, train_loop

log = logging.getLogger(__name__)

# retain_share (optional, absent from conf/attack/_base.yaml so that no existing config's hash changes):
# the share of the fine-tuning set drawn from the retain data besides `source` (an attacker keeping the
# model's utility; a classifier fine-tuned on hazard classes alone forgets the benign ones within 10 steps)
DATA_KEYS = {"source", "splits", "n_samples", "retain_share"}
# hazard_acc: all hazard tasks; relearned_acc / heldout_acc: the RTT split (see split_tasks)
RECOVER_METRICS = ("hazard_acc", "relearned_acc", "heldout_acc")
DATA_SOURCES = ("forget", "questions", "retain", "unrelated")
SPLIT_SOURCES = ("forget", "questions")  # drawn from chosen hazard splits: the others are held out
# where LoRA sits on a SpecDef-defended layer (attacks/lora.py)
LORA_PLACEMENTS = ("around", "inner", "comp", "parts")
# The attack's own keys (harness/rules.py), checked before any model loads (`Relearn.check_config`).
RULES: list[Rule] = [
    ("steps", non_negative_int, "an integer >= 0"),
    ("batch_size", positive_int, "an integer >= 1"),
    ("grad_accum", positive_int, "an integer >= 1"),
    ("eval_every", positive_int, "an integer >= 1"),
    ("warmup_steps", non_negative_int, "an integer >= 0"),
    ("schedule", one_of("constant", "linear", "cosine"), "constant, linear or cosine"),
    ("dagger.rule", one_of(*DAGGER_RULES), "broken or legacy"),
    ("dagger.ppl_factor", positive, "a finite number > 0"),
    ("dagger.utility_fraction", unit_interval, "a number in [0, 1]"),
    ("dagger.chance", unit_interval, "a number in [0, 1]"),
    ("dagger.loss_factor", positive, "a finite number > 0"),
    ("dagger.legacy_factor", positive, "a finite number > 0"),
    ("recovery_rule", one_of(*RECOVERY_RULES), "intact or legacy"),
    ("intact_ppl_factor", or_none(positive), "null or a finite number > 0"),
    ("max_utility_drop", unit_interval, "a number in [0, 1]"),
    ("data.source", one_of(*DATA_SOURCES), "forget, questions, retain or unrelated"),
    ("data.n_samples", or_none(positive_int), "null or an integer >= 1"),
    ("undo", one_of(None, "collapse", "spectral"), "null, collapse or spectral"),
    ("param_split", one_of(None, *PARAM_SPLITS), "null or muon"),
    ("lora_placement", one_of(*LORA_PLACEMENTS), "around, inner, comp or parts"),
    ("recover_metric", one_of(*RECOVER_METRICS), "hazard_acc, relearned_acc or heldout_acc"),
    ("sharpness_every", or_none(positive_int), "null or an integer >= 1"),
    ("checkpoint_every", or_none(positive_int), "null or an integer >= 1"),
]


def dagger_rule(dagger: dict | None) -> DaggerRule:
    """The `attack.dagger` config as a DaggerRule (its `rule` key is the rule's name)."""
    fields = dict(dagger or {})
    allowed = {"rule"} | {f.name for f in dataclasses.fields(DaggerRule)} - {"name"}
    unknown = set(fields) - allowed
    if unknown:
        raise ConfigError(f"attack.dagger: unknown keys {sorted(unknown)}; allowed rule, ppl_factor, utility_fraction, "
                          "chance, loss_factor, legacy_factor")
    name = fields.pop("rule", DaggerRule.name)
    if name not in DAGGER_RULES:
        raise ConfigError(f"attack.dagger.rule={name!r}: allowed {', '.join(DAGGER_RULES)}")
    return DaggerRule(name, **fields)


def relearn_texts(data, source: str, splits, n_samples: int | None, seed: int,
                  retain_share: float | None = None) -> list[str]:
    """The attacker's fine-tuning text: forget (chosen splits), the hazard questions of the chosen
    splits with their answers (RTT), retain, or unrelated; with `retain_share`, plus retain text
    making up that share of the whole."""
    pools = {"forget": lambda: data.forget_texts(splits), "questions": lambda: data.question_texts(splits),
             "retain": lambda: list(data.retain), "unrelated": lambda: list(data.unrelated)}
    texts = pools[source]()
    if n_samples is not None and n_samples < len(texts):
        texts = random.Random(seed).sample(texts, n_samples)
    if retain_share:
        extra = retain_count(len(texts), retain_share, len(data.retain))
        texts = texts + random.Random(seed + 1).sample(list(data.retain), extra)
    return texts


def retain_count(n_source: int, share: float, available: int) -> int:
    """How many retain items make up `share` of a set holding `n_source` others (at most `available`)."""
    return min(available, round(n_source * share / (1 - share)))


def split_tasks(hazard_tasks: dict[int, str], relearned: set[int]) -> tuple[list[str], list[str]]:
    """(tasks of the relearned splits, tasks of the held-out splits) for the RTT protocol.

    A task shared by a relearned and a held-out split (WMDP: every split is scored on `wmdp_bio`)
    counts as relearned only, so the held-out accuracy never includes trained-on questions.
    """
    rel = sorted({hazard_tasks[s] for s in relearned})
    held = sorted({t for s, t in hazard_tasks.items() if s not in relearned} - set(rel))
    return rel, held


def split_accuracies(point: dict, relearned_tasks: list[str], heldout_tasks: list[str]) -> dict:
    """relearned_acc / heldout_acc: unweighted means of acc/<task> (None when there is no such task)."""
    def mean(tasks):
        values = [point[f"acc/{t}"] for t in tasks if f"acc/{t}" in point]
        return sum(values) / len(values) if values else None
    return {"relearned_acc": mean(relearned_tasks), "heldout_acc": mean(heldout_tasks)}


class Relearn:
    """Fine-tune with `optimizer` (a partial taking parameters) for `steps` steps on `data` text.

    Variants, all config fields (see conf/attack/_base.yaml): `param_split=muon` + `aux_optimizer`
    (Muon on hidden matrices, AdamW on the rest), `peft` (a `peft.LoraConfig`: LoRA instead of full
    fine-tuning; `lora_placement` says where it sits on a SpecDef layer, attacks/lora.py), `trainable` /
    `frozen` (partial fine-tuning, attacks/partial.py), `undo` (an attacker-side undo of the defense
    before fine-tuning) and `sharpness_every` (log the top Hessian eigenvalue beside 2/lr).
    """

    def __init__(self, name: str, optimizer: Callable, steps: int, batch_size: int, data: dict,
                 eval_every: int, grad_accum: int = 1, schedule: str = "constant", warmup_steps: int = 0,
                 max_grad_norm: float | None = None, dagger: dict | None = None, seed: int = 0,
                 second_order: bool = False, recover_threshold: float | None = None,
                 param_split: str | None = None, aux_optimizer: Callable | None = None, peft=None,
                 undo: str | None = None, sharpness_every: int | None = None, sharpness_iters: int = 20,
                 recover_metric: str = "hazard_acc", stop_when_recovered: bool = False,
                 recovery_rule: str = "intact", intact_ppl_factor: float | None = None, max_utility_drop: float = 0.05,
                 checkpoint_every: int | None = None, lora_placement: str = "around",
                 trainable: list[str] | None = None, frozen: list[str] | None = None, partial: str | None = None):
        self.name = name
        self.optimizer, self.param_split, self.aux_optimizer = optimizer, param_split, aux_optimizer
        self.steps, self.batch_size, self.grad_accum = steps, batch_size, grad_accum
        self.data = _check_data(data)
        self.eval_every = eval_every
        self.schedule, self.warmup_steps, self.max_grad_norm = schedule, warmup_steps, max_grad_norm
        self.dagger = dagger_rule(dagger)
        self.intact_ppl_factor = intact_ppl_factor  # None: each dagger rule's own perplexity bound
        self.seed = seed
        self.second_order = second_order  # forces create_graph; second-order optimizers get it anyway
        self.recover_threshold = recover_threshold  # None: the undefended model's recover_metric (default_threshold)
        self.recover_metric = _check_choice("recover_metric", recover_metric, RECOVER_METRICS)
        self.stop_when_recovered = stop_when_recovered
        self.rule = RecoveryRule(_check_choice("recovery_rule", recovery_rule, RECOVERY_RULES), self.recover_metric,
                                 self.intact_bound(self.dagger), max_utility_drop)
        self.peft = _check_peft(peft)
        self.lora_placement = _check_choice("lora_placement", lora_placement, LORA_PLACEMENTS)
        self.lora_defended: list[str] = []  # defended layers the adapters were placed on (recorded)
        self.undo = _check_undo(undo)
        self.trainable, self.frozen = check_patterns("trainable", trainable), check_patterns("frozen", frozen)
        self.partial = _check_partial(partial, self.trainable, self.frozen, self.peft)
        self.selection: dict = {}  # what was trained (recorded)
        self.sharpness_every, self.sharpness_iters = _check_sharpness(sharpness_every, eval_every), sharpness_iters
        self.checkpoint_every = checkpoint_every  # save for resumption every N steps (at evaluated steps)

    # Hooks (harness/hooks.py): what the runner asks of the attack before anything is built.

    @staticmethod
    def check_config(cfg, node, key: str) -> None:
        check_rules(node, RULES, f"{key}.")
        _check_splits(cfg, node)
        check_optimizer_config(node)
        _check_recovery_rule(cfg, node)
        _check_split_metric(cfg, node)
        if node.get("dagger") is not None:
            dagger_rule(node.get("dagger"))  # unknown keys, before any model loads

    needs_double_backward = staticmethod(config_needs_double_backward)

    @staticmethod
    def memory_stage(node, shape: Shape, c: Costs, defended: Defended) -> Stage:
        """Per rank: the (defended) model, what the optimizer trains and keeps, the activations."""
        undo = bool(node.get("undo"))  # the attacker removes what the defense added before fine-tuning
        peft, optimizer = node.get("peft"), node.optimizer
        params, trained, states = optimizer_counts(
            node, shape.params + (0 if undo else defended.extra_params), lambda: shape.matrix_params,
            lambda: lora_params(shape, list(peft.target_modules), int(peft.r)))
        if forward_only(optimizer):  # no gradients; forward passes without a graph (logits only)
            gradients, activations = 0.0, c.per_token(node.batch_size, 2 * shape.vocab)
        else:
            gradients = c.weights(trained)
            activations = c.activations(node.batch_size, extra_per_block=0 if undo else defended.extra_per_block,
                                        double_backward=config_needs_double_backward(node))
        return Stage(f"{node.name}{' + lora' if peft is not None else ''}", {
            "weights": c.weights(params), "gradients": gradients, "optimizer": c.weights(states),
            "fsdp gathered": c.working_set(not forward_only(optimizer)), "activations": activations})

    def prepare(self, model):
        """The model fine-tuning starts from: defense undone (if asked), then LoRA-wrapped (if asked)."""
        if self.undo is not None:
            from attacks.undo import apply_undo  # lazy: the undo module pulls in the SpecDef tools
            model = apply_undo(model, self.undo)
        if self.trainable is not None or self.frozen is not None:
            self.selection = apply_partial(model, self.trainable, self.frozen)
        if self.peft is not None:
            from peft import get_peft_model
            from attacks.lora import place_adapters  # lazy: imports peft
            config, self.lora_defended = place_adapters(model, self.peft, self.lora_placement)
            model = get_peft_model(model, config)
        self.selection = {**self.selection, "trainable_parameters": sum(p.numel() for p in trainable_params(model)),
                          "model_parameters": sum(p.numel() for p in model.parameters())}
        return model

    def build_optimizers(self, model) -> list[torch.optim.Optimizer]:
        return build_optimizers(model, self.optimizer, self.param_split, self.aux_optimizer)

    def __call__(self, model, tokenizer, data, evaluator, *, start: dict, threshold: float | None,
                 on_eval: Callable[[dict], None] | None = None, checkpoint_dir=None) -> AttackResult:
        torch.manual_seed(self.seed)
        self.check_start(start)
        model = self.prepare(model)
        # dist=fsdp: fine-tune a sharded twin (the attacked weights are not needed afterwards)
        with distributed.sharded(model, write_back=False) as model:
            return self.fine_tune(model, tokenizer, data, evaluator, start=start, threshold=threshold,
                                  on_eval=on_eval, checkpoint_dir=checkpoint_dir)

    def fine_tune(self, model, tokenizer, data, evaluator, *, start: dict, threshold: float | None,
                  on_eval: Callable[[dict], None] | None, checkpoint_dir) -> AttackResult:
        batches, loss_fn, probe = self.training_data(tokenizer, data)
        tasks = self.split_tasks(data)
        optimizers = self.build_optimizers(model)
        self.check_forward_only(optimizers)
        set_mode(optimizers, "train")
        schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(self.schedule, self.warmup_steps, self.steps))
                      for o in optimizers]
        create_graph = self.second_order or any(needs_double_backward(o) for o in optimizers)

        def measure(step: int, loss: float | None) -> dict:
            with evaluation_point(optimizers):
                metrics = start if step == 0 and self.undo is None else evaluator(model)
                point = {"step": step, "loss": loss, **metrics, **split_accuracies(metrics, *tasks)}
                if self.sharpness_every and step % self.sharpness_every == 0:
                    point.update(self.sharpness(model, probe, current_lr(optimizers)))
            # dist=fsdp: forwards without a backward leave weights gathered (the root's; with
            # reshard_after_forward=false every block's), which MeZO's next perturbation of the shards
            # would not reach: its first loss would be that of θ with part of the model unperturbed
            distributed.reshard(model)
            if on_eval:
                on_eval(point)
            return point

        checkpoint = AttackCheckpoint(checkpoint_dir, self.checkpoint_every)
        resumed = checkpoint.load(model, optimizers, schedulers)
        if resumed:
            trajectory, done_losses, start_step = resumed["trajectory"], resumed["losses"], resumed["step"]
            for _ in range(start_step * self.grad_accum):  # the data order continues where it stopped
                next(batches)
        else:
            trajectory, done_losses, start_step = [measure(0, None)], [], 0
        stop: dict = {"reason": None}  # why the attack could not go on (a MeZO probe overflow)

        def first_loss() -> float | None:
            losses = done_losses + loop_losses
            return losses[0] if losses else None

        def on_step(step: int, loss: float) -> bool:
            if step % self.eval_every and step != self.steps:
                return False
            point = measure(step, loss)
            trajectory.append(point)
            daggers = self.daggers(trajectory, start, first_loss())
            if daggers[self.dagger.name][0] == step:
                log.info("%s: † at step %d (%s)", self.name, step, daggers[self.dagger.name][1])
            if all(at is not None for at, _ in daggers.values()):
                return True  # every rule's verdict is in: nothing more to record
            recovered = self.rule.recovered(point, start, threshold)
            if checkpoint.due(step):
                checkpoint.save(step, model, optimizers, schedulers,
                                {"trajectory": trajectory, "losses": done_losses + losses_so_far(step)})
            return self.stop_when_recovered and recovered

        def losses_so_far(step: int) -> list[float]:
            return loop_losses[: step - start_step]

        loop_losses: list[float] = []

        with warnings.catch_warnings():
            # torch warns on every create_graph backward about a param<->grad cycle; train_loop breaks
            # it (zero_grad(set_to_none=True) after each step), so the warning is noise here.
            warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
            loop = train_loop(model, batches, loss_fn, optimizers, schedulers=schedulers, steps=self.steps,
                              grad_accum=self.grad_accum, create_graph=create_graph,
                              max_grad_norm=self.max_grad_norm, on_step=on_step, desc=f"attack {self.name}",
                              start_step=start_step, losses_out=loop_losses)
        loop.losses = done_losses + loop.losses
        if resumed:
            log.info("%s: continued from step %d", self.name, start_step)
        overflow = probe_overflow(optimizers) if loop.nonfinite_step is not None else None
        if overflow is not None:
            # MeZO: L(θ ± εz) not finite, so no step was taken and θ (restored) is that of the last step taken,
            # whose own loss was never computed: evaluated (unless it just was), a † only if θ itself broke
            if trajectory[-1]["step"] != loop.steps:
                trajectory.append(measure(loop.steps, None))
            point = trajectory[-1]
            point["probe_losses"] = [overflow["loss_plus"], overflow["loss_minus"]]
            stop["reason"] = (f"probe overflow: non-finite loss at θ ± εz (L+ = {overflow['loss_plus']:.4g}, "
                             f"L- = {overflow['loss_minus']:.4g}) in step {overflow['step']}; "
                             "θ restored, no step taken")
            log.info("%s: stopped after step %d (%s)", self.name, loop.steps, stop["reason"])
        elif loop.nonfinite_step is not None:
            trajectory.append(measure(loop.nonfinite_step, float("nan")))
        set_mode(optimizers, "eval")  # the attacked model is the one that was evaluated
        checkpoint.clear()
        result = self.result(trajectory, start, threshold, loop, create_graph)
        result.stop_reason = stop["reason"]
        result.extra["resumed_from_step"] = start_step if resumed else None
        return result

    def training_data(self, tokenizer, data) -> tuple:
        """(batches, loss, sharpness probe) of the fine-tuning data: text through the tokenizer and the LM
        loss, or the data's own batches and loss where it brings them (the image world, harness/images.py).
        The probe is a fixed batch for the sharpness estimate, so points are comparable (None: not logged)."""
        own = getattr(data, "attack_batches", None)
        if own is not None:
            if self.sharpness_every:
                raise ConfigError(f"attack.sharpness_every={self.sharpness_every}: allowed null on "
                                  f"{type(data).__name__} (the sharpness estimate builds a language-model loss)")
            return own(self.data, self.batch_size, self.seed), data.loss, None
        texts = relearn_texts(data, self.data["source"], list(self.data.get("splits") or []),
                              self.data.get("n_samples"), self.seed, self.data.get("retain_share"))
        probe = (next(batch_iterator(tokenizer, texts, self.batch_size, data.max_length, self.seed + 1))
                 if self.sharpness_every else None)
        return batch_iterator(tokenizer, texts, self.batch_size, data.max_length, self.seed), lm_loss, probe

    def split_tasks(self, data) -> tuple[list[str], list[str]]:
        """(tasks of the relearned splits, tasks of the held-out ones): none relearned for retain or unrelated text."""
        relearned = set(self.data.get("splits") or []) if self.data["source"] in SPLIT_SOURCES else set()
        return split_tasks(data.hazard_tasks, relearned)

    def default_threshold(self, base: dict, data) -> float | None:
        """The threshold when `recover_threshold` is null: the undefended model's own `recover_metric`
        ("fully recovered"), so heldout_acc is compared with the undefended held-out accuracy."""
        return {**base, **split_accuracies(base, *self.split_tasks(data))}.get(self.recover_metric)

    def check_start(self, start: dict) -> None:
        """The intact rule compares utility with the start's: an evaluation without it cannot apply it."""
        utility = start.get("utility_acc")
        if self.rule.name == "intact" and (utility is None or not math.isfinite(utility)):
            raise ConfigError(f"attack.recovery_rule=intact with no utility accuracy at the start ({utility!r}: "
                              "the eval has no utility tasks); allowed legacy, or an eval with utility tasks")

    def check_forward_only(self, optimizers) -> None:
        """A zeroth-order optimizer (MeZO) computes no gradient: nothing to clip, no graph to keep."""
        if not any(getattr(o, "forward_only", False) for o in optimizers):
            return
        for key, value in (("max_grad_norm", self.max_grad_norm), ("second_order", self.second_order),
                           ("param_split", self.param_split)):
            if value:
                raise ConfigError(f"attack.{key}={value!r} with a forward-only optimizer "
                                  f"({type(optimizers[0]).__name__}): allowed null/false (it takes no gradient)")

    def daggers(self, trajectory: list[dict], start: dict, first_loss: float | None) -> dict:
        """{rule: (step, reason)} of each dagger rule's first † in `trajectory` ((None, None): none yet)."""
        return {name: dataclasses.replace(self.dagger, name=name).first(trajectory, start, first_loss)
                for name in DAGGER_RULES}

    def intact_bound(self, dagger: DaggerRule) -> float:
        """The perplexity bound of an intact model under `dagger`: intact_ppl_factor, else the rule's own."""
        return self.intact_ppl_factor if self.intact_ppl_factor is not None else dagger.perplexity_factor

    def outcome_under(self, name: str, trajectory, start, threshold, daggers: dict, steps: int) -> tuple[int | None, dict]:
        """(first recovery, outcome) of the run read under dagger rule `name` (its own intact bound)."""
        dagger = dataclasses.replace(self.dagger, name=name)
        rule = dataclasses.replace(self.rule, ppl_factor=self.intact_bound(dagger))
        recovered = rule.first_recovery(trajectory, start, threshold)
        return recovered, first_event(trajectory, recovered, daggers[name][0], steps)

    def result(self, trajectory, start, threshold, loop, create_graph) -> AttackResult:
        first_loss = loop.losses[0] if loop.losses else None
        daggers = self.daggers(trajectory, start, first_loss)
        outcomes = {name: self.outcome_under(name, trajectory, start, threshold, daggers, loop.steps)
                    for name in DAGGER_RULES}
        by_rule = {name: dataclasses.replace(self.rule, name=name).first_recovery(trajectory, start, threshold)
                   for name in RECOVERY_RULES}
        step, reason = daggers[self.dagger.name]
        extra = {
            "steps_to_recover_by_rule": by_rule,  # both definitions, so one sweep can compare them
            # every dagger rule's verdict, so a table can be rebuilt under either (reporting --dagger-rule)
            "dagger_by_rule": {name: {"step": at, "reason": why} for name, (at, why) in daggers.items()},
            "outcome_by_rule": {name: outcome for name, (_, outcome) in outcomes.items()},
            "first_loss": first_loss,  # the broken rule's reference for an exploding training loss
            "relearned_splits": sorted(self.data.get("splits") or []) if self.data["source"] in SPLIT_SOURCES else [],
            "steps_to_recover_relearned": steps_to_recover(trajectory, threshold, "relearned_acc"),
            "steps_to_recover_heldout": steps_to_recover(trajectory, threshold, "heldout_acc"),
            "best_relearned_acc": best(trajectory, "relearned_acc"),
            "best_heldout_acc": best(trajectory, "heldout_acc"),
            "recover_metric": self.recover_metric, "stopped_when_recovered": loop.stopped_early and reason is None,
            "create_graph": create_graph, "peft": self.peft is not None, "undo": self.undo,
            "lora_placement": self.lora_placement if self.peft is not None else None,
            "lora_defended_layers": self.lora_defended,
            "partial": self.partial, "trainable": self.trainable, "frozen": self.frozen, **self.selection,
        }
        recovered, outcome = outcomes[self.dagger.name]
        return AttackResult(trajectory=trajectory, steps_to_recover=recovered,
                            threshold=threshold, diverged=step is not None,
                            divergence_step=step, divergence_reason=reason, steps=loop.steps,
                            final=dict(trajectory[-1]), best_hazard_acc=best(trajectory, "hazard_acc"),
                            tokens_per_second=loop.tokens_per_second, train_seconds=loop.train_seconds,
                            losses=loop.losses, extra=extra, recovery_rule=dataclasses.asdict(self.rule),
                            dagger_rule=dataclasses.asdict(self.dagger), outcome=outcome)

    def sharpness(self, model, batch: dict, lr: float) -> dict:
        """Top Hessian eigenvalue of the relearning loss on a fixed batch, beside the edge-of-stability
        bound 2/lr (specdef.hessian builds the loss under the math attention kernel itself)."""
        from specdef.hessian import sharpness  # lazy: only runs that log sharpness need it
        out = sharpness(model, batch, lr=lr, iters=self.sharpness_iters)
        return {"lambda_max": float(out["lambda_max"]), "two_over_lr": float(out["two_over_lr"])}


def probe_overflow(optimizers) -> dict | None:
    """The step a zeroth-order optimizer (MeZO) stopped at because its probe losses L(θ ± εz) were not
    finite ({step, loss_plus, loss_minus}), or None: the loss at θ itself was never computed."""
    return next((o.probe_overflow for o in optimizers if getattr(o, "probe_overflow", None)), None)


def set_mode(optimizers, mode: str) -> None:
    """Schedule-free optimizers train at one point and are evaluated at another (their running
    average): `train()` / `eval()` move the parameters between the two. Others have no such modes."""
    for opt in optimizers:
        switch = getattr(opt, mode, None)
        if callable(switch):
            switch()


@contextlib.contextmanager
def evaluation_point(optimizers):
    set_mode(optimizers, "eval")
    try:
        yield
    finally:
        set_mode(optimizers, "train")


# Checks of the config before any model loads (`Relearn.check_config`)

def _check_splits(cfg, attack) -> None:
    n = get(cfg, "data.n_splits")
    if n is MISSING:
        n = get(cfg, "data.world.n_splits")
    splits = get(attack, "data.splits")
    if n is MISSING or splits is MISSING or splits is None:
        return
    for s in splits:
        if not (isinstance(s, int) and 0 <= s < n):
            raise ConfigError(f"attack.data.splits={list(splits)}: allowed hazard split indices 0..{n - 1}")


def _check_recovery_rule(cfg, attack) -> None:
    """The intact rule bounds the utility drop: it needs utility tasks to measure it."""
    tasks = get(cfg, "eval.utility_tasks")
    if attack.get("recovery_rule") == "intact" and tasks is not MISSING and tasks is not None and not len(tasks):
        raise ConfigError("attack.recovery_rule=intact with eval.utility_tasks=[]: allowed attack.recovery_rule=legacy, "
                          "or utility tasks to measure the model's utility")


def _check_split_metric(cfg, attack) -> None:
    """relearned_acc / heldout_acc are the accuracies of the splits' own tasks (at paper scale the wmdp_bio
    folds): an explicit eval.hazard_tasks without them would leave both null in every record."""
    metric, tasks = attack.get("recover_metric"), get(cfg, "eval.hazard_tasks")
    if metric not in ("relearned_acc", "heldout_acc") or tasks in (None, MISSING):
        return
    wanted = split_task_names(get(cfg, "data"))
    if wanted is not None and not set(wanted.values()) <= set(tasks):
        raise ConfigError(f"attack.recover_metric={metric} with eval.hazard_tasks={list(tasks)}: the splits are scored "
                          f"by their own tasks {sorted(set(wanted.values()))}; allowed eval.hazard_tasks=null "
                          "(as experiment=heldout and experiment=rtt set) or a list containing them")


# Checks of the arguments when the attack is built

def _check_data(data) -> dict:
    data = dict(data)
    unknown = set(data) - DATA_KEYS
    if unknown:
        raise ConfigError(f"attack.data has unknown keys {sorted(unknown)}: allowed {sorted(DATA_KEYS)}")
    if data.get("source") not in DATA_SOURCES:
        raise ConfigError(f"attack.data.source={data.get('source')!r}: allowed {', '.join(DATA_SOURCES)}")
    share = data.get("retain_share")
    if share is not None and not (isinstance(share, (int, float)) and not isinstance(share, bool) and 0 <= share < 1):
        raise ConfigError(f"attack.data.retain_share={share!r}: allowed null or a number in [0, 1)")
    if data["source"] in SPLIT_SOURCES and not data.get("splits"):
        raise ConfigError(f"attack.data.splits is empty: relearning on {data['source']} needs at least one split")
    return data


def _check_peft(peft):
    if peft is None:
        return None
    from peft import PeftConfig
    if not isinstance(peft, PeftConfig):
        raise ConfigError(f"attack.peft={peft!r}: allowed null or a peft config node such as "
                          "conf/attack/peft/lora.yaml (select it with `attack/peft=lora`)")
    return peft


def _check_partial(partial, trainable, frozen, peft):
    if (trainable is not None or frozen is not None) and peft is not None:
        raise ConfigError("attack.trainable/attack.frozen with attack.peft: allowed one of them (LoRA trains its "
                          "adapters; choose them with attack.peft.target_modules, or add attack.peft.modules_to_save)")
    if partial is not None and trainable is None and frozen is None:
        # a preset whose patterns resolved to null, e.g. freeze_defended with defense.layers=null
        raise ConfigError(f"attack.partial={partial!r} selects no pattern (attack.trainable and attack.frozen are "
                          "null); allowed explicit attack.trainable / attack.frozen patterns")
    return partial


def _check_choice(key: str, value, allowed) -> str:
    if value not in allowed:
        raise ConfigError(f"attack.{key}={value!r}: allowed {', '.join(allowed)}")
    return value


def _check_undo(undo):
    if undo is not None:
        from attacks.undo import UNDO  # lazy: pulls in the SpecDef tools
        if undo not in UNDO:
            raise ConfigError(f"attack.undo={undo!r}: allowed {', '.join('null' if u is None else u for u in UNDO)}")
    return undo


def _check_sharpness(every, eval_every: int):
    # Sharpness is measured on evaluated points only; a period that is not a multiple of eval_every
    # would silently skip most of the requested measurements.
    if every is not None and (not isinstance(every, int) or every < 1 or every % eval_every):
        raise ConfigError(f"attack.sharpness_every={every!r}: allowed null or a positive multiple of "
                          f"attack.eval_every={eval_every}")
    return every
