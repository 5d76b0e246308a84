"""Bad input: one line naming the key, the value and what is allowed, before any heavy work."""
from __future__ import annotations

import errno
import tempfile

import pytest

from harness.errors import ConfigError
from runner import pipeline
from runner.validate import validate
from specdef.defense import SpecDef
from tests.conftest import compose_cfg

# (overrides, the exact message). Config-level: checked before data or a model are touched.
CONFIG_CASES = [
    (["lr=-1e-5"], "lr=-1e-05: allowed a finite number > 0"),
    (["lr=inf"], "lr=inf: allowed a finite number > 0"),
    (["seed=-1"], "seed=-1: allowed an integer >= 0"),
    (["attack.steps=-3"], "attack.steps=-3: allowed an integer >= 0"),
    (["attack.batch_size=-8"], "attack.batch_size=-8: allowed an integer >= 1"),
    (["attack.grad_accum=0"], "attack.grad_accum=0: allowed an integer >= 1"),
    (["model.dtype=fp8"], "model.dtype='fp8': allowed one of float64, float32, bfloat16, float16"),
    (["model.device=tpu"], "model.device='tpu': allowed cpu, cuda, cuda:N, mps or auto"),
    (["attack.recover_threshold=-0.1"], "attack.recover_threshold=-0.1: allowed null or a number in [0, 1]"),
    (["attack.recover_threshold=2"], "attack.recover_threshold=2: allowed null or a number in [0, 1]"),
    (["defense=specdef", "defense.alpha=0"], "defense.alpha=0: allowed a finite number > 0"),
    (["defense=specdef", "defense.alpha=-10"], "defense.alpha=-10: allowed a finite number > 0"),
    (["defense=specdef", "defense.alpha=nan"], "defense.alpha=nan: allowed a finite number > 0"),
    (["defense=specdef", "defense.k=0"], "defense.k=0: allowed an integer >= 1"),
    (["defense=specdef", "defense.method=svd"], "defense.method='svd': allowed lowrank or exact"),
    (["defense=rmu", "defense.steps=-1"], "defense.steps=-1: allowed an integer >= 0"),
    (["attack.undo=merge"], "attack.undo='merge': allowed null, collapse or spectral"),
    (["eval.limit=0"], "eval.limit=0: allowed null or an integer >= 1"),
    (["data.world.bylines=maybe"], "data.world.bylines='maybe': allowed true or false"),
    (["attack=muon", "attack.param_split=null"],
     "attack.param_split=None with attack.optimizer._target_=torch.optim.Muon: Muon takes only the hidden 2-D "
     "weights; allowed attack.param_split=muon (AdamW on the rest) or LoRA"),
    (["model=llama31_8b_instruct", "model.path=/no/such/model"],
     "model.path='/no/such/model': no such folder; allowed a local model folder or a hub id"),
    *((["model=" + m], f"model.source={source!r} with data=synthetic (text): allowed a causal LM (model=tiny, "
       "llama31_8b_instruct, or model.path=<a Hugging Face causal LM>); image models run with image data "
       "(experiment=vision, experiment=diffusion)")
      for m, source in (("tiny_vit", "tiny_vit"), ("vit", "hf_vit"), ("tiny_unet", "tiny_unet"),
                        ("stable_diffusion", "stable_diffusion"))),
    *((["eval=" + e], f"eval={e} with data=synthetic: allowed eval=synthetic or paper with text data")
      for e in ("vision", "diffusion", "stable_diffusion")),
    (["experiment=vision", "eval=synthetic"],
     "eval=synthetic with data=synthetic_images: allowed eval=vision with image data (experiment=vision)"),
    (["experiment=diffusion", "eval=vision"], "eval=vision with data=diffusion_images: allowed eval=diffusion or "
                                              "stable_diffusion with diffusion data (experiment=diffusion)"),
]


@pytest.mark.parametrize("overrides, message", CONFIG_CASES, ids=[" ".join(c[0]) for c in CONFIG_CASES])
def test_config_errors_name_key_value_and_allowed(overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg(*overrides))
    assert str(err.value) == message


def test_the_pipeline_validates_before_loading_anything(tmp_path, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("heavy work started before validation")
    monkeypatch.setattr(pipeline, "load_data", must_not_run)
    monkeypatch.setattr(pipeline, "load_model", must_not_run)
    with pytest.raises(ConfigError, match="^lr=0: allowed"):
        pipeline.run(compose_cfg("lr=0"), tmp_path)


# Model-level: checked by SpecDef before any layer (or a base defense) is touched.
MODEL_CASES = [
    ({"k": 500}, "defense.k=500"),
    ({"layers": ["model.layers.*.mlp.gate_projection"]}, "defense.layers="),
]


@pytest.mark.parametrize("kwargs, start", MODEL_CASES)
def test_specdef_checks_the_model_before_its_base_trains(tiny_model, data, kwargs, start):
    model, tok = tiny_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    defense = SpecDef(alpha=1e3, **{"k": 8, "base": "rmu", **kwargs})
    with pytest.raises(ConfigError) as err:
        defense(model, tok, data)
    assert str(err.value).startswith(start) and "allowed" in str(err.value)
    assert "\n" not in str(err.value)
    assert all((before[k] == v).all() for k, v in model.state_dict().items())  # rmu never ran


def test_unwritable_run_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="is not writable"):
        pipeline.run(compose_cfg(), blocker / "run")


def test_full_disk_is_a_clear_error(tmp_path, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", no_space)
    with pytest.raises(ConfigError, match="not writable \\(No space left on device\\)"):
        pipeline.run(compose_cfg(), tmp_path / "run")
