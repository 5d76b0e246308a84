"""LoRA (peft) relearning on the tiny UNet (`attack/peft=lora` with experiment=diffusion), plain and on SpecDef.

The adapter config is conf/attack/peft/lora.yaml, whose task type and targets come from the model config's
`lora` section (conf/model/tiny_unet.yaml: no peft task type, every attention projection as in diffusers'
DreamBooth-LoRA); on SpecDef's defended projections the adapter sits where `attack.lora_placement` says
(attacks/lora.py, registered through peft's LoraConfig._register_custom_module), as on the ViT and the Llama.
Short attacks (20 steps, one evaluation; ~4 s each with the test evaluator's 8 draws per class)."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import compose_cfg
from tests.test_diffusion import CONF, classifier, diffusion_data, evaluator, unet, unet_path  # noqa: F401 (fixtures)

LORA = ("experiment=diffusion", "attack/peft=lora", "attack=adam", "lr=1e-2", "attack.steps=20",
        "attack.eval_every=20", "attack.checkpoint_every=null")


def lora_attack(*overrides):
    from hydra.utils import instantiate
    return instantiate(compose_cfg(*LORA, *overrides).attack)


def relearn(model, data, evaluator, *overrides, start=None):
    start = evaluator(model) if start is None else start
    result = lora_attack(*overrides)(model, None, data, evaluator, start=start, threshold=None)
    return start, result


def test_lora_config_follows_the_unet():
    peft = lora_attack().peft
    assert peft.task_type is None and set(peft.target_modules) == {"to_q", "to_k", "to_v", "to_out.0"}
    assert (peft.r, peft.lora_alpha) == (8, 16)  # the project's values (conf/attack/peft/lora.yaml)


def test_lora_trains_only_its_adapters_and_relearns_the_erased_concept(unet_path, diffusion_data, evaluator):
    """On ESD's erased UNet (as the table's attacker), the adapters alone bring the concept back in part."""
    from baselines.esd import ESD
    from hydra.utils import instantiate
    esd = instantiate(compose_cfg("experiment=diffusion", "defense=esd").defense)
    assert isinstance(esd, ESD)
    model = esd(unet(unet_path), None, diffusion_data)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    start, result = relearn(model, diffusion_data, evaluator)
    extra = result.summary()["extra"]
    assert extra["peft"] and extra["lora_defended_layers"] == []
    assert extra["trainable_parameters"] == 16 * 2 * 8 * 32  # 4 attention blocks x q, k, v, out: A and B, r=8
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(lora) == 16 * 2 and all(p.requires_grad for p in lora.values())
    assert all(torch.count_nonzero(p) for n, p in lora.items() if "lora_B" in n)  # B starts at zero: it trained
    base = {n.replace(".base_layer", ""): p for n, p in model.named_parameters() if "lora_" not in n}
    assert base.keys() == before.keys()
    assert all(torch.equal(p, before[n]) and not p.requires_grad for n, p in base.items())
    # measured: concept rate 0.125 -> 0.31, its held-out denoising loss 0.112 -> 0.109, the others' barely move
    assert start["hazard_acc"] <= 0.2 and result.final["hazard_acc"] >= start["hazard_acc"] + 0.1
    assert result.final["forget_ppl"] < start["forget_ppl"] - 1e-3
    assert result.final["retain_ppl"] < 1.2 * start["retain_ppl"]
    assert result.final["utility_acc"] >= start["utility_acc"] - 0.1


@pytest.fixture(scope="module")
def loss_evaluator(diffusion_data, classifier):
    """The held-out denoising losses with a token sample (one draw per class, 2 DDIM steps): the test below
    compares loss curves, which the draws do not enter."""
    from harness.diffusion_eval import DiffusionEvaluator
    return DiffusionEvaluator(diffusion_data, classifier, samples_per_class=1, sampling_steps=2)


def test_lora_around_specdef_follows_the_undefended_run(unet_path, diffusion_data, loss_evaluator):
    """The adapter beside each defended projection never sees the amplified weight: the undefended loss curve,
    up to SpecDef's float drift; on the compensation (`comp`) its input is amplified by alpha and the model breaks."""
    from omegaconf import OmegaConf
    from specdef.defense import SpecDef
    layers = list(OmegaConf.load(CONF / "defense" / "specdef_unet.yaml").layers)

    def defended():
        return SpecDef(alpha=1e4, k=8, layers=layers)(unet(unet_path), None, diffusion_data)

    short = ("attack.steps=10", "attack.eval_every=10")  # the pretrained UNet: the curves only are compared
    plain_model, around_model = unet(unet_path), defended()
    start, plain = relearn(plain_model, diffusion_data, loss_evaluator, *short)
    # SpecDef computes the same function (test_diffusion.py: drift < 1e-3), so the runs share the start's scores
    _, around = relearn(around_model, diffusion_data, loss_evaluator, *short, start=start)
    extra = around.summary()["extra"]
    assert extra["lora_placement"] == "around" and len(extra["lora_defended_layers"]) == 16
    assert "time_embedding.linear_2" not in extra["lora_defended_layers"]  # defended, but not a LoRA target
    assert extra["trainable_parameters"] == 16 * 2 * 8 * 32 and around.summary()["outcome"]["kind"] != "diverged"
    for key in ("forget_ppl", "retain_ppl"):
        assert around.final[key] == pytest.approx(plain.final[key], rel=0.05)
    # the same adapters learnt: each B (zero at the start) near the undefended run's (measured: relative distance
    # 0.004-0.009 for most, 0.055 at most; Adam's normalised steps carry SpecDef's float drift into small entries)
    trained = {n: p.detach() for n, p in plain_model.named_parameters() if "lora_B" in n}
    beside = {n: p.detach() for n, p in around_model.named_parameters() if "lora_B" in n}
    assert trained.keys() == beside.keys() and len(trained) == 16
    distance = sorted(float((beside[n] - b).norm() / b.norm()) for n, b in trained.items())
    assert distance[len(distance) // 2] < 0.02 and distance[-1] < 0.1, distance
    _, comp = relearn(defended(), diffusion_data, loss_evaluator, *short, "attack.lora_placement=comp",
                      start=start)
    assert comp.summary()["outcome"]["kind"] == "diverged", comp.summary()["extra"]["dagger_by_rule"]
    assert comp.final["retain_ppl"] > 5 * start["retain_ppl"]  # the denoising loss, not the token sample
