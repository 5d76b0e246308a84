"""The image tracks' memory plan (runner/image_memory_plan.py): `plan=true` prints it for a ViT or a UNet, its
attack stage matches the measured memory of fine-tuning the tiny models, and a real-size model's counts (SpecDef's
compensations, LoRA's adapters, the frozen VAE and text encoder) follow from its config files alone."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.errors import ConfigError
from harness.memory import GiB
from runner.image_memory_plan import plan
from tests.conftest import compose_cfg

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("track, batch", [("vision", 256), ("diffusion", 64)])
def test_the_attack_stage_matches_measured_memory(track, batch):
    """Growth of resident memory over two Adam steps of the tiny ViT / UNet against the plan's attack stage
    (the frozen classifier is not in the probe), at a batch where activations dominate."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "benchmarks.image_memory_probe", track, str(batch)], cwd=REPO,
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    measured = json.loads(out.stdout.splitlines()[-1])
    stage = plan(compose_cfg(f"experiment={track}", f"attack.batch_size={batch}")).stages[0]
    assert stage.name == "attack: adam"
    planned = stage.total - stage.device.get("frozen parts", 0)
    assert planned == pytest.approx(measured["grown"], rel=0.25)


def test_run_py_prints_the_plan_and_runs_nothing(tmp_path):
    out = subprocess.run([sys.executable, "run.py", "experiment=vision", "plan=true", f"paths.output_root={tmp_path}",
                          f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "memory plan: 1 rank (dist=none)" in out.stdout and "attack: adam" in out.stdout
    assert "fits; it needs" in out.stdout and not list(tmp_path.rglob("result.json"))


def sd_configs(root: Path) -> Path:
    """A Stable Diffusion folder of config files only (no weights: the plan reads nothing else)."""
    from transformers import CLIPTextConfig
    for part in ("unet", "vae", "tokenizer"):
        (root / part).mkdir(parents=True)
    (root / "unet" / "config.json").write_text(json.dumps({
        "_class_name": "UNet2DConditionModel", "sample_size": 8, "in_channels": 4, "out_channels": 4,
        "block_out_channels": [8, 16], "layers_per_block": 1, "cross_attention_dim": 16, "attention_head_dim": 4,
        "norm_num_groups": 4, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}))
    (root / "vae" / "config.json").write_text(json.dumps({
        "_class_name": "AutoencoderKL", "block_out_channels": [8, 8], "latent_channels": 4, "norm_num_groups": 4,
        "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2}))
    CLIPTextConfig(vocab_size=54, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                   max_position_embeddings=16).save_pretrained(root / "text_encoder")
    (root / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 16}))
    return root


def sd_plan(root: Path, *overrides):
    return plan(compose_cfg("scale=diffusion_paper", f"model.path={root}", "model.device=cuda",
                            "dist.device_memory_gb=80", *overrides))


def test_stable_diffusion_counts_follow_from_its_config_files(tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    from specdef.core import match_layers
    root = sd_configs(tmp_path / "sd")

    def config(part):
        return json.loads((root / part / "config.json").read_text())
    unet, vae = UNet2DConditionModel.from_config(config("unet")), AutoencoderKL.from_config(config("vae"))
    text = CLIPTextModel(CLIPTextConfig.from_pretrained(root / "text_encoder"))
    frozen = sum(p.numel() for m in (vae, text) for p in m.parameters())
    params = sum(p.numel() for p in unet.parameters())
    full = sd_plan(root, "attack=adamw")
    attack = full.stages[-2].device
    assert attack["weights"] == attack["gradients"] == 4 * params and attack["optimizer"] == 8 * params
    assert attack["activations"] > 0 and attack["frozen parts"] == 4 * frozen and full.fits
    # SpecDef: an out x out compensation per defended layer, in the attack and the evaluation
    cfg = compose_cfg("scale=diffusion_paper", f"model.path={root}", "defense=specdef_sd")
    extra = sum(unet.get_submodule(n).out_features ** 2 for n in match_layers(unet, list(cfg.defense.layers)))
    defended = sd_plan(root, "defense=specdef_sd", "attack=adamw")
    assert defended.stages[-2].device["weights"] == 4 * (params + extra)
    assert defended.stages[-1].device["weights"] == 4 * (params + extra)
    # DreamBooth-LoRA: r (in + out) per attention projection trains; the UNet's weights stay
    lora = sd_plan(root, "attack=adamw", "attack/peft=lora").stages[-2].device
    r = compose_cfg("scale=diffusion_paper", f"model.path={root}", "attack/peft=lora").attack.peft.r
    adapters = sum(r * (m.in_features + m.out_features) for n, m in unet.named_modules()
                   if n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or n.endswith("to_out.0"))
    assert lora["gradients"] == 4 * adapters and lora["weights"] == 4 * (params + adapters)


def test_a_folder_without_config_files_stops_in_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"model.path='.*empty': no unet/config.json; allowed a model folder") as err:
        sd_plan(tmp_path / "empty")
    assert "\n" not in str(err.value)


def test_a_plan_fits_a_device_exactly_when_its_largest_stage_does(tmp_path):
    """usable = 0.9 x the device less 2 GiB of CUDA context: just above the largest stage fits, just below does not."""
    root = sd_configs(tmp_path / "sd")
    need = sd_plan(root, "attack.batch_size=64").per_rank
    exact = (need + 2 * GiB) / 0.9 / GiB
    assert sd_plan(root, "attack.batch_size=64", f"dist.device_memory_gb={1.05 * exact}").fits
    tight = sd_plan(root, "attack.batch_size=64", f"dist.device_memory_gb={0.95 * exact}")
    assert not tight.fits and "does not fit" in tight.report()
