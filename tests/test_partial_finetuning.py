"""Partial fine-tuning (`attack.trainable` / `attack.frozen` and their presets): the optimizer gets
exactly the selected parameters, a pattern that selects nothing fails in one line before any work."""
from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from harness.errors import ConfigError
from runner.pipeline import run
from specdef.core import transform
from tests.conftest import CACHE_DIR, compose_cfg
from tests.test_attacks import FixedEvaluator, snapshot


def attack_on(model, tokenizer, data, *overrides: str):
    attack = instantiate(compose_cfg("attack=adam", "attack.steps=1", "attack.eval_every=1000",
                                     "attack.checkpoint_every=null", "attack.batch_size=8", "lr=1e-3",
                                     *overrides).attack)
    fixed = FixedEvaluator()
    before = snapshot(model)
    result = attack(model, tokenizer, data, fixed, start=fixed(model), threshold=None)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    return result, changed


@pytest.mark.parametrize("preset, trained", [
    ("attention", lambda n: ".self_attn." in n),
    ("embeddings_norms", lambda n: "embed_tokens" in n or "norm" in n),
])
def test_presets_train_what_they_name(preset, trained, tiny_model, data):
    model, tokenizer = tiny_model
    result, changed = attack_on(model, tokenizer, data, f"attack/partial={preset}")
    expected = {n for n, _ in model.named_parameters() if trained(n)}
    assert expected and changed == expected
    assert result.extra["partial"] == preset
    assert result.extra["trainable_parameters"] == sum(p.numel() for n, p in model.named_parameters() if n in expected)


def test_freeze_defended_keeps_both_parts_of_every_specdef_layer(tiny_model, data):
    model, tokenizer = tiny_model
    transform(model, alpha=1e4, k=8, layers=["model.layers.*.mlp.down_proj"])
    result, changed = attack_on(model, tokenizer, data, "defense=specdef", "attack/partial=freeze_defended")
    names = [n for n, _ in model.named_parameters()]
    defended = {n for n in names if ".mlp.down_proj." in n}
    assert len(defended) == 8  # inner and comp of four blocks
    assert changed == set(names) - defended
    assert result.extra["frozen"] == ["model.layers.*.mlp.down_proj"]


def test_trainable_minus_frozen_and_regexes(tiny_model, data):
    model, tokenizer = tiny_model
    _, changed = attack_on(model, tokenizer, data, "attack.trainable=[model.layers.1.*]",
                           "attack.frozen=['re:.*\\.(q|k)_proj']")
    assert changed == {n for n, _ in model.named_parameters()
                       if n.startswith("model.layers.1.") and "q_proj" not in n and "k_proj" not in n}


@pytest.mark.parametrize("override, message", [
    ("attack.trainable=[model.layers.*.mlp.dwn_proj]",
     "attack.trainable='model.layers.*.mlp.dwn_proj': matches no module or parameter of the model; allowed"),
    ("attack.frozen=['re:(']", "attack.frozen='re:(': not a regular expression"),
])
def test_a_pattern_matching_nothing_stops_the_run_before_any_work(override, message, tmp_path, monkeypatch):
    monkeypatch.setattr("runner.pipeline.build_evaluator", lambda *a, **k: pytest.fail("evaluation started"))
    cfg = compose_cfg("attack=adam", override, f"paths.cache_dir={CACHE_DIR}",
                      f"paths.record_store={tmp_path / 'records'}")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("*", r"\*")) as info:
        run(cfg, tmp_path / "run")
    assert "\n" not in str(info.value)


def test_patterns_may_name_the_parts_specdef_will_add(tiny_model):
    from attacks.partial import preflight
    model, _ = tiny_model
    preflight(compose_cfg("attack=adam", "attack.frozen=[model.layers.*.mlp.down_proj.comp]").attack, model)
    with pytest.raises(ConfigError, match="attack.frozen='model.layers.*.mlp.down_proj.middle'"):
        preflight(compose_cfg("attack=adam", "attack.frozen=[model.layers.*.mlp.down_proj.middle]").attack, model)


def test_partial_with_lora_is_refused_in_one_line():
    with pytest.raises(Exception) as info:
        instantiate(compose_cfg("attack=adam", "attack/peft=lora", "attack/partial=attention").attack)
    cause = info.value if isinstance(info.value, ConfigError) else info.value.__cause__
    assert isinstance(cause, ConfigError) and "attack.trainable/attack.frozen with attack.peft" in str(cause)
