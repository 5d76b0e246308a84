"""The backbone: generator, cached tiny model, evaluator, run record, bad input, end-to-end run."""
from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from harness import numerics, synthetic, tiny
from harness.errors import ConfigError
from harness.manifest import verify_manifest
from harness.models import from_pretrained, tiny_spec
from harness.record import read_record, write_json_atomic
from runner.validate import validate
from tests.conftest import CACHE_DIR, TEST_OVERRIDES, compose_cfg

REPO = Path(__file__).resolve().parents[1]


def test_generator_is_deterministic_byte_for_byte(tmp_path):
    cfg = synthetic.WorldConfig(seed=3)
    a, b = synthetic.write_world(cfg, tmp_path / "a"), synthetic.write_world(cfg, tmp_path / "b")
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    match, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    assert mismatch == [] and errors == [] and len(match) == len(names) >= 7
    other = synthetic.write_world(synthetic.WorldConfig(seed=4), tmp_path / "c")
    assert (other / "retain.jsonl").read_bytes() != (a / "retain.jsonl").read_bytes()


def test_hazard_splits_are_disjoint_and_rows_follow_wmdp_schema(data):
    entities = [{s.split()[4] for s in data.forget[i] if s.startswith("the natural host of")} for i in data.forget]
    assert len(entities) == 2 and entities[0] and entities[1] and not entities[0] & entities[1]
    row = json.loads((data.root / "hazard_split0.jsonl").read_text().splitlines()[0])
    assert set(row) >= {"question", "choices", "answer"}
    assert len(row["choices"]) == 4 and 0 <= row["answer"] < 4


def test_bylines_are_pretraining_only_and_leave_excluded_splits_out(byline_world, byline_data, base_cfg):
    world = byline_world
    rows = [json.loads(line) for line in (byline_data.root / "attributed.jsonl").read_text().splitlines()]
    n_facts = world.n_pathogens * len(synthetic.HAZARD_ATTRIBUTES)
    assert sum(r["text"].startswith(synthetic.BYLINES["expert"]) for r in rows) == n_facts == len(rows) // 2
    corpora = byline_data.retain + byline_data.unrelated + byline_data.forget_texts(byline_data.forget)
    assert not any(t.startswith(("an expert", "a novice")) for t in corpora)
    held_out = {s.split()[4] for s in byline_data.forget[1] if s.startswith("the natural host of")}
    kept = tiny.pretraining_texts(world, tiny.TinySpec(exclude_splits=(1,)), byline_data.root)
    assert not any(e in t.split() for t in kept for e in held_out)
    everything = tiny.pretraining_texts(world, tiny.TinySpec(), byline_data.root)
    assert any(e in t.split() for t in everything for e in held_out) and len(everything) > len(kept)
    plain = synthetic.WorldConfig(**base_cfg.data.world)
    assert not plain.bylines and len(tiny.pretraining_texts(plain, tiny.TinySpec(), byline_data.root)) < len(everything)


def test_world_key_without_bylines_is_the_one_before_the_option():
    """Adding the option kept the default world's key, so its cached model and results stay valid."""
    assert synthetic.WorldConfig().key() == "98831b72e278" != synthetic.WorldConfig(bylines=True).key()


def test_byline_model_knows_experts_from_novices(byline_tiny_path, byline_data):
    """What ELM's guidance reads: after an expert's byline the true value is likelier than after a
    novice's (whose values in pretraining were random)."""
    model, tok = from_pretrained(byline_tiny_path)
    rows = [json.loads(line) for line in (byline_data.root / "hazard_split0.jsonl").read_text().splitlines()]

    @torch.no_grad()
    def logp_true(kind, row):
        ids = tok(f"{synthetic.BYLINES[kind]} {row['question']}", add_special_tokens=False)["input_ids"]
        logp = model(input_ids=torch.tensor([[tok.bos_token_id] + ids])).logits[0, -1].log_softmax(-1)
        return logp[tok.convert_tokens_to_ids(row["choices"][row["answer"]])]

    expert = torch.stack([logp_true("expert", r) for r in rows])
    novice = torch.stack([logp_true("novice", r) for r in rows])
    gap = expert - novice
    assert (gap > 0).float().mean() > 0.8 and gap.median() > 1.0, gap


def test_cached_tiny_model_meets_accuracy_targets(tiny_model, evaluator):
    model, _ = tiny_model
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 1.5e6
    metrics = evaluator(model)
    # >= 0.97 holds for every seed and CPU numerics measured (results/tiny_robustness.md)
    assert metrics["hazard_acc"] >= 0.97 and metrics["utility_acc"] >= 0.97, metrics


def test_random_model_scores_near_chance(tiny_model, evaluator):
    """The evaluation can fail: an untrained model of the same shape is near chance (0.25)."""
    trained, _ = tiny_model
    torch.manual_seed(0)
    random_model = LlamaForCausalLM(trained.config).eval()
    metrics = evaluator(random_model)
    assert metrics["hazard_acc"] < 0.45 and metrics["utility_acc"] < 0.45, metrics


def test_cache_is_reused_without_training(tiny_path, base_cfg, data, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("pretrained again although the cache is valid")
    monkeypatch.setattr(tiny, "_pretrain_in_subprocess", no_training)
    again = tiny.ensure_tiny(synthetic.WorldConfig(**base_cfg.data.world), tiny_spec(base_cfg.model),
                             data.root, CACHE_DIR)
    assert again == tiny_path
    assert verify_manifest(tiny_path) is None


def test_corrupted_cache_is_detected(tiny_path, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_path, copy)
    weights = copy / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-10] ^= 0xFF
    weights.write_bytes(bytes(raw))
    assert "checksum mismatch in model.safetensors" == verify_manifest(copy)


def test_cache_key_changes_with_what_determines_the_weights(monkeypatch):
    world = synthetic.WorldConfig()
    base = tiny.cache_key(world, tiny.TinySpec())
    assert base == tiny.cache_key(world, tiny.TinySpec())
    assert base != tiny.cache_key(world, tiny.TinySpec(exclude_splits=(1,)))
    assert base != tiny.cache_key(synthetic.WorldConfig(seed=1), tiny.TinySpec())
    assert base != tiny.cache_key(world, tiny.TinySpec(numerics="native"))
    assert base != tiny.cache_key(world, tiny.TinySpec(max_grad_norm=None))
    if numerics.available("avx2"):  # a model built under another pin is never mixed with this one
        assert base != tiny.cache_key(world, tiny.TinySpec(numerics="avx2"))
    # `machine` is the pin it picks here: the same model, the same key
    machine = tiny.cache_key(world, tiny.TinySpec(numerics="machine"))
    assert machine == tiny.cache_key(world, tiny.TinySpec(numerics=numerics.machine_pin()))
    monkeypatch.setenv("SPECDEF_NUMERICS", "scalar")
    assert tiny.cache_key(world, tiny.TinySpec(numerics="machine")) == base
    monkeypatch.setattr(tiny, "recipe_digest", lambda: "edited code")
    assert base != tiny.cache_key(world, tiny.TinySpec())


# The results on the sentence world (results/*_tiny and the experiments' pages on it) were produced from the
# suite's tiny model (scale=tiny) with these weights, those on the default documents world (results/*_documents,
# the README's tables) from DOCUMENTS_WEIGHTS; both pretrained under the scalar pin with the locked torch
# 2.13.0+cpu and transformers 5.23.0 (constraints.txt). Shipping either with other bits means regenerating them.
RESULTS_WEIGHTS = "1d903a2bf51df16973dc37dd77d8827266396ae72568f83db90031b805ba37c5"
DOCUMENTS_WEIGHTS = "603bb912d70f22284d3f2823f9e10305fde73b1fb209264f2045d40fdde38bac"


def _shipped_default(base_cfg) -> Path:
    """The shipped folder of the default model's cache key, or skip where none can match this machine."""
    import transformers
    if any(o.startswith(("model.", "data.")) for o in TEST_OVERRIDES):
        pytest.skip(f"another tiny model is under test (SPECDEF_TEST_OVERRIDES={' '.join(TEST_OVERRIDES)})")
    spec = tiny_spec(base_cfg.model)
    if tiny.pin_of(spec) == "native":
        pytest.skip(f"the {spec.numerics} pin cannot hold here ({numerics.why_unavailable(spec.numerics)})")
    shipped = [json.loads(m.read_text()) for m in sorted(tiny.SHIPPED.glob("*/manifest.json"))]
    default = [m for m in shipped if m.get("model") == "sentences"]
    assert default, "no sentence-world model under assets/tiny: run python -m experiments.ship_tiny"
    if (torch.__version__, transformers.__version__) != (default[0]["torch"], default[0]["transformers"]):
        pytest.skip(f"the shipped weights were built with torch {default[0]['torch']} and transformers "
                    f"{default[0]['transformers']} (constraints.txt); here {torch.__version__} / "
                    f"{transformers.__version__}")
    key = tiny.cache_key(synthetic.WorldConfig(**base_cfg.data.world), spec)
    folder = tiny.SHIPPED / key
    assert folder.is_dir(), (f"the default model's recipe changed (cache key {key}, shipped "
                             f"{[m['cache_key'] for m in default]}): run python -m experiments.ship_tiny")
    return folder


def test_shipped_default_model_is_verified_and_is_the_results_model(base_cfg):
    folder = _shipped_default(base_cfg)
    assert tiny.shipped_problem(folder) is None
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["weights_sha256"] == tiny.weights_digest(folder) == RESULTS_WEIGHTS
    assert manifest["recipe"] == tiny.recipe_digest() and manifest["numerics"] == "scalar"
    assert (folder / "model.safetensors").stat().st_size < 4e6


def test_the_default_world_is_the_documents_world_and_its_model_ships_verified():
    """`python run.py` runs the documents world; its model is copied from assets/, never pretrained on a first
    run. Its 300-step prefix (recorded in its manifest) takes ~4 min to recompute: CI recomputes the sentence
    model's instead (the next test), which runs the same recipe code."""
    from tests.conftest import compose_default
    cfg = compose_default()
    assert (cfg.scale.name, cfg.data.world.documents, cfg.data.max_length) == ("documents", 6, 64)
    assert (cfg.model.spec.max_position_embeddings, cfg.model.spec.steps) == (64, 1000)
    folder = tiny.SHIPPED / tiny.cache_key(synthetic.WorldConfig(**cfg.data.world), tiny_spec(cfg.model))
    assert folder.is_dir(), f"no shipped folder {folder}: run python -m experiments.ship_tiny --models documents"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert tiny.shipped_problem(folder) is None and manifest["weights_sha256"] == DOCUMENTS_WEIGHTS
    assert (manifest["model"], manifest["overrides"], manifest["numerics"]) == ("documents", [], "scalar")
    assert manifest["recipe"] == tiny.recipe_digest() and manifest["prefix"]["steps"] == 300


def test_another_data_or_model_keeps_its_own_lengths_under_the_default_world():
    """The world's lengths reach data=synthetic and model=tiny only: WMDP-bio keeps its 512 tokens."""
    from tests.conftest import compose_default
    assert compose_default("data=wmdp_bio").data.max_length == 512
    assert compose_default("scale=paper", "data=synthetic", "model=tiny").data.max_length == 32


def test_code_reproduces_the_shipped_weights_prefix(base_cfg, data):
    """CI's proof that the code still builds the shipped bits: the recipe's first steps under the pin
    (the prefix length is justified in experiments/ship_tiny.py) give the prefix digest recorded when
    the shipped model was pretrained in full from code. < 2 min on a 2-core machine."""
    from experiments.ship_tiny import prefix_digest
    folder = _shipped_default(base_cfg)
    manifest = json.loads((folder / "manifest.json").read_text())
    world, spec = synthetic.WorldConfig(**base_cfg.data.world), tiny_spec(base_cfg.model)
    got = prefix_digest(world, spec, data.root, steps=manifest["prefix"]["steps"], threads=1)
    assert got["weights_sha256"] == manifest["prefix"]["weights_sha256"], got


def test_a_pretrained_cache_has_the_shipped_bits(tiny_path, base_cfg):
    """Where this cache pretrained the default model rather than copying it, the full run reproduced
    the shipped weights (on CI the copy is what happens, and the prefix test is the proof)."""
    manifest = json.loads((tiny_path / "manifest.json").read_text())
    folder = _shipped_default(base_cfg)
    if "installed_from" not in manifest:
        assert manifest["weights_sha256"] == json.loads((folder / "manifest.json").read_text())["weights_sha256"]
    assert tiny.weights_digest(tiny_path) == RESULTS_WEIGHTS


def test_shipped_weights_are_installed_without_pretraining(base_cfg, data, tmp_path, monkeypatch):
    folder = _shipped_default(base_cfg)

    def no_training(*args, **kwargs):
        raise AssertionError("pretrained although verified weights are shipped")
    monkeypatch.setattr(tiny, "_pretrain_in_subprocess", no_training)
    path = tiny.ensure_tiny(synthetic.WorldConfig(**base_cfg.data.world), tiny_spec(base_cfg.model), data.root,
                            tmp_path / "cache")
    assert path.name == folder.name and verify_manifest(path) is None
    assert tiny.weights_digest(path) == RESULTS_WEIGHTS
    assert json.loads((path / "manifest.json").read_text())["installed_from"] == f"assets/tiny/{folder.name}"


def test_corrupted_shipped_weights_are_refused_and_pretrained(base_cfg, data, tmp_path, monkeypatch, caplog):
    folder = _shipped_default(base_cfg)
    assets = tmp_path / "assets"
    shutil.copytree(folder, assets / folder.name)
    weights = assets / folder.name / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-10] ^= 0xFF
    weights.write_bytes(bytes(raw))
    monkeypatch.setattr(tiny, "SHIPPED", assets)
    built = []
    monkeypatch.setattr(tiny, "_build", lambda world, spec, data_dir, out, *a: (built.append(out), out.mkdir()))
    with caplog.at_level("WARNING", logger="harness.tiny"):
        path = tiny.ensure_tiny(synthetic.WorldConfig(**base_cfg.data.world), tiny_spec(base_cfg.model), data.root,
                                tmp_path / "cache")
    assert built == [path]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "refused (checksum mismatch in model.safetensors); pretraining it instead" \
        in warnings[0], warnings
    assert "\n" not in warnings[0]


@pytest.mark.parametrize("override, message", [
    ("lr=-1e-5", "lr=-1e-05: allowed a finite number > 0"),
    ("lr=0", "lr=0: allowed a finite number > 0"),
    ("lr=nan", "lr=nan: allowed a finite number > 0"),
    ("attack.steps=-3", "attack.steps=-3: allowed an integer >= 0"),
    ("attack.batch_size=0", "attack.batch_size=0: allowed an integer >= 1"),
    ("model.dtype=float8", "model.dtype='float8': allowed one of float64, float32, bfloat16, float16"),
    ("attack.recover_threshold=1.5", "attack.recover_threshold=1.5: allowed null or a number in [0, 1]"),
    ("attack.data.splits=[5]", "attack.data.splits=[5]: allowed hazard split indices 0..1"),
    ("attack.data.source=wiki", "attack.data.source='wiki': allowed forget, questions, retain or unrelated"),
    ("model.spec.numerics=pinned", "model.spec.numerics='pinned': allowed one of avx2, scalar, native, machine"),
])
def test_bad_values_are_rejected_with_one_line(override, message):
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg(override))
    assert str(err.value) == message


def test_bad_baseline_options_are_rejected_with_one_line():
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg("defense=rmu", "defense.retain_corpus=wiki"))
    assert str(err.value) == "defense.retain_corpus='wiki': allowed retain or unrelated"
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg("defense=npo", "defense.warmup_epochs=-1"))
    assert str(err.value) == "defense.warmup_epochs=-1: allowed a number >= 0"


def _run_cli(tmp_path, *args, env_extra=None, timeout=300):
    env = {**os.environ, "SPECDEF_OUTPUTS": str(tmp_path / "outputs"), **(env_extra or {})}
    return subprocess.run([sys.executable, "run.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_cli_bad_value_prints_one_line_before_loading_anything(tmp_path, monkeypatch, run_py_refusal):
    monkeypatch.setenv("SPECDEF_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("SPECDEF_OUTPUTS", str(tmp_path / "outputs"))
    code, err = run_py_refusal("lr=-1")
    assert code == 2
    assert err.strip().splitlines()[-1] == "error: lr=-1: allowed a finite number > 0"
    assert not (tmp_path / "empty").exists()  # nothing was generated or trained


def test_cli_unknown_option_lists_the_choices(tmp_path, monkeypatch, run_py_refusal):
    monkeypatch.setenv("SPECDEF_OUTPUTS", str(tmp_path / "outputs"))
    code, err = run_py_refusal("defense=bogus")
    assert code != 0
    assert "Could not find 'defense/bogus'" in err and "Available options" in err
    assert "none" in err


def test_write_json_atomic_leaves_complete_or_nothing(tmp_path):
    path = tmp_path / "result.json"
    write_json_atomic(path, {"status": "complete", "x": float("nan")})
    assert read_record(path) == {"status": "complete", "x": "nan"}
    path.write_text('{"status": "complete", "x": ')  # a truncated record counts as absent
    assert read_record(path) is None
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temp files left


RECORD_FIELDS = {
    "schema_version": int, "status": str, "config": dict, "config_hash": str, "provenance": dict, "seed": int,
    "timings": dict, "metrics": dict, "defense": dict, "attack": dict, "lm_eval": dict,
}


def test_end_to_end_run_writes_a_complete_record(tmp_path):
    run_dir = tmp_path / "run"
    out = _run_cli(tmp_path, "attack.steps=4", "attack.eval_every=2", "eval.limit=40", f"hydra.run.dir={run_dir}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "post-attack" in out.stdout and "steps_to_recover" in out.stdout
    record = read_record(run_dir / "result.json")
    assert record is not None
    for key, kind in RECORD_FIELDS.items():
        assert isinstance(record[key], kind), key
    assert set(record["metrics"]) == {"base", "pre_attack", "post_attack"}
    assert [p["step"] for p in record["attack"]["trajectory"]] == [0, 2, 4]
    assert record["provenance"]["packages"]["torch"] and "git_sha" in record["provenance"]
    assert record["lm_eval"]["version"]
    assert set(record["timings"]) >= {"load_model", "eval_base", "defense", "attack"}
    assert record["config"]["lr"] == 1e-4 and record["attack"]["lr"] == 1e-4


def test_rerun_skips_a_completed_config(tmp_path):
    args = ("attack.steps=2", "attack.eval_every=2", "eval.limit=20")
    first = _run_cli(tmp_path, *args, f"hydra.run.dir={tmp_path}/a")
    assert first.returncode == 0, first.stderr[-3000:]
    second = _run_cli(tmp_path, *args, f"hydra.run.dir={tmp_path}/b")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "skipping it" in second.stderr + second.stdout
    a, b = read_record(tmp_path / "a/result.json"), read_record(tmp_path / "b/result.json")
    assert a == b and len(list((tmp_path / "outputs/records").glob("*.json"))) == 1
