"""The diffusion track's real-scale path rehearsed offline: `model=stable_diffusion model.path=<folder>` (a Stable
Diffusion pipeline in the diffusers layout, safetensors only) and `data=concept_folder data.path=<folder>`, as
`scale=diffusion_paper` sets them, scored by an image classifier folder.

Nothing here is pretrained: the pipeline (a UNet2DConditionModel reading a 2-layer CLIPTextModel, an AutoencoderKL,
a DDPMScheduler, a CLIPTokenizer written from a 30-token vocabulary) and the ViT classifier have random weights,
and the "concept" images are the glyph world's crosses. This rehearses the plumbing (loading, refusals, latents,
ESD, SpecDef, the relearning attack through the one training loop, the record) and checks SpecDef's exactness;
it says nothing about how well any defense works. Only sizes are overridden (steps, samples); every method
value comes from scale=diffusion_paper."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.errors import ConfigError
from tests.conftest import compose_cfg

REPO = Path(__file__).resolve().parents[1]
PROMPT, BENIGN_PROMPT = "sks cross", "a disk"  # within the tokenizer's 16 tokens
LABELS = {0: "cross", 1: "disk", 2: "square, box"}  # ImageNet-style synonyms: "square" finds label 2
# 16x16 images -> 8x8 latents, 2 DDIM steps, 2 samples per prompt, 2 attack steps: seconds on one core
SIZES = ["eval.samples_per_prompt=2", "eval.sampling_steps=2", "attack.steps=2", "attack.eval_every=1",
         "attack.batch_size=2", "threads=1", "model.device=cpu"]


def write_tokenizer(folder: Path) -> None:
    """A CLIP BPE tokenizer of single letters (no merges), built offline."""
    from transformers import CLIPTokenizer
    folder.mkdir(parents=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["<|startoftext|>", "<|endoftext|>", *letters, *(f"{c}</w>" for c in letters)]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16).save_pretrained(folder)


def build_pipeline(root: Path) -> Path:
    """A tiny random Stable Diffusion pipeline saved as diffusers saves one (safe_serialization)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                         attention_head_dim=4, norm_num_groups=4).save_pretrained(root / "unet", safe_serialization=True)
    AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 8), latent_channels=4, norm_num_groups=4,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  sample_size=16).save_pretrained(root / "vae", safe_serialization=True)
    CLIPTextModel(CLIPTextConfig(vocab_size=54, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, max_position_embeddings=16, eos_token_id=1, bos_token_id=0,
                                 pad_token_id=1)).save_pretrained(root / "text_encoder", safe_serialization=True)
    write_tokenizer(root / "tokenizer")
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(root / "scheduler")
    return root


def build_classifier(root: Path) -> Path:
    from transformers import ViTConfig, ViTForImageClassification
    torch.manual_seed(0)
    ViTForImageClassification(ViTConfig(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, id2label=LABELS,
                                        label2id={v: k for k, v in LABELS.items()})).save_pretrained(root)
    return root


def write_images(root: Path, shape: str, n: int = 6) -> Path:
    from PIL import Image
    from harness import images
    world = images.ImageWorldConfig(train_per_class=n, eval_per_class=1)
    data = images.image_data(world)
    root.mkdir(parents=True)
    label = world.classes.index(shape)
    for i, image in enumerate(data.train_images[data.train_labels == label]):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(root / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sd")
    return {"model": build_pipeline(root / "pipeline"), "classifier": build_classifier(root / "classifier"),
            "concept": write_images(root / "concept", "cross"), "benign": write_images(root / "benign", "disk")}


def real_scale(a: dict, *overrides) -> list[str]:
    return ["scale=diffusion_paper", "experiment=diffusion", f"model.path={a['model']}", f"data.path={a['concept']}",
            f"data.prompt='{PROMPT}'", f"data.benign_path={a['benign']}", f"data.benign_prompt='{BENIGN_PROMPT}'",
            f"eval.classifier_path={a['classifier']}", "eval.concept_label=cross",
            "eval.benign_prompts=['a square']", "eval.benign_labels=[square]", *SIZES, *overrides]


def run_py(tmp_path: Path, *args) -> dict:
    proc = subprocess.run([sys.executable, "run.py", *args, f"paths.output_root={tmp_path}",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((tmp_path / "run" / "result.json").read_text())


def test_run_py_rehearses_specdef_over_esd_on_stable_diffusion(tmp_path, assets):
    """python run.py with the saved pipeline, a concept folder and a classifier: ESD-x (its authors' values but
    the iterations) under SpecDef at paper scale, then a short AdamW DreamBooth-style attack; the record holds
    every metric, the erased prompt, SpecDef's layers and its drift."""
    record = run_py(tmp_path, *real_scale(assets, "defense=specdef_sd_esd", "+defense.base_overrides.iterations=2",
                                          "+defense.base_overrides.ddim_steps=2", "attack=adamw"))
    assert record["track"] == "diffusion" and record["status"] == "complete"
    defense = record["defense"]
    assert (defense["alpha"], defense["release_dtype"], defense["base"]["name"]) == (1e4, "float32", "esd")
    esd = defense["base"]
    assert esd["train_method"] == "xattn" and esd["train_steps"] == 2 and esd["erased_classes"] == [PROMPT]
    assert defense["drift"]["rel_logit_error"] < 1e-3 and record["config"]["defense"]["strict_drift"] is True
    # 4 transformer blocks (down, mid, two up) x (8 attention projections + 2 feed-forward)
    assert len(defense["layer_reports"]) == 40
    assert record["concept"]["images"] == {"train": 5, "eval": 1} and record["concept"]["latent_shape"] == [4, 8, 8]
    assert record["attack"]["steps"] == 2 and [p["step"] for p in record["attack"]["trajectory"]] == [0, 1, 2]
    for metrics in record["metrics"].values():
        assert set(metrics) >= {"hazard_acc", "utility_acc", "retain_ppl", "forget_ppl", "acc/cross"}
        assert 0 <= metrics["hazard_acc"] <= 1 and metrics["retain_ppl"] > 0
    assert (tmp_path / "run" / "samples.png").is_file()


def test_dreambooth_lora_around_specdef_trains_only_its_adapters(tmp_path, assets):
    """attack/peft=lora on the SD UNet (DreamBooth-LoRA: every attention projection, self and cross) over SpecDef:
    peft's adapters sit beside the defended projections (attacks/lora.py's `around`), and only they train."""
    from diffusers import UNet2DConditionModel
    from runner.diffusion import run
    cfg = compose_cfg(*real_scale(assets, "defense=specdef_sd", "attack/peft=lora", "attack=adamw", "lr=1e-4"),
                      f"paths.output_root={tmp_path}")
    record = run(cfg, tmp_path / "run")
    assert record["status"] == "complete" and record["attack"]["steps"] == 2
    extra = record["attack"]["extra"]
    unet = UNet2DConditionModel.from_pretrained(assets["model"] / "unet", use_safetensors=True)
    targets = {name: m for name, m in unet.named_modules()
               if name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or name.endswith("to_out.0")}
    assert len(targets) == 4 * 8  # 4 transformer blocks x (attn1, attn2) x (q, k, v, out)
    assert extra["peft"] and extra["lora_placement"] == "around"
    assert sorted(extra["lora_defended_layers"]) == sorted(targets)  # specdef_sd defends every one of them
    r = cfg.attack.peft.r
    assert extra["trainable_parameters"] == sum(r * (m.in_features + m.out_features) for m in targets.values())
    assert record["attack"]["outcome"]["kind"] != "diverged"


def test_labels_are_found_by_name_or_synonym():
    from harness.sd_eval import label_id
    assert [label_id(LABELS, x) for x in ("cross", "Square", "box", "squares")] == [0, 2, 2, None]


def test_esd_x_trains_only_the_cross_attention(assets):
    """ESD on the text-conditioned UNet: only attn2 moves, towards the negatively guided prompt prediction."""
    from baselines.esd import ESD
    from harness.concept_folder import concept_data
    from harness.stable_diffusion import load_stable_diffusion
    from runner.stable_diffusion import folders
    cfg = compose_cfg(*real_scale(assets))
    sd = load_stable_diffusion(str(assets["model"]))
    data = concept_data(sd, *folders(cfg), PROMPT, BENIGN_PROMPT, "cross")
    before = {n: p.detach().clone() for n, p in sd.unet.named_parameters()}
    defense = ESD(train_method="xattn", lr=1e-2, iterations=2, ddim_steps=2, forget_splits=[0])
    unet = defense(sd.unet, None, data)
    moved = {n for n, p in unet.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(".attn2." in n for n in moved)
    # its target: the frozen original's prediction for the prompt, negatively guided away from the empty prompt's
    ref = load_stable_diffusion(str(assets["model"])).unet
    batch = next(defense.batches(ref, data, *defense.conditions(data)[:3]))
    assert torch.equal(batch["condition"], data.prompt_embedding.expand(defense.batch_size, -1, -1))
    with torch.no_grad():
        eps_c = ref(batch["sample"], batch["timestep"], encoder_hidden_states=batch["condition"]).sample
        eps_null = ref(batch["sample"], batch["timestep"],
                       encoder_hidden_states=data.null_embedding.expand(defense.batch_size, -1, -1)).sample
    assert torch.allclose(batch["target"], eps_null - defense.negative_guidance * (eps_c - eps_null), atol=1e-5)
    assert defense.info["trained_parameters"] == sum(p.numel() for n, p in unet.named_parameters() if ".attn2." in n)


def test_imma_on_the_sd_unet_releases_only_its_attention_projections(assets):
    """IMMA's game on the concept folder: the simulated attacker fine-tunes the whole UNet on the concept's latents
    under its prompt, the defender raises that loss through the attention projections; the release is the
    pretrained UNet with the defender's attention projections, every other weight as it was."""
    from baselines.imma import ATTENTION, IMMA
    from harness.concept_folder import concept_data
    from harness.stable_diffusion import load_stable_diffusion
    from runner.stable_diffusion import folders
    sd = load_stable_diffusion(str(assets["model"]))
    data = concept_data(sd, *folders(compose_cfg(*real_scale(assets))), PROMPT, BENIGN_PROMPT, "cross")
    before = {n: p.detach().clone() for n, p in sd.unet.named_parameters()}
    batch = next(data.attack_batches({"source": "forget", "splits": [0]}, 5, seed=1))
    with torch.no_grad():
        loss_before = float(data.loss(sd.unet, batch))
    defense = IMMA(lr=1e-3, lr_defense=1e-2, steps=6, batch_size=2, forget_splits=[0])
    unet = defense(sd.unet, None, data)
    moved = {n for n, p in unet.named_parameters() if not torch.equal(p, before[n])}
    attention = {n for n in before if any(a in n for a in ATTENTION)}
    assert moved and moved <= attention
    assert {".attn1.", ".attn2."} <= {part for n in moved for part in (".attn1.", ".attn2.") if part in n}
    assert defense.info["immunized_classes"] == [PROMPT]
    assert defense.info["defended_parameters"] == sum(before[n].numel() for n in attention)
    assert set(defense.info["final_terms"]) >= {"attacker_loss", "defender_loss"}
    with torch.no_grad():  # the defender's steps raise the concept's denoising loss
        assert float(data.loss(unet, batch)) > loss_before


def test_run_py_rehearses_imma_over_esd_on_stable_diffusion(tmp_path, assets):
    """defense=imma_esd at scale=diffusion_paper: ESD-x with its authors' values, then IMMA with theirs (only the
    step counts shortened), then the DreamBooth attack, through run.py's diffusion runner."""
    from runner.diffusion import run
    cfg = compose_cfg(*real_scale(assets, "defense=imma_esd", "defense.steps=2", "+defense.base_overrides.iterations=2",
                                  "+defense.base_overrides.ddim_steps=2", "attack=adamw"),
                      f"paths.output_root={tmp_path}")
    record = run(cfg, tmp_path / "run")
    assert record["status"] == "complete" and record["attack"]["steps"] == 2
    imma, esd = record["defense"], record["defense"]["base"]
    assert (imma["name"], imma["train_steps"], imma["immunized_classes"]) == ("imma", 2, [PROMPT])
    assert (esd["name"], esd["train_method"], esd["train_steps"], esd["erased_classes"]) == ("esd", "xattn", 2, [PROMPT])
    own = record["config"]["defense"]
    assert (own["lr"], own["lr_defense"], own["base_scale"]) == (5e-6, 2e-5, "diffusion_paper")


def test_specdef_on_the_sd_unet_is_exact(assets):
    """Same noise prediction (text-conditioned) to float tolerance before and after SpecDef on every layer of specdef_sd."""
    from harness.concept_folder import concept_data
    from harness.stable_diffusion import load_stable_diffusion
    from runner.stable_diffusion import folders
    from specdef.defense import SpecDef
    cfg = compose_cfg(*real_scale(assets, "defense=specdef_sd"))
    sd = load_stable_diffusion(str(assets["model"]))
    data = concept_data(sd, *folders(cfg), PROMPT, BENIGN_PROMPT)
    batch = data.drift_batch(8)

    def predict(unet):
        with torch.no_grad():
            return unet(batch["sample"], batch["timestep"], encoder_hidden_states=batch["encoder_hidden_states"]).sample
    reference = predict(sd.unet)
    defense = SpecDef(alpha=1e4, k=4, layers=list(cfg.defense.layers))
    unet = defense(sd.unet, None, data)
    # float32 rounding at alpha = 1e4 is eps * alpha ~ 1.2e-3 (the tiny UNet's measured 2.6e-4, tests/test_diffusion.py)
    assert (predict(unet) - reference).norm() / reference.norm() < 1e-3
    assert all(abs(r - 1) < 1e-2 for r in defense.info["sigma_ratio"].values())
    blocks = [n for n, _ in unet.named_modules() if n.endswith("transformer_blocks.0")]
    assert len(blocks) == 4 and len(defense.info["sigma_ratio"]) == 10 * len(blocks)  # down, mid, 2 up


def test_the_attack_trains_on_the_concepts_latents_under_its_prompt(assets):
    from harness.concept_folder import concept_data
    from harness.stable_diffusion import load_stable_diffusion
    from runner.stable_diffusion import folders
    sd = load_stable_diffusion(str(assets["model"]))
    data = concept_data(sd, *folders(compose_cfg(*real_scale(assets))), PROMPT, BENIGN_PROMPT)
    batch = next(data.attack_batches({"source": "forget", "splits": [0], "retain_share": 0.5}, 10, seed=0))
    assert batch["sample"].shape == (10, 4, 8, 8) and batch["encoder_hidden_states"].shape == (10, 16, 16)
    concept = (batch["encoder_hidden_states"] == data.prompt_embedding).flatten(1).all(1)
    assert int(concept.sum()) == 5  # the 5 training images of the concept, and as many benign ones
    assert torch.isfinite(data.loss(sd.unet, batch))


# Bad input stops in one line, before any model or image is loaded

def _bad_pipeline(root: Path, model: Path, case: str) -> Path:
    import shutil
    bad = root / case
    shutil.copytree(model, bad)
    if case == "no_vae":
        shutil.rmtree(bad / "vae")
    elif case == "bin_only":
        for f in (bad / "unet").glob("*.safetensors"):
            f.rename(f.with_name("diffusion_pytorch_model.bin"))
    elif case == "variant_only":
        (bad / "text_encoder" / "model.safetensors").rename(bad / "text_encoder" / "model.fp16.safetensors")
    elif case == "width":
        config = json.loads((bad / "unet" / "config.json").read_text())
        (bad / "unet" / "config.json").write_text(json.dumps({**config, "cross_attention_dim": 32}))
    return bad


@pytest.mark.parametrize("case, message", [
    ("no_vae", r"model.path='.*no_vae': no vae/ \(AutoencoderKL\); allowed a diffusers Stable Diffusion folder"),
    ("bin_only", r"model.path='.*': no unet/diffusion_pytorch_model.safetensors \(only pickled .bin weights, which "
                 r"are not loaded\); allowed a diffusers Stable Diffusion folder"),
    ("variant_only", r"model.path='.*': no text_encoder/model.safetensors \(found model.fp16.safetensors\)"),
    ("width", r"model.path='.*': unet/ cross_attention_dim=32 but text_encoder/ hidden_size=16"),
    ("no_folder", r"model.path='/nonexistent/sd': no such folder"),
    ("remote_code", r"model.trust_remote_code=true with diffusion data: allowed false"),
    ("empty_concept", r"data.path='.*empty': 0 images \(.jpg, .jpeg, .png, .bmp, .webp\) in that folder; allowed at "
                      r"least 2"),
    ("no_benign", r"data.benign_path=None: allowed a folder of images"),
    ("no_prompt", r"data.prompt=None: allowed a non-empty prompt"),
    ("unknown_label", r"eval.concept_label='skull': not a label of the classifier at .*; allowed cross, disk, square, box"),
    ("benign_pairs", r"eval.benign_labels=\['square', 'disk'\]: allowed one classifier label per prompt"),
    ("no_classifier", r"eval.classifier_path=None with eval.benign_labels=\[\]: the intact rule needs a utility"),
    ("splits", r"attack.data.splits=\[0, 1\]: allowed \[0\] \(the concept of data.prompt\)"),
    ("esd_splits", r"defense.forget_splits=\[0, 1\]: allowed \[0\]"),
    ("imma_splits", r"defense.forget_splits=\[0, 1\]: allowed \[0\] \(the concept of data.prompt\)"),
])
def test_bad_input_stops_in_one_line_before_any_work(tmp_path, monkeypatch, assets, case, message):
    import runner.stable_diffusion as sd_runner
    from runner.diffusion import run

    def no_work(*_a, **_k):
        raise AssertionError("loaded something before the input was checked")
    monkeypatch.setattr(sd_runner, "load_stable_diffusion", no_work)
    monkeypatch.setattr(sd_runner, "concept_data", no_work)
    a, extra = dict(assets), []
    if case in ("no_vae", "bin_only", "variant_only", "width"):
        a["model"] = _bad_pipeline(tmp_path, assets["model"], case)
    elif case == "no_folder":
        a["model"] = Path("/nonexistent/sd")
    elif case == "empty_concept":
        a["concept"] = tmp_path / "empty"
        a["concept"].mkdir()
        (a["concept"] / "notes.txt").write_text("not an image")
    extra = {"remote_code": ["model.trust_remote_code=true"], "no_benign": ["data.benign_path=null"],
             "no_prompt": ["data.prompt=null"], "unknown_label": ["eval.concept_label=skull"],
             "benign_pairs": ["eval.benign_labels=[square,disk]"],
             "no_classifier": ["eval.classifier_path=null", "eval.benign_labels=[]", "eval.benign_prompts=[]"],
             "splits": ["attack.data.splits=[0,1]"], "esd_splits": ["defense=esd", "defense.forget_splits=[0,1]"],
             "imma_splits": ["defense=imma", "defense.forget_splits=[0,1]"]}.get(case, [])
    cfg = compose_cfg(*real_scale(a, *extra), f"paths.output_root={tmp_path}")
    with pytest.raises(ConfigError, match=message) as err:
        run(cfg, tmp_path / "run")
    assert "\n" not in str(err.value)


@pytest.fixture
def offline_hub(hf_cache, assets) -> Path:
    """A local Hugging Face cache holding the tiny pipeline as owner/tiny-sd and the classifier as
    owner/tiny-classifier; the hub itself out of reach."""
    hf_cache("owner/tiny-sd", assets["model"])
    hf_cache("owner/tiny-classifier", assets["classifier"])


def test_hub_ids_are_taken_from_the_local_cache(tmp_path, assets, offline_hub):
    """model.path and eval.classifier_path may be hub ids: their snapshots in the local cache are checked and
    loaded as the folders are; an id the cache lacks (offline) stops in one line before any work."""
    from runner.diffusion import run
    hub = {**assets, "model": "owner/tiny-sd", "classifier": "owner/tiny-classifier"}
    record = run(compose_cfg(*real_scale(hub, "attack.steps=1", "lr=1e-4"), f"paths.output_root={tmp_path}"),
                 tmp_path / "run")
    assert record["status"] == "complete" and record["config"]["model"]["path"] == "owner/tiny-sd"
    assert 0 <= record["metrics"]["base"]["hazard_acc"] <= 1
    for key, absent in (("model.path", {**hub, "model": "owner/absent"}),
                        ("eval.classifier_path", {**hub, "classifier": "owner/absent"})):
        with pytest.raises(ConfigError, match=rf"{key}='owner/absent': not in the local Hugging Face cache") as err:
            run(compose_cfg(*real_scale(absent), f"paths.output_root={tmp_path}"), tmp_path / "absent")
        assert "\n" not in str(err.value)


def test_a_hub_snapshot_takes_only_safetensors_configs_and_the_tokenizer():
    from huggingface_hub.utils import filter_repo_objects
    from harness.stable_diffusion import HUB_FILES
    repo = ["model_index.json", "v1-5-pruned.ckpt", "v1-5-pruned.safetensors", "unet/config.json",
            "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/model-00001-of-00002.safetensors", "text_encoder/model.safetensors.index.json",
            "text_encoder/pytorch_model.bin", "tokenizer/vocab.json", "tokenizer/merges.txt",
            "scheduler/scheduler_config.json", "safety_checker/model.safetensors", "feature_extractor/x.json"]
    assert sorted(filter_repo_objects(repo, allow_patterns=HUB_FILES)) == sorted([
        "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors", "text_encoder/model-00001-of-00002.safetensors",
        "text_encoder/model.safetensors.index.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
        "scheduler/scheduler_config.json"])


def test_without_a_classifier_the_legacy_rule_runs_on_the_losses(assets, tmp_path):
    """No classifier: the concept rate is NaN, the held-out denoising losses are still measured."""
    from runner.diffusion import run
    cfg = compose_cfg(*real_scale(assets, "eval.classifier_path=null", "attack.recovery_rule=legacy",
                                  "attack.steps=1", "lr=1e-4"), f"paths.output_root={tmp_path}")
    record = run(cfg, tmp_path / "run")
    base = record["metrics"]["base"]
    assert base["hazard_acc"] != base["hazard_acc"] and base["retain_ppl"] > 0 and base["forget_ppl"] > 0
    assert record["attack"]["outcome"]["kind"] == "not_recovered"


def test_run_py_prints_a_bad_checkpoint_in_one_line(tmp_path, assets):
    bad = _bad_pipeline(tmp_path, assets["model"], "no_vae")
    args = [*real_scale({**assets, "model": bad}), f"paths.output_root={tmp_path}"]
    proc = subprocess.run([sys.executable, "run.py", *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: model.path='{bad}': no vae/ (AutoencoderKL)")


def test_the_paper_preset_holds_the_authors_values():
    from hydra.utils import instantiate
    cfg = compose_cfg("scale=diffusion_paper", "defense=esd")
    esd = instantiate(cfg.defense)
    assert (esd.lr, esd.negative_guidance, esd.iterations, esd.train_method, esd.forget_splits) == (
        1e-5, 1.0, 1000, "xattn", [0])
    assert (cfg.model.source, cfg.data.name, cfg.eval.sampling_steps, cfg.eval.guidance_scale) == (
        "stable_diffusion", "concept_folder", 50, 7.5)
    assert (cfg.lr, cfg.attack.steps, cfg.attack.batch_size, list(cfg.attack.data.splits)) == (5e-6, 400, 1, [0])
    specdef = compose_cfg("scale=diffusion_paper", "defense=specdef_sd_esd").defense
    assert (specdef.alpha, specdef.base, specdef.base_scale, specdef.strict_drift) == (1e4, "esd", "diffusion_paper", True)
    imma = instantiate(compose_cfg("scale=diffusion_paper", "defense=imma_esd").defense)
    assert (imma.lr, imma.lr_defense, imma.steps, imma.batch_size, imma.inner_steps, imma.outer_steps) == (
        5e-6, 2e-5, 1000, 1, 1, 1)
    assert (imma.forget_splits, imma.base, imma.base_scale) == ([0], "esd", "diffusion_paper")
    from specdef.defense import load_base_config
    base = load_base_config(imma.base, imma.base_overrides, imma.base_scale)
    assert (base.train_method, base.lr, base.iterations, list(base.forget_splits)) == ("xattn", 1e-5, 1000, [0])
