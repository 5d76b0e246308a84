"""SpecDef on the pretrained tiny model: function preservation, σ₁ amplification, errors, drift
record, composition with a base defense, other decoder families, the release format, and a run."""
from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, Qwen2Config, Qwen2ForCausalLM

from harness.batches import encode
from harness.errors import ConfigError
from harness.models import from_pretrained
from specdef import SpecDefLinear, apply_specdef, transform
from specdef.core import specdef_modules
from specdef.defense import SpecDef
from specdef.release import load_defended, save_defended

DOWN = ["model.layers.*.mlp.down_proj"]


def logits(model, tokenizer, texts, max_length=32):
    batch = encode(tokenizer, texts, max_length)
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def rel_error(out, ref) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


@pytest.mark.parametrize("method", ["lowrank", "exact"])
def test_function_preserved_and_top_singular_values_amplified(tiny_model, data, method):
    model, tok = tiny_model
    texts = data.heldout_text(16)
    ref = logits(model, tok, texts)
    originals = {n: model.get_submodule(n).weight.detach().clone() for n in
                 [f"model.layers.{i}.mlp.down_proj" for i in range(4)]}
    reports = transform(model, alpha=100.0, k=8, layers=DOWN, method=method)
    assert [r.name for r in reports] == list(originals)
    # float32 storage: error ~ eps·α (results/precision_frontier.md), 1e-4 leaves a 10x margin over the measured 8e-6
    assert rel_error(logits(model, tok, texts), ref) < 1e-4
    for r in reports:
        assert r.sigma_ratio == pytest.approx(1.0, abs=0.01)
        layer = model.get_submodule(r.name)
        assert isinstance(layer, SpecDefLinear) and layer.comp.weight.shape == (128, 128)
        s_orig = torch.linalg.svdvals(originals[r.name].double())
        s_new = torch.linalg.svdvals(layer.inner.weight.double())
        # the k amplified values are the k largest of W', and they are α times the k largest of W
        torch.testing.assert_close(s_new[:8], 100.0 * s_orig[:8], rtol=2e-2, atol=0)


def test_parameter_count_grows_by_one_square_matrix_per_layer(tiny_model):
    model, _ = tiny_model
    before = sum(p.numel() for p in model.parameters())
    apply_specdef(model, alpha=10.0, k=4,
                  layers=["model.layers.0.mlp.down_proj", r"re:model\.layers\.[23]\.mlp\.down_proj"])
    assert sum(p.numel() for p in model.parameters()) == before + 3 * 128 * 128


@pytest.mark.parametrize("kwargs, message", [
    ({"layers": ["model.layers.*.mlp.nothing"]},
     r"defense.layers='model.layers.\*.mlp.nothing': matches no nn.Linear, Conv1D or MoE experts module; "
     r"allowed .*lm_head"),
    ({"k": 129}, r"defense.k=129: allowed an integer in 1..128 .*model.layers.0.mlp.down_proj"),
    ({"k": 0}, r"defense.k=0: allowed an integer in 1..128"),
    ({"alpha": 0.0}, r"defense.alpha=0.0: allowed a finite number > 0"),
    ({"alpha": -3.0}, r"defense.alpha=-3.0: allowed a finite number > 0"),
    ({"alpha": float("nan")}, r"defense.alpha=nan: allowed a finite number > 0"),
    ({"alpha": float("inf")}, r"defense.alpha=inf: allowed a finite number > 0"),
    ({"method": "qr"}, r"defense.method='qr': allowed lowrank, exact"),
])
def test_clear_errors_leave_the_model_untouched(tiny_model, kwargs, message):
    model, _ = tiny_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=message):
        transform(model, **{"alpha": 10.0, "k": 8, "layers": DOWN, **kwargs})
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_defending_twice_is_refused(tiny_model):
    model, _ = tiny_model
    apply_specdef(model, alpha=10.0, k=2, layers=DOWN)
    with pytest.raises(ConfigError, match="already is a SpecDefLinear"):
        apply_specdef(model, alpha=10.0, k=2, layers=DOWN)


def test_defense_records_alpha_drift_and_sigma_ratios(tiny_model, data):
    model, tok = tiny_model
    defense = SpecDef(alpha=1e3, k=8, layers=DOWN, drift_samples=32)
    defended = defense(model, tok, data)
    info = defense.info
    assert defended is model and info["alpha"] == 1e3 and info["k"] == 8 and info["method"] == "lowrank"
    assert len(info["layers_matched"]) == 4 and info["params_added"] == 4 * 128 * 128
    assert all(abs(r - 1) < 0.01 for r in info["sigma_ratio"].values())
    drift = info["drift"]
    assert drift["dtype"] == "float32" and drift["tokens"] > 0
    assert 0 < drift["rel_logit_error"] < 1e-3 and drift["kl_mean"] < 1e-6 and drift["max_abs_logit_diff"] < 0.1
    # float32 carries ~1e5 (results/precision_frontier.md); the estimate comes from this one measurement
    assert 1e4 < info["max_supported_alpha"] < 1e7
    json.dumps(info)  # goes into result.json


def test_bfloat16_cannot_carry_alpha_1e4(tiny_path, data, caplog):
    model, tok = from_pretrained(tiny_path, dtype="bfloat16")
    # strict: refused before any work, from eps(bfloat16) * alpha alone
    strict = SpecDef(alpha=1e4, k=8, layers=DOWN, strict_drift=True, drift_samples=16)
    with pytest.raises(ConfigError, match=r"defense.alpha=10000: bfloat16 carries alpha up to about .* within "
                                          r"defense.drift_tolerance=0.01"):
        strict(model, tok, data)

    # not strict: defended, and the measured drift says the same
    model, tok = from_pretrained(tiny_path, dtype="bfloat16")
    lenient = SpecDef(alpha=1e4, k=8, layers=DOWN, drift_samples=16)
    with caplog.at_level(logging.WARNING, logger="specdef.defense"):
        lenient(model, tok, data)
    assert sum("bfloat16 carries alpha up to about" in r.message for r in caplog.records) == 1
    assert lenient.info["max_supported_alpha"] < 1e3  # the measured bfloat16 frontier is ~1e1-1e2


class ScaleHead:
    """A stand-in base defense: scales the LM head (a change SpecDef must keep, not undo)."""
    name = "scale_head"

    def __init__(self, scale: float):
        self.scale = scale
        self.info = {"scale": scale}

    def __call__(self, model, tokenizer, data):
        with torch.no_grad():
            model.lm_head.weight.mul_(self.scale)
        return model


def test_base_defense_runs_first_and_is_recorded(tiny_path, data):
    model, tok = from_pretrained(tiny_path)
    scaled, _ = from_pretrained(tiny_path)
    ScaleHead(2.0)(scaled, tok, data)
    texts = data.heldout_text(8)
    base = {"_target_": f"{__name__}.ScaleHead", "scale": 5.0}
    defense = SpecDef(alpha=10.0, k=4, layers=DOWN, base=base, base_overrides={"scale": 2.0}, drift_samples=8)
    defense(model, tok, data)
    assert defense.info["base"] == {"name": "scale_head", "scale": 2.0}
    assert rel_error(logits(model, tok, texts), logits(scaled, tok, texts)) < 1e-5
    # drift is measured against the base-defended model, so the base's own change is not counted
    assert defense.info["drift"]["rel_logit_error"] < 1e-5

    # an inline base in a Hydra config arrives already instantiated
    from hydra.utils import instantiate
    inline = instantiate({"_target_": "specdef.defense.SpecDef", "alpha": 10.0, "k": 4, "layers": DOWN,
                          "drift_samples": 8, "base": base})
    inline(*from_pretrained(tiny_path), data)
    assert inline.info["base"] == {"name": "scale_head", "scale": 5.0}

    none = SpecDef(alpha=10.0, k=4, layers=DOWN, base="none", drift_samples=8)
    none(*from_pretrained(tiny_path), data)
    assert none.info["base"] == {"name": "none"}


def test_unknown_or_nested_base_is_a_config_error(tiny_model, data):
    with pytest.raises(ConfigError, match=r"defense.base='nope': no conf/defense/nope.yaml; allowed .*none"):
        SpecDef(alpha=10.0, k=4, base="nope")(*tiny_model, data)
    with pytest.raises(ConfigError, match="allowed a defense other than specdef"):
        SpecDef(alpha=10.0, k=4, base="specdef")(*tiny_model, data)


def _qwen2():
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                        tie_word_embeddings=True))


def _gpt_neox():
    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                            num_attention_heads=4, max_position_embeddings=32))


@pytest.mark.parametrize("build, names", [
    (_qwen2, ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]),
    (_gpt_neox, ["gpt_neox.layers.0.mlp.dense_4h_to_h", "gpt_neox.layers.1.mlp.dense_4h_to_h"]),  # with bias
])
def test_other_decoders_keep_their_function_and_round_trip(build, names, tmp_path):
    # random init is enough here: only function preservation and the release format are checked
    torch.manual_seed(0)
    model = build().eval()
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        ref = model(ids).logits
    reports = transform(model, alpha=100.0, k=4)  # default layers: MLP output projections
    assert [r.name for r in reports] == names
    with torch.no_grad():
        out = model(ids).logits
    assert rel_error(out, ref) < 1e-4
    loaded, _ = load_defended(save_defended(model, None, tmp_path / "release"))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, out)


def test_release_round_trip_is_bit_exact_and_checksummed(tiny_model, data, tmp_path):
    model, tok = tiny_model
    apply_specdef(model, alpha=1e4, k=8, layers=DOWN)
    folder = save_defended(model, tok, tmp_path / "release")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["dtype"] == "float32" and len(manifest["layers"]) == 4
    assert manifest["layers"][0] == {"name": "model.layers.0.mlp.down_proj", "inner_shape": [128, 256], "bias": False,
                                     "comp_shape": [128, 128], "alpha": 1e4, "k": 8, "method": "lowrank"}
    assert "model.safetensors" in manifest["files"] and not list(folder.glob("*.bin"))
    loaded, loaded_tok = load_defended(folder)
    texts = data.heldout_text(8)
    assert torch.equal(logits(loaded, loaded_tok, texts), logits(model, tok, texts))

    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ConfigError, match="checksum mismatch in model.safetensors"):
        load_defended(folder)


def test_run_records_alpha_and_drift(tmp_path):
    """`python run.py defense=specdef attack=adam lr=1e-5`, cut to 2 attack steps and 8 questions per task."""
    from tests.conftest import compose_cfg
    from runner.pipeline import run
    cfg = compose_cfg("defense=specdef", "attack=adam", "lr=1e-5", "attack.steps=2", "attack.eval_every=2",
                      "eval.limit=8", "eval.ppl_samples=16", "defense.drift_samples=16",
                      "cache_defended=false")  # run SpecDef itself, not the pipeline's cached copy
    run(cfg, tmp_path)
    record = json.loads((tmp_path / "result.json").read_text())
    defense = record["defense"]
    assert defense["name"] == "specdef" and defense["alpha"] == 1e4 and defense["k"] == 8
    assert defense["layers_matched"] == [f"model.layers.{i}.mlp.down_proj" for i in range(4)]
    assert 0 < defense["drift"]["rel_logit_error"] < 1e-2
    assert math.isfinite(record["metrics"]["pre_attack"]["retain_ppl"])


def test_speed_benchmark_smoke():
    """benchmarks/specdef_speed.py --small: the plumbing only; the timing itself is not a test."""
    from benchmarks.specdef_speed import main
    result = main(["--small", "--layers", "2"])
    assert result["layers"] == 2 and result["fast_total_s"] > 0 and result["full_over_fast"] > 0
    assert abs(result["sigma_ratio_min"] - 1) < 1e-3 and abs(result["sigma_ratio_max"] - 1) < 1e-3
    assert result["comp_mib"] == pytest.approx(2 * 256 * 256 * 4 / 2**20)


def test_precision_frontier_reduced(tmp_path):
    """experiments/precision_frontier.py on 2 dtypes x 2 α: float32 carries 1e3, bfloat16 does not."""
    from experiments.precision_frontier import main
    table = main(["--dtypes", "float32", "bfloat16", "--alphas", "10", "1000", "--texts", "8", "--out", str(tmp_path)])
    largest = dict(zip(table["dtype"], table["max_alpha_within_tolerance"]))
    assert largest["float32"] == 1000.0
    assert math.isnan(largest["bfloat16"]) or largest["bfloat16"] <= 10.0
    assert {p.name for p in tmp_path.iterdir()} == {f"precision_frontier.{s}" for s in ("csv", "md", "png")}


def test_float32_algebra_and_bad_compute_dtype(tiny_model, data):
    model, tok = tiny_model
    texts = data.heldout_text(8)
    ref = logits(model, tok, texts)
    transform(model, alpha=100.0, k=8, layers=DOWN, compute_dtype="float32")
    assert rel_error(logits(model, tok, texts), ref) < 1e-4  # ~2 ulp from the float64 algebra, same 1e-4 bound
    with pytest.raises(ConfigError, match="defense.compute_dtype='float16': allowed float64, float32"):
        transform(model, alpha=100.0, k=8, layers=["lm_head"], compute_dtype="float16")


def test_without_compensation_the_function_changes(tiny_model, data):
    """The paper's ablation: sigma_1 scaled alone breaks the model, the compensation is what keeps it."""
    model, tok = tiny_model
    defense = SpecDef(alpha=1e2, k=8, layers=DOWN, drift_samples=32, compensate=False)
    defended = defense(model, tok, data)
    assert not list(specdef_modules(defended))
    assert defense.info["params_added"] == 0 and defense.info["compensate"] is False
    assert all(abs(r - 1) < 0.01 for r in defense.info["sigma_ratio"].values())
    assert defense.info["drift"]["rel_logit_error"] > 0.1
