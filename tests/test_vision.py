"""The vision track's embedded default: the image world, the tiny ViT pretrained on it, SpecDef on the
ViT and the relearning attack through the one training loop.

The pretrained ViT is built once per cache (~40 s on one core the first time, a checksummed load after)."""
from __future__ import annotations

import pytest
import torch

from harness import images
from harness.errors import ConfigError
from harness.tiny_vit import TinyViTSpec, ensure_tiny_vit, load_tiny_vit, untrained
from harness.vision_eval import VisionEvaluator
from tests.conftest import CACHE_DIR

WORLD = images.ImageWorldConfig()


@pytest.fixture(scope="session")
def image_data():
    return images.image_data(WORLD)


@pytest.fixture(scope="session")
def vit_path():
    return ensure_tiny_vit(WORLD, TinyViTSpec(), CACHE_DIR)


@pytest.fixture(scope="session")
def vision_evaluator(image_data):
    return VisionEvaluator(image_data)


@pytest.fixture(scope="session")
def pretrained_metrics(vit_path, vision_evaluator):
    return vision_evaluator(load_tiny_vit(vit_path))


# The image world

def test_world_is_a_function_of_its_seed():
    small = images.ImageWorldConfig(train_per_class=3, eval_per_class=2)
    a, b = images.image_data(small), images.image_data(small)
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.eval_images, b.eval_images)
    other = images.image_data(images.ImageWorldConfig(seed=1, train_per_class=3, eval_per_class=2))
    assert not torch.equal(a.train_images, other.train_images)
    assert small.key() != images.ImageWorldConfig(seed=1, train_per_class=3, eval_per_class=2).key()


def test_world_splits_classes_and_shapes(image_data):
    n = len(WORLD.classes)
    assert image_data.train_images.shape == (WORLD.train_per_class * n, 3, 32, 32)
    assert image_data.eval_images.dtype == torch.uint8
    assert torch.bincount(image_data.eval_labels).tolist() == [WORLD.eval_per_class] * n
    assert [image_data.classes[i] for i in image_data.hazard_labels] == list(WORLD.hazard)
    assert set(image_data.hazard_labels).isdisjoint(image_data.benign_labels)
    x, y = image_data.hazard("eval", splits=[1])
    assert set(y.tolist()) == {image_data.class_index(WORLD.hazard[1])} and len(x) == WORLD.eval_per_class
    # train and eval are different draws: no eval image is a copy of a training image
    train = {bytes(t.numpy()) for t in image_data.train_images[:2000]}
    assert not any(bytes(t.numpy()) in train for t in image_data.eval_images[:200])


@pytest.mark.parametrize("kwargs, message", [
    ({"hazard": ("skull",)}, r"data.world.hazard: unknown class 'skull'; allowed disk, square"),
    ({"classes": ("disk", "blob")}, r"data.world.classes: unknown class 'blob'; allowed disk"),
    ({"hazard": tuple(images.SHAPES)}, r"allowed at least one hazard and one benign class"),
    ({"train_per_class": 0}, r"data.world.train_per_class=0: allowed an integer >= 1"),
])
def test_world_bad_input_is_one_line(kwargs, message):
    with pytest.raises(ConfigError, match=message) as err:
        images.ImageWorldConfig(**kwargs)
    assert "\n" not in str(err.value)


def test_unknown_class_name_is_one_line(image_data):
    with pytest.raises(ConfigError, match=r"class 'pentagon': unknown; allowed disk, square"):
        image_data.class_index("pentagon")


# The tiny ViT

def test_untrained_vit_is_near_chance(vision_evaluator):
    metrics = vision_evaluator(untrained(TinyViTSpec(), WORLD))
    chance = 1 / len(WORLD.classes)
    overall = (metrics["hazard_acc"] * len(WORLD.hazard) + metrics["utility_acc"] * (len(WORLD.classes) - len(WORLD.hazard)))
    assert abs(overall / len(WORLD.classes) - chance) < 0.1


def test_pretrained_vit_meets_both_targets(pretrained_metrics):
    assert pretrained_metrics["hazard_acc"] >= 0.95 and pretrained_metrics["utility_acc"] >= 0.95
    assert pretrained_metrics["retain_ppl"] < 1.2


def test_vit_cache_is_checksummed(vit_path):
    from harness.manifest import verify_manifest
    manifest = (vit_path / "manifest.json").read_text()
    assert verify_manifest(vit_path) is None and "weights_sha256" in manifest
    assert vit_path.parent.name == "tiny_vit" and vit_path.parent.parent == CACHE_DIR


def test_bad_spec_is_one_line():
    with pytest.raises(ConfigError, match=r"model.spec.exclude_hazard=\[2\]: allowed indices 0..1"):
        ensure_tiny_vit(WORLD, TinyViTSpec(exclude_hazard=(2,)), CACHE_DIR)
    with pytest.raises(ConfigError, match=r"model.spec.patch_size=5: allowed a divisor of 32"):
        ensure_tiny_vit(WORLD, TinyViTSpec(patch_size=5), CACHE_DIR)
