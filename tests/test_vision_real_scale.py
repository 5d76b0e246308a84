"""The vision track's real-scale path rehearsed offline: `model=vit model.path=<folder>` (any HF ViT classifier,
safetensors only) and `data=image_folder data.path=<folder>` (class subfolders), as `scale=vision_paper` sets
them, in the condition-number paper's shape (a pretrained ViT, an image folder whose hazard classes include
one the checkpoint never named).

The checkpoint is the naive tiny ViT saved with save_pretrained; the folder holds glyph-world images as PNG
files. Only sizes are overridden (steps, evaluation); every method value comes from scale=vision_paper."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness import images
from harness.errors import ConfigError
from harness.image_folder import scan_image_folder
from tests.conftest import CACHE_DIR, compose_cfg

REPO = Path(__file__).resolve().parents[1]
# glyph shape -> class folder name: "star" is a name the checkpoint does not know (a new head row)
FOLDERS = {"disk": "disk", "square": "square", "cross": "cross", "saltire": "star"}
SIZES = ["attack.steps=4", "attack.eval_every=2", "attack.batch_size=16",
         "attack.checkpoint_every=null", "eval.batch_size=64", "threads=1"]


def write_folder(root: Path, split_folders: bool, per_class: int = 12, eval_per_class: int = 4) -> Path:
    from PIL import Image
    world = images.ImageWorldConfig(train_per_class=per_class, eval_per_class=eval_per_class)
    data = images.image_data(world)
    splits = {"train": (data.train_images, data.train_labels), "val": (data.eval_images, data.eval_labels)}
    for split, (x, y) in splits.items():
        if not split_folders and split == "val":
            continue
        for i, (image, label) in enumerate(zip(x, y)):
            shape = world.classes[int(label)]
            if shape in FOLDERS:
                folder = root / (split if split_folders else "") / FOLDERS[shape]
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from harness.tiny_vit import TinyViTSpec, ensure_tiny_vit, load_tiny_vit
    path = tmp_path_factory.mktemp("vit")
    naive = ensure_tiny_vit(images.ImageWorldConfig(), TinyViTSpec(exclude_hazard=(0, 1)), CACHE_DIR)
    load_tiny_vit(naive).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("images"), split_folders=True)


def real_scale(checkpoint, folder, *overrides) -> list[str]:
    return ["experiment=vision", "scale=vision_paper", f"model.path={checkpoint}", f"data.path={folder}",
            "data.hazard=[cross,star]", *overrides]


def test_run_py_rehearses_the_real_scale_path(tmp_path, checkpoint, folder):
    """python run.py with a saved ViT checkpoint and an image folder: condition-number immunization with its
    authors' values, then a short Adam attack on the hazard classes; the record says how the head was fitted."""
    args = real_scale(checkpoint, folder, "defense=condition_number", "defense.steps=2", "attack=adam", "lr=1e-3", *SIZES,
                      f"paths.output_root={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}")
    proc = subprocess.run([sys.executable, "run.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads((tmp_path / "run" / "result.json").read_text())
    assert record["track"] == "vision" and record["status"] == "complete"
    assert record["head"] == {"kept": {"disk": 0, "square": 1, "cross": 3}, "new": ["star"]}
    defense = record["config"]["defense"]
    assert (defense["lambda_ill"], defense["lambda_well"], defense["lr"], defense["dtype"]) == (3e8, 3e-6, 1e-5, "float64")
    assert record["defense"]["forget_classes"] == ["cross", "star"] and record["defense"]["train_steps"] == 2
    assert record["attack"]["steps"] == 4 and [p["step"] for p in record["attack"]["trajectory"]] == [0, 2, 4]
    base = record["metrics"]["base"]
    assert base["acc/disk"] == base["acc/square"] == 1.0 and base["utility_acc"] == 1.0  # the benign classes kept
    assert set(base) >= {"acc/cross", "acc/star", "hazard_acc"}


def test_a_hub_id_is_checked_and_loaded_from_the_local_cache(tmp_path, checkpoint, folder, hf_cache):
    """model.path=<hub id>: its snapshot in the local cache is checked as a folder is (config, weights, head,
    normalisation) and loaded; an id the cache lacks (offline) stops in one line before any work."""
    from runner.vision import run
    hf_cache("owner/tiny-vit", checkpoint)
    cfg = compose_cfg(*real_scale("owner/tiny-vit", folder, "attack=adam", "lr=1e-3", *SIZES),
                      f"paths.output_root={tmp_path}")
    record = run(cfg, tmp_path / "run")
    assert record["status"] == "complete" and record["config"]["model"]["path"] == "owner/tiny-vit"
    assert record["head"] == {"kept": {"disk": 0, "square": 1, "cross": 3}, "new": ["star"]}
    with pytest.raises(ConfigError, match=r"model.path='owner/absent': not in the local Hugging Face cache") as err:
        run(compose_cfg(*real_scale("owner/absent", folder), f"paths.output_root={tmp_path}"), tmp_path / "absent")
    assert "\n" not in str(err.value)


def test_run_py_rehearses_specdef_over_immunization_against_lora(tmp_path, checkpoint, folder):
    """SpecDef at paper scale (float32 release, strict drift) over condition_number with its paper values, and a
    LoRA attack whose adapters sit around the defended layers."""
    args = real_scale(checkpoint, folder, "defense=specdef_vit_cn", "+defense.base_overrides.steps=2",
                      "attack/peft=lora", "attack=adam", "lr=1e-2", *SIZES, f"paths.output_root={tmp_path}",
                      f"hydra.run.dir={tmp_path / 'run'}")
    proc = subprocess.run([sys.executable, "run.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads((tmp_path / "run" / "result.json").read_text())
    defense = record["defense"]
    assert (defense["alpha"], defense["release_dtype"], defense["base"]["name"]) == (1e4, "float32", "condition_number")
    assert defense["base"]["train_steps"] == 2 and record["config"]["defense"]["strict_drift"] is True
    assert defense["drift"]["rel_logit_error"] < 1e-2
    assert record["attack"]["extra"]["lora_defended_layers"] == ["vit.layers.0.mlp.fc2", "vit.layers.1.mlp.fc2"]


def test_a_flat_folder_is_split_by_its_seed(tmp_path):
    root = write_folder(tmp_path / "flat", split_folders=False, per_class=10)
    world = scan_image_folder(str(root), ["cross"], eval_fraction=0.2, seed=0)
    assert world.classes == ("cross", "disk", "square", "star") and world.hazard == ("cross",)
    for c in world.classes:
        train, held = world.files["train"][c], world.files["eval"][c]
        assert (len(train), len(held)) == (8, 2) and not set(train) & set(held)
    assert scan_image_folder(str(root), ["cross"], 0.2, seed=0).files == world.files
    assert scan_image_folder(str(root), ["cross"], 0.2, seed=1).files != world.files


def test_the_head_is_fitted_to_the_runs_classes():
    """Known classes keep their rows (ImageNet's comma-separated synonyms match too); unknown ones start at zero."""
    from transformers import ViTConfig, ViTForImageClassification
    from harness.hf_vit import fit_head
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, id2label={0: "tench, Tinca tinca", 1: "goldfish", 2: "great white shark"})
    model = ViTForImageClassification(config)
    old = model.classifier.weight.detach().clone()
    head = fit_head(model, ("goldfish", "tench", "sports car"))
    assert head == {"kept": {"goldfish": 1, "tench": 0}, "new": ["sports car"]}
    w = model.classifier.weight.detach()
    assert torch.equal(w[0], old[1]) and torch.equal(w[1], old[0]) and not w[2].any()
    assert model.config.id2label == {0: "goldfish", 1: "tench", 2: "sports car"} and model.config.num_labels == 3
    logits = model(pixel_values=torch.zeros(1, 3, 32, 32)).logits
    assert logits.shape == (1, 3)


def test_lora_on_the_real_scale_vit_takes_the_model_configs_targets():
    from hydra.utils import instantiate
    peft = instantiate(compose_cfg("experiment=vision", "scale=vision_paper", "attack/peft=lora").attack.peft)
    assert peft.task_type is None and "fc2" in peft.target_modules


# Bad input stops in one line, before any model or image is loaded

def _bad_checkpoints(root: Path, checkpoint: Path) -> dict[str, Path]:
    import shutil
    from safetensors.torch import save_file
    from transformers import LlamaConfig, ViTConfig, ViTModel
    no_weights = root / "no_weights"
    no_weights.mkdir()
    shutil.copy(checkpoint / "config.json", no_weights / "config.json")
    llama = root / "llama"
    llama.mkdir()
    LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(llama)
    save_file({"model.embed_tokens.weight": torch.zeros(4, 16)}, str(llama / "model.safetensors"))
    headless = root / "headless"
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2)).save_pretrained(headless, safe_serialization=True)
    imagenet_norm = root / "imagenet_norm"
    shutil.copytree(checkpoint, imagenet_norm)
    (imagenet_norm / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))
    return {"no_weights": no_weights, "llama": llama, "headless": headless, "imagenet_norm": imagenet_norm}


@pytest.mark.parametrize("case, message", [
    ("empty_folder", r"data.path='.*': no class subfolders; allowed <path>/<class>/\*.jpg"),
    ("no_images", r"data.path='.*': no images \(.jpg, .jpeg, .png, .bmp, .webp\) in its class subfolders"),
    ("empty_class", r"data.path='.*': no train images of class 'empty'"),
    ("hazard_name", r"data.hazard: unknown class 'skull'; allowed cross, disk, square, star"),
    ("no_weights", r"model.path='.*': no \*.safetensors in that folder"),
    ("llama", r"model.path='.*': a 'llama' checkpoint \(config.json model_type\); allowed a ViT image classifier"),
    ("headless", r"model.path='.*': its weights lack a classification head \(classifier.weight\)"),
    ("imagenet_norm", r"model.path='.*': preprocessor_config.json image_mean=\[0.485, 0.456, 0.406\]; allowed 0.5"),
    ("remote_code", r"model.trust_remote_code=true with image data: allowed false"),
    ("max_per_class", r"data.max_per_class=0: allowed null or an integer >= 1"),
    ("eval_fraction", r"data.eval_fraction=1.5: allowed a number in \(0, 1\)"),
])
def test_bad_input_stops_in_one_line_before_any_work(tmp_path, monkeypatch, checkpoint, folder, case, message):
    import runner.vision as vision

    def no_work(*_a, **_k):
        raise AssertionError("loaded something before the input was checked")
    monkeypatch.setattr(vision, "load_vit", no_work)
    monkeypatch.setattr(vision, "load_data", no_work)
    model, data, extra = checkpoint, folder, []
    if case == "empty_folder":
        data = tmp_path / "empty"
        data.mkdir()
    elif case == "no_images":
        data = tmp_path / "no_images"
        (data / "cross").mkdir(parents=True)
        (data / "star").mkdir()
        (data / "star" / "notes.txt").write_text("not an image")
    elif case == "empty_class":
        data = write_folder(tmp_path / "with_empty", split_folders=False, per_class=3)
        (data / "empty").mkdir()
    elif case == "hazard_name":
        extra = ["data.hazard=[cross,skull]"]
    elif case == "remote_code":
        extra = ["model.trust_remote_code=true"]
    elif case == "max_per_class":
        extra = ["data.max_per_class=0"]
    elif case == "eval_fraction":
        data, extra = write_folder(tmp_path / "flat", split_folders=False, per_class=3), ["data.eval_fraction=1.5"]
    elif case != "ok":
        model = _bad_checkpoints(tmp_path, checkpoint)[case]
    cfg = compose_cfg(*real_scale(model, data, *extra), f"paths.output_root={tmp_path}")
    with pytest.raises(ConfigError, match=message) as err:
        vision.run(cfg, tmp_path / "run")
    assert "\n" not in str(err.value)


def test_run_py_prints_a_bad_folder_in_one_line(tmp_path, checkpoint, run_py_refusal):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = run_py_refusal(*real_scale(checkpoint, empty), f"paths.output_root={tmp_path}")
    assert code == 2
    assert err.strip().splitlines()[-1].startswith(f"error: data.path='{empty}': no class subfolders")


def test_a_checkpoint_runs_on_the_glyph_world_too(tmp_path, checkpoint):
    """model=vit on data=synthetic_images: the saved naive tiny ViT, scored as the tiny one is (every class known)."""
    from runner.vision import run
    record = run(compose_cfg("experiment=vision", "model=vit", f"model.path={checkpoint}", "model.device=cpu",
                             "attack.steps=0", f"paths.output_root={tmp_path}", "threads=1"), tmp_path / "run")
    assert record["head"]["new"] == [] and len(record["head"]["kept"]) == 8
    base = record["metrics"]["base"]
    assert base["hazard_acc"] <= 0.05 and base["utility_acc"] >= 0.95  # never saw the hazard classes


def test_a_checkpoint_of_another_input_size_is_refused_on_the_glyph_world(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification
    from runner.vision import run
    ViTForImageClassification(ViTConfig(image_size=64, patch_size=16, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2)).save_pretrained(tmp_path / "vit64")
    cfg = compose_cfg("experiment=vision", "model=vit", f"model.path={tmp_path / 'vit64'}", f"paths.output_root={tmp_path}")
    with pytest.raises(ConfigError, match=r"\(image_size 64\) with data=synthetic_images \(32x32 glyphs\): allowed "
                                          r"data=image_folder"):
        run(cfg, tmp_path / "run")


def test_the_tiny_vit_is_refused_on_an_image_folder(tmp_path, folder):
    from runner.vision import run
    cfg = compose_cfg("experiment=vision", "data=image_folder", f"data.path={folder}", "data.hazard=[cross]",
                      f"paths.output_root={tmp_path}")
    with pytest.raises(ConfigError, match=r"model=tiny_vit with data=image_folder: allowed data=synthetic_images"):
        run(cfg, tmp_path / "run")
