"""LoRA on a SpecDef model: peft's default targets run, each placement puts the adapter where it
says, and LoRA on layers SpecDef does not defend follows the undefended model's trajectory."""
from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from harness.errors import ConfigError
from runner.validate import validate
from specdef.core import transform
from tests.conftest import compose_cfg
from tests.test_attacks import FixedEvaluator, snapshot

DEFENDED = "model.layers.*.mlp.down_proj"
# where the adapter of layer 0's defended down_proj lives under each placement
ADAPTER_OF = {"around": ["down_proj"], "inner": ["down_proj.inner"], "comp": ["down_proj.comp"],
              "parts": ["down_proj.inner", "down_proj.comp"]}


def lora_attack(*overrides: str):
    return instantiate(compose_cfg("attack=adam", "attack/peft=lora", "attack.eval_every=1000",
                                   "attack.checkpoint_every=null", *overrides).attack)


def defended(tiny_model, alpha: float = 1e4):
    model, tokenizer = tiny_model
    transform(model, alpha=alpha, k=8, layers=[DEFENDED])
    return model, tokenizer


@pytest.mark.parametrize("placement", list(ADAPTER_OF))
def test_lora_with_default_targets_runs_on_specdef_at_each_placement(placement, tiny_model, data):
    model, tokenizer = defended(tiny_model)
    base = snapshot(model)
    fixed = FixedEvaluator()
    attack = lora_attack("attack.steps=1", "attack.batch_size=8", "lr=1e-3", f"attack.lora_placement={placement}")
    result = attack(model, tokenizer, data, fixed, start=fixed(model), threshold=None)
    assert result.steps == 1 and torch.isfinite(torch.tensor(result.losses)).all()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    layer0 = {n.split("model.layers.0.mlp.")[1].rsplit(".lora_", 1)[0]
              for n in trained if "model.layers.0.mlp.down_proj" in n}
    assert layer0 == set(ADAPTER_OF[placement])
    assert all("lora_" in n for n in trained)  # the defended weights themselves stay frozen
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base[n.replace("base_model.model.", "").replace(".base_layer", "")]), n
    assert result.extra["lora_placement"] == placement
    assert result.extra["lora_defended_layers"] == [f"model.layers.{i}.mlp.down_proj" for i in range(4)]


def test_the_adapter_around_a_defended_layer_adds_BAx_to_its_output(tiny_model, data):
    from peft import get_peft_model
    from attacks.lora import LoraAroundSpecDef, place_adapters
    model, _ = defended(tiny_model)
    layer = model.model.layers[0].mlp.down_proj
    config, touched = place_adapters(model, instantiate(compose_cfg("attack/peft=lora").attack.peft), "around")
    peft_model = get_peft_model(model, config)
    wrapped = peft_model.base_model.model.model.layers[0].mlp.down_proj
    assert isinstance(wrapped, LoraAroundSpecDef) and wrapped.base_layer is layer
    torch.nn.init.normal_(wrapped.lora_B["default"].weight)  # B = 0 at init would hide a wrong sum
    x = torch.randn(3, layer.inner.in_features)
    a, b = wrapped.lora_A["default"].weight, wrapped.lora_B["default"].weight
    expected = layer.comp(layer.inner(x)) + (x @ a.T @ b.T) * wrapped.scaling["default"]
    torch.testing.assert_close(wrapped(x), expected)


@pytest.mark.parametrize("targets", ["[q_proj,k_proj,v_proj,o_proj]", "[down_proj]"])
def test_lora_beside_specdef_follows_the_undefended_trajectory(targets, tiny_model, tiny_path, data):
    """The bypass: LoRA on undefended layers (attention) or around the defended layer meets the
    undefended loss landscape. float64, so SpecDef's own rounding (1.8e-4 relative logit error at
    alpha=1e4 in float32) does not blur the exactness being tested."""
    from harness.models import from_pretrained
    fixed = FixedEvaluator()

    def losses(model, tokenizer):
        attack = lora_attack("attack.steps=20", "attack.batch_size=16", "lr=1e-3",
                             f"attack.peft.target_modules={targets}")
        return torch.tensor(attack(model.double(), tokenizer, data, fixed, start=fixed(model), threshold=None).losses,
                            dtype=torch.float64)

    undefended = losses(*from_pretrained(tiny_path))
    against_specdef = losses(*defended(tiny_model))
    assert len(undefended) == 20
    torch.testing.assert_close(against_specdef, undefended, rtol=0, atol=1e-4)


def test_a_bad_placement_is_one_line():
    with pytest.raises(ConfigError, match="attack.lora_placement='middle': allowed around, inner, comp or parts"):
        validate(compose_cfg("attack=adam", "attack.lora_placement=middle"))
