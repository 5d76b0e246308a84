"""LoRA (peft) relearning on the tiny ViT (`attack/peft=lora` with experiment=vision), plain and on SpecDef.

The adapter config is conf/attack/peft/lora.yaml, whose task type and targets come from the model config's
`lora` section (conf/model/tiny_vit.yaml: no peft task type, the ViT's attention and MLP projections);
on SpecDef's defended layers the adapter sits where `attack.lora_placement` says (attacks/lora.py), the
mechanism the language track uses."""
from __future__ import annotations

import pytest

from tests.conftest import compose_cfg

NAIVE = "model.spec.exclude_hazard=[0,1]"
LORA = ("attack/peft=lora", "attack=adam", "lr=1e-2", "attack.recover_threshold=0.9")


def vision_run(tmp_path, *overrides):
    from runner.vision import run
    cfg = compose_cfg("experiment=vision", f"paths.output_root={tmp_path}", "threads=1", *overrides)
    return run(cfg, tmp_path / "run")


def test_lora_config_follows_the_model():
    from hydra.utils import instantiate
    vit = instantiate(compose_cfg("experiment=vision", "attack/peft=lora").attack.peft)
    assert vit.task_type is None and set(vit.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"}
    llama = instantiate(compose_cfg("attack/peft=lora").attack.peft)  # the language track's, unchanged
    assert llama.task_type == "CAUSAL_LM" and "down_proj" in llama.target_modules


def test_lora_relearns_on_the_vit_and_around_specdef_follows_the_undefended_run(tmp_path):
    plain = vision_run(tmp_path / "plain", NAIVE, *LORA)
    attack = plain["attack"]
    extra = attack["extra"]
    assert extra["peft"] and extra["lora_defended_layers"] == []
    assert extra["trainable_parameters"] < 0.2 * extra["model_parameters"]  # adapters only
    assert attack["final"]["hazard_acc"] >= 0.5 and attack["final"]["utility_acc"] >= 0.85
    around = vision_run(tmp_path / "around", NAIVE, *LORA, "defense=specdef_vit")["attack"]
    assert around["extra"]["lora_placement"] == "around"
    assert around["extra"]["lora_defended_layers"] == ["vit.layers.0.mlp.fc2", "vit.layers.1.mlp.fc2"]
    # the adapter beside each defended layer never sees the amplified weight: the undefended trajectory, up to
    # SpecDef's float drift, which Adam at 1e-2 amplifies over the run (0.79 against 0.87 at step 90)
    for a, b in zip(attack["trajectory"][:6], around["trajectory"][:6]):
        assert a["step"] == b["step"] and a["hazard_acc"] == pytest.approx(b["hazard_acc"], abs=0.03)
    assert around["outcome"]["kind"] != "diverged" and around["final"]["hazard_acc"] >= 0.5


def test_lora_on_the_compensation_of_specdef_breaks_the_vit(tmp_path):
    """`lora_placement=comp`: the adapter's input is amplified by alpha, so the first steps break the model."""
    record = vision_run(tmp_path, NAIVE, *LORA, "defense=specdef_vit", "attack.lora_placement=comp")
    assert record["attack"]["outcome"]["kind"] == "diverged" and record["attack"]["outcome"]["step"] == 10
