"""`defense=checkpoint`: a released defended model (here the tiny model, changed and saved to a local
folder) replaces the run's model, alone or as SpecDef's base; a path out of reach stops at validation."""
from __future__ import annotations

import pytest
import torch

from baselines.released import ReleasedCheckpoint
from harness.errors import ConfigError
from harness.models import from_pretrained
from runner.validate import validate
from specdef.defense import SpecDef
from tests.conftest import compose_cfg


@pytest.fixture()
def release(tiny_path, tmp_path):
    """The tiny model with a changed LM head, saved as a release would be (safetensors + tokenizer)."""
    model, tok = from_pretrained(tiny_path)
    with torch.no_grad():
        model.lm_head.weight.mul_(0.5)
    model.save_pretrained(tmp_path / "release", safe_serialization=True)
    tok.save_pretrained(tmp_path / "release")
    return tmp_path / "release", model.lm_head.weight.detach().clone()


def test_released_checkpoint_replaces_the_model(tiny_model, data, release):
    folder, head = release
    model, tok = tiny_model
    defense = ReleasedCheckpoint(path=str(folder))
    defended = defense(model, tok, data)
    assert torch.equal(defended.lm_head.weight, head) and not torch.equal(model.lm_head.weight, head)
    assert defense.info["path"] == str(folder) and defense.info["dtype"] == "float32"


def test_released_checkpoint_as_specdef_base(tiny_model, data, release):
    folder, head = release
    model, tok = tiny_model
    defense = SpecDef(alpha=10.0, k=4, base="checkpoint", base_overrides={"path": str(folder)}, drift_samples=4)
    defended = defense(model, tok, data)
    assert defense.info["base"]["name"] == "checkpoint" and defense.info["base"]["path"] == str(folder)
    assert torch.equal(defended.lm_head.weight, head)  # SpecDef leaves the head: the release's is kept


def test_config_composes_and_validates(release):
    folder, _ = release
    validate(compose_cfg("defense=checkpoint", f"defense.path={folder}"))
    validate(compose_cfg("defense=specdef", "defense.base=checkpoint", f"+defense.base_overrides.path={folder}"))


@pytest.mark.parametrize("overrides, message", [
    (["defense=checkpoint", "defense.path=/no/such/folder"], "defense.path='/no/such/folder': no such folder"),
    (["defense=checkpoint"], "defense.path=None: allowed a hub id"),
    (["defense=specdef", "defense.base=checkpoint", "+defense.base_overrides.path=./nowhere"],
     "defense.base_overrides.path='./nowhere': no such folder"),
])
def test_unreachable_path_stops_at_validation(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(compose_cfg(*overrides))


def test_hub_checkpoint_out_of_reach_is_one_line(monkeypatch, tmp_path):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: the env is too late
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(ConfigError, match="defense.path='lapisrocks/Llama-3-8B-Instruct-TAR-Bio-v2': not in the local"):
        validate(compose_cfg("defense=checkpoint_tar"))


def test_folder_without_safetensors_is_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"no \*.safetensors"):
        validate(compose_cfg("defense=checkpoint", f"defense.path={tmp_path}"))


def test_release_of_another_family_is_refused(tiny_model, data, release, tmp_path):
    folder, _ = release
    model, tok = tiny_model
    model.config.hidden_size = 64  # the run's model as another size would describe itself
    with pytest.raises(ConfigError, match="its hidden_size is 128, the run's model has 64"):
        ReleasedCheckpoint(path=str(folder))(model, tok, data)
