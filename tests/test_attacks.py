"""Relearning attacks: the five optimizers, LoRA, undo, sharpness logging, divergence, the RTT split
accounting, config checks, a Hydra multirun, and relearning a never-seen split to >= 0.8."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from attacks.optimizers import config_needs_double_backward, muon_split
from attacks.relearn import Relearn, split_accuracies, split_tasks
from harness.outcome import steps_to_recover
from harness.errors import ConfigError
from harness.models import from_pretrained
from tests.conftest import compose_cfg

REPO = Path(__file__).resolve().parents[1]
OPTIMIZERS = ["sgd", "adam", "sophia", "muon", "adahessian"]


def make_attack(*overrides: str) -> Relearn:
    return instantiate(compose_cfg(*overrides).attack)


class FixedEvaluator:
    """Stands in for lm-eval where only the training plumbing is under test; counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, model) -> dict:
        self.calls += 1
        return {"acc/synthetic_hazard_split0": 0.3, "acc/synthetic_hazard_split1": 0.5,
                "acc/synthetic_utility": 0.9, "hazard_acc": 0.4, "utility_acc": 0.9, "retain_ppl": 3.0}


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_steps_the_pretrained_model(name, tiny_model, data):
    model, tokenizer = tiny_model
    before = snapshot(model)
    fixed = FixedEvaluator()
    attack = make_attack(f"attack={name}", "attack.steps=2", "attack.eval_every=1", "lr=1e-3")
    result = attack(model, tokenizer, data, fixed, start=fixed(model), threshold=None)
    assert result.steps == 2 and len(result.losses) == 2
    assert all(torch.isfinite(torch.tensor(result.losses)))
    changed = [n for n, p in model.named_parameters() if not torch.equal(before[n], p)]
    assert len(changed) == len(before), f"{name} left {set(before) - set(changed)} unchanged"
    assert result.extra["create_graph"] == (name in ("sophia", "adahessian"))
    assert [p["step"] for p in result.trajectory] == [0, 1, 2]


def test_second_order_is_detected_even_when_the_config_forgets_it(tiny_model, data):
    assert config_needs_double_backward(compose_cfg("attack=sophia", "attack.second_order=false").attack)
    assert config_needs_double_backward(compose_cfg("attack=adam", "attack.optimizer._target_="
                                                    "pytorch_optimizer.AdaHessian").attack)
    assert not config_needs_double_backward(compose_cfg("attack=adam").attack)
    model, tokenizer = tiny_model
    fixed = FixedEvaluator()
    attack = make_attack("attack=sophia", "attack.second_order=false", "attack.steps=1", "attack.eval_every=1")
    # SophiaH computes Hutchinson products from p.grad; without create_graph it would raise here
    result = attack(model, tokenizer, data, fixed, start=fixed(model), threshold=None)
    assert result.extra["create_graph"] and result.steps == 1


def test_muon_gets_hidden_matrices_and_adamw_the_rest(tiny_model):
    model, _ = tiny_model
    hidden, rest = muon_split(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert hidden and all(p.ndim == 2 and ".layers." in names[id(p)] for p in hidden)
    rest_names = {names[id(p)] for p in rest}
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= rest_names
    assert all(p.ndim == 1 for p in rest if names[id(p)] not in ("model.embed_tokens.weight", "lm_head.weight"))
    opts = make_attack("attack=muon").build_optimizers(model)
    assert [type(o).__name__ for o in opts] == ["Muon", "AdamW"]
    assert sum(len(g["params"]) for o in opts for g in o.param_groups) == len(list(model.parameters()))


def test_muon_on_the_image_models_keeps_the_head_and_non_matrices_with_adamw():
    """The ViT's classifier is its output head (no get_output_embeddings); a UNet's convolutions are 4-D, which
    torch.optim.Muon refuses: all go to AdamW, Muon takes the attention and MLP matrices."""
    from harness.images import ImageWorldConfig
    from harness import tiny_unet, tiny_vit
    world = ImageWorldConfig()
    for model, muon, adamw in [(tiny_vit.untrained(tiny_vit.TinyViTSpec(), world), "vit.layers.0.mlp.fc2.weight",
                                "classifier.weight"),
                               (tiny_unet.untrained(tiny_unet.TinyUNetSpec(), world), "mid_block.attentions.0.to_q.weight",
                                "conv_in.weight")]:
        hidden, rest = muon_split(model)
        names = {id(p): n for n, p in model.named_parameters()}
        assert muon in {names[id(p)] for p in hidden} and adamw in {names[id(p)] for p in rest}
        assert all(p.ndim == 2 for p in hidden) and "classifier.weight" not in {names[id(p)] for p in hidden}
        assert len(hidden) + len(rest) == len(list(model.parameters()))


def test_lora_trains_only_adapters_and_the_evaluator_scores_the_peft_model(tiny_model, data, evaluator):
    model, tokenizer = tiny_model
    start = evaluator(model)
    base = snapshot(model)
    attack = make_attack("attack=adam", "attack/peft=lora", "attack.steps=2", "attack.eval_every=2", "lr=1e-2")
    result = attack(model, tokenizer, data, evaluator, start=start, threshold=None)
    # get_peft_model injects the adapters into `model` in place; the base weights must be untouched
    trained = {n: p for n, p in model.named_parameters()}
    lora = [n for n in trained if "lora_" in n]
    assert lora and result.extra["peft"]
    for n, p in trained.items():
        if "lora_" not in n:
            assert torch.equal(p, base[n.replace(".base_layer", "")]), n
    assert any(not torch.equal(trained[n], torch.zeros_like(trained[n])) for n in lora if "lora_B" in n)
    final = result.final
    assert 0 <= final["hazard_acc"] <= 1 and final["retain_ppl"] != start["retain_ppl"]


@pytest.mark.parametrize("experiment, targets", [
    (None, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    ("vision", ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]),
    ("diffusion", ["to_q", "to_k", "to_v", "to_out.0"])])
def test_adam_lora_is_adam_on_each_tracks_lora_adapters_under_its_own_name(experiment, targets):
    """attack=adam_lora: `attack=adam attack/peft=lora` but for the name, which the report groups columns by."""
    track = [f"experiment={experiment}"] if experiment else []
    lora, plain = compose_cfg(*track, "attack=adam_lora").attack, compose_cfg(*track, "attack=adam", "attack/peft=lora").attack
    assert (lora.name, plain.name) == ("adam_lora", "adam")
    assert {k: v for k, v in lora.items() if k != "name"} == {k: v for k, v in plain.items() if k != "name"}
    assert list(lora.peft.target_modules) == targets and lora.optimizer._target_ == "torch.optim.Adam"
    assert compose_cfg(*track, "attack=adam_lora", "attack/peft=none").attack.peft is None  # still a group choice


def test_undo_collapse_runs_before_fine_tuning(tiny_model, data):
    from specdef.core import specdef_modules, transform
    model, tokenizer = tiny_model
    transform(model, alpha=100.0, k=4, layers=["*down_proj"])
    assert specdef_modules(model)
    fixed = FixedEvaluator()
    attack = make_attack("attack=adam", "attack.undo=collapse", "attack.steps=1", "attack.eval_every=1")
    result = attack(model, tokenizer, data, fixed, start={**fixed(model), "hazard_acc": 0.1}, threshold=None)
    assert not list(specdef_modules(model))  # collapsed in place, then fine-tuned
    # step 0 is the undone model the fine-tuning starts from, evaluated afresh (not `start`)
    assert fixed.calls == 3 and result.trajectory[0]["hazard_acc"] == 0.4


def test_sharpness_is_logged_beside_two_over_lr(tiny_model, data):
    model, tokenizer = tiny_model
    fixed = FixedEvaluator()
    attack = make_attack("attack=sgd", "lr=0.05", "attack.steps=2", "attack.eval_every=1",
                         "attack.sharpness_every=2", "attack.sharpness_iters=5")
    result = attack(model, tokenizer, data, fixed, start=fixed(model), threshold=None)
    logged = {p["step"]: p for p in result.trajectory if "lambda_max" in p}
    assert sorted(logged) == [0, 2]
    assert all(p["lambda_max"] > 0 and p["two_over_lr"] == pytest.approx(40.0) for p in logged.values())


def test_a_blown_up_run_is_recorded_as_diverged_and_ends_cleanly(tiny_model, data, evaluator):
    model, tokenizer = tiny_model
    start = evaluator(model)
    attack = make_attack("attack=sgd", "lr=1e3", "attack.steps=20", "attack.eval_every=2")
    result = attack(model, tokenizer, data, evaluator, start=start, threshold=None)
    assert result.diverged
    assert result.divergence_reason == "non-finite loss" or "perplexity" in result.divergence_reason
    assert result.divergence_step is not None and result.divergence_step <= 4
    assert result.steps < 20  # stopped, did not keep training a broken model
    assert result.trajectory[-1]["step"] == result.divergence_step
    assert result.final["retain_ppl"] > 2 * start["retain_ppl"] or result.final["loss"] != result.final["loss"]
    assert json.loads(json.dumps(result.summary(), default=str))["diverged"] is True


def test_steps_to_recover_on_a_hand_made_trajectory():
    trajectory = [{"step": 0, "hazard_acc": 0.25}, {"step": 10, "hazard_acc": 0.5, "heldout_acc": None},
                  {"step": 20, "hazard_acc": 0.81}, {"step": 30, "hazard_acc": 0.79}]
    assert steps_to_recover(trajectory, 0.8) == 20
    assert steps_to_recover(trajectory, 0.5) == 10
    assert steps_to_recover(trajectory, 0.9) is None
    assert steps_to_recover(trajectory, None) is None
    assert steps_to_recover(trajectory, 0.1, key="heldout_acc") is None


def test_relearned_and_heldout_accuracy_follow_the_splits():
    synthetic_tasks = {0: "hz0", 1: "hz1", 2: "hz2"}
    rel, held = split_tasks(synthetic_tasks, {1})
    assert (rel, held) == (["hz1"], ["hz0", "hz2"])
    point = {"acc/hz0": 0.2, "acc/hz1": 0.9, "acc/hz2": 0.4}
    assert split_accuracies(point, rel, held) == {"relearned_acc": 0.9, "heldout_acc": pytest.approx(0.3)}
    # WMDP scores every split on the same task: nothing is held out, and it says so
    rel, held = split_tasks({0: "wmdp_bio", 1: "wmdp_bio"}, {0})
    assert (rel, held) == (["wmdp_bio"], [])
    assert split_accuracies({"acc/wmdp_bio": 0.5}, rel, held)["heldout_acc"] is None
    assert split_tasks(synthetic_tasks, set()) == ([], ["hz0", "hz1", "hz2"])  # retain/unrelated text


@pytest.mark.parametrize("overrides, message", [
    (["attack.peft=lora"], "attack.peft='lora': allowed null or a peft config node"),
    (["attack.sharpness_every=3"], "attack.sharpness_every=3: allowed null or a positive multiple"),
    (["attack=muon", "attack.param_split=null"], None),  # aux_optimizer left set: caught at build time
    (["attack.undo=erase"], "attack.undo='erase': allowed null, collapse, spectral"),
    (["attack.recover_metric=loss"], "attack.recover_metric='loss': allowed hazard_acc"),
    (["+attack.data.n_sample=5"], "attack.data has unknown keys ['n_sample']"),
    (["attack.data.splits=[]"], "attack.data.splits is empty"),
])
def test_bad_attack_configs_fail_with_the_key_named(overrides, message, tiny_model):
    if message is None:  # errors that need the model
        with pytest.raises(ConfigError, match="aux_optimizer is set but attack.param_split=null"):
            make_attack(*overrides).build_optimizers(tiny_model[0])
        return
    # Hydra wraps errors raised in constructors; the ConfigError is its cause
    with pytest.raises(InstantiationException) as err:
        make_attack(*overrides)
    assert isinstance(err.value.__cause__, ConfigError) and str(err.value.__cause__).startswith(message)


def test_every_attack_config_instantiates():
    options = sorted(p.stem for p in (REPO / "conf" / "attack").glob("*.yaml") if not p.stem.startswith("_"))
    assert set(OPTIMIZERS) | {"adamw", "none"} <= set(options)
    for name in options:
        attack = make_attack(f"attack={name}")
        assert attack.name == name


def test_a_sweep_job_folder_is_one_folder_whatever_paths_the_command_sets():
    """The job folder's name (hydra.sweep.subdir: job number and overrides) leaves out path-valued overrides,
    whose slashes would nest it; the sweep's values stay in it."""
    from hydra import compose, initialize_config_dir
    from tests.conftest import CONF_DIR
    overrides = ["experiment=vision", "model=vit", "model.path=/models/vit-b16", "data=image_folder",
                 "data.path=/data/cars", "paths.output_root=/abs/out", "attack=sgd", "lr=1e-3"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    assert cfg.hydra.job.override_dirname == "attack=sgd,data=image_folder,lr=1e-3,model=vit"


def test_two_job_multirun_writes_a_record_per_job(tmp_path):
    sweep = tmp_path / "sweep"
    out = subprocess.run([sys.executable, "run.py", "-m", "attack=sgd,adam", "attack.steps=2",
                          "attack.eval_every=1", "eval.limit=20", f"hydra.sweep.dir={sweep}"],
                         cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "SPECDEF_OUTPUTS": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-3000:]
    records = sorted(sweep.glob("*/result.json"))
    assert len(records) == 2, [p.parent.name for p in sweep.iterdir()]
    names = {json.loads(p.read_text())["attack"]["name"] for p in records}
    assert names == {"sgd", "adam"}
    assert all(json.loads(p.read_text())["attack"]["steps"] == 2 for p in records)


# ---- "Done when": relearning a split the model never saw, one lr per optimizer -------------------
# The tiny model pretrained without hazard split 1 answers it near chance (0.25). The lr is the one
# from each optimizer's documented grid (conf/attack/<name>.yaml) that gets there fastest without the
# retain-perplexity dagger: step 40-80 on the machine that measured them. The budget is 150 steps,
# not the configs' 100, so that other CPUs' rounding (the attack runs with native kernels) cannot
# turn a step-80 recovery into a failure; the run stops once split 1 reaches 0.8.
RECOVERY_LR = {"sgd": "3e-3", "adam": "1e-3", "sophia": "2e-2", "muon": "1e-3", "adahessian": "1e-1"}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_relearning_a_never_seen_split_reaches_080(name, naive_model_path, data, evaluator):
    model, tokenizer = from_pretrained(naive_model_path)
    start = evaluator(model)
    assert start["acc/synthetic_hazard_split1"] < 0.45 and start["acc/synthetic_hazard_split0"] > 0.9
    attack = make_attack(f"attack={name}", f"lr={RECOVERY_LR[name]}", "attack.data.splits=[1]", "attack.steps=150",
                         "attack.recover_metric=relearned_acc", "attack.stop_when_recovered=true")
    result = attack(model, tokenizer, data, evaluator, start=start, threshold=0.8)
    assert not result.diverged, result.divergence_reason
    assert result.steps_to_recover is not None, [p["relearned_acc"] for p in result.trajectory]
    assert result.final["acc/synthetic_hazard_split1"] >= 0.8
    assert result.extra["stopped_when_recovered"] or result.steps == attack.steps
    assert [p["step"] for p in result.trajectory][-1] == result.steps_to_recover
