"""Shared fixtures: the cached pretrained tiny model (trained once per cache, reused by every test),
the synthetic data, and Hydra `compose()` of the real configs.

`SPECDEF_TEST_OVERRIDES` (Hydra overrides separated by spaces, e.g. "model.spec.seed=1
model.spec.numerics=native") is appended to every composed config, so the suite can be run against
another tiny model to check that no test is fitted to one model (see results/tiny_robustness.md)."""
from __future__ import annotations

import os
import threading
from pathlib import Path

# The runs the tests start (`run.py` in a subprocess) use one thread like the in-process tests (below):
# beside the pretraining thread, two-thread OpenMP ops of the tiny model spin-wait for a busy core and
# take several times longer than one thread. The pretraining subprocess sets its own thread count.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest
import torch
from hydra import compose, initialize_config_dir

from harness import synthetic, tiny
from harness.data import synthetic_data
from harness.models import from_pretrained, tiny_spec

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
CACHE_DIR = Path(os.environ.get("SPECDEF_CACHE", "~/.cache/specdef_harness")).expanduser()


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread():
    """Tiny-model ops gain nothing from a second thread, and on a busy CPU OpenMP spin-waits cost 10-20x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TEST_OVERRIDES = os.environ.get("SPECDEF_TEST_OVERRIDES", "").split()
# The suite runs on the sentence world (scale=tiny), not on the default documents world (conf/config.yaml):
# the tests exercise code paths, and the sentence world's 32-token lines cost half a 64-token document's
# step; the two other models the tests need (naive, bylines) ship for it. Tests of the default world compose
# scale=documents (a later scale= wins), or no scale at all through compose_default.
SUITE_WORLD = ["scale=tiny"]


@pytest.fixture
def run_py_refusal(monkeypatch, capsys, tmp_path):
    """`python run.py <overrides>` in this process, for input run.py must refuse: returns (exit code, stderr).
    The same script, Hydra main and error printing as a subprocess, without a new interpreter's ~5 s of imports."""
    import logging
    import runpy
    from hydra.core.global_hydra import GlobalHydra
    script = str(Path(CONF_DIR).parent / "run.py")

    def run(*overrides: str) -> tuple[int, str]:
        monkeypatch.setattr("sys.argv", [script, *overrides, f"hydra.run.dir={tmp_path}/run"])
        root = logging.getLogger()
        handlers, level = root.handlers[:], root.level  # Hydra configures logging for the job it starts
        GlobalHydra.instance().clear()
        try:
            with pytest.raises(SystemExit) as exit_:
                runpy.run_path(script, run_name="__main__")
        finally:
            GlobalHydra.instance().clear()
            root.handlers[:], root.level = handlers, level
        return exit_.value.code, capsys.readouterr().err
    return run


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """A local Hugging Face cache, the hub out of reach: `hf_cache(repo, folder)` stores `folder` as the main
    snapshot of `repo`, laid out as huggingface_hub writes one; hub ids then resolve from it alone."""
    import shutil
    from huggingface_hub import constants
    cache = tmp_path / "hf_cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def store(repo: str, folder: Path) -> None:
        commit, entry = "0" * 40, cache / f"models--{repo.replace('/', '--')}"
        shutil.copytree(folder, entry / "snapshots" / commit)
        (entry / "refs").mkdir(parents=True)
        (entry / "refs" / "main").write_text(commit)
    return store


def compose_cfg(*overrides: str):
    """The config `python run.py scale=tiny <overrides>` would run with (no local overrides), plus the
    variation under test (SPECDEF_TEST_OVERRIDES)."""
    return compose_default(*SUITE_WORLD, *TEST_OVERRIDES, *overrides)


def compose_default(*overrides: str):
    """The config `python run.py <overrides>` would run with: the default world unless they name a scale."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=False)


@pytest.fixture(scope="session")
def base_cfg():
    return compose_cfg()


@pytest.fixture(scope="session")
def data(base_cfg):
    return synthetic_data(synthetic.WorldConfig(**base_cfg.data.world), CACHE_DIR, base_cfg.data.max_length)


@pytest.fixture(scope="session")
def tiny_path(base_cfg, data) -> Path:
    return _ensure(base_cfg)


@pytest.fixture()
def tiny_model(tiny_path):
    """A fresh copy of the pretrained tiny model and its tokenizer (cheap: ~0.7 M parameters)."""
    return from_pretrained(tiny_path)


@pytest.fixture(scope="session")
def evaluator(base_cfg, data, tiny_path):
    from harness.evaluate import build_evaluator
    _, tokenizer = from_pretrained(tiny_path)
    return build_evaluator(base_cfg.eval, tokenizer, data)


def naive_cfg():
    """The tiny model pretrained without hazard split 1 (relearning a never-seen split). All the
    default's steps: with 1000, relearning split 1 stalled near 0.5 for every optimizer."""
    return compose_cfg("model.spec.exclude_splits=[1]")


def byline_cfg():
    """The tiny model of the world with expert / novice bylines (ELM's world). All the default's steps:
    with 1000 its utility accuracy was 0.65."""
    return compose_cfg("data.world.bylines=true")


def _ensure(cfg, threads: int | None = None) -> Path:
    world = synthetic.WorldConfig(**cfg.data.world)
    data = synthetic_data(world, CACHE_DIR, cfg.data.max_length)
    return tiny.ensure_tiny(world, tiny_spec(cfg.model), data.root, CACHE_DIR, progress=False, threads=threads)


@pytest.fixture(scope="session")
def naive_model_path(data) -> Path:
    return _ensure(naive_cfg())


# Session fixtures that need a tiny model other than the default, and its config.
EXTRA_MODELS = {"naive_model_path": naive_cfg, "byline_tiny_path": byline_cfg}


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected: see only the tests that will run
def pytest_collection_modifyitems(session, config, items):
    """Get every tiny model the selected tests need, and only those, in a background thread from the start
    of the session: the default one first (the first tests wait for it on its cache lock), then the
    others side by side. With shipped weights (assets/tiny) each is a verified copy, seconds; a changed
    recipe pretrains, one thread each, while the tests run. Tests that need the others run last."""
    if config.option.collectonly or not items:
        return
    uses = lambda item, name: name in getattr(item, "fixturenames", ())
    needed = [name for name in EXTRA_MODELS if any(uses(item, name) for item in items)]
    items.sort(key=lambda item: [uses(item, name) for name in EXTRA_MODELS][::-1])  # stable: byline users last
    default = any(uses(item, "tiny_path") for item in items)
    cfgs = ([compose_cfg()] if default else []) + [EXTRA_MODELS[name]() for name in needed]  # compose(): not thread-safe
    if cfgs:
        threading.Thread(target=_pretrain_all, args=(cfgs, default), name="pretrain-tiny", daemon=True).start()


def _pretrain_all(cfgs, default_first: bool) -> None:
    if default_first:
        _quietly(cfgs[0])
    for cfg in cfgs[1:] if default_first else cfgs:  # side by side: one after the other they outlast the suite
        try:
            threading.Thread(target=_quietly, args=(cfg, 1), name="pretrain-tiny-extra", daemon=True).start()
        except RuntimeError:  # the session is already shutting down: no test needs it any more
            return


def _quietly(cfg, threads: int | None = None) -> None:
    """Build ahead of the tests; a failure (or the pretraining killed at exit when no test waited for it)
    is not reported here: the fixture that needs the model builds it again and fails in its test."""
    try:
        _ensure(cfg, threads)
    except BaseException:  # noqa: BLE001 - see the docstring
        pass


@pytest.fixture(scope="session")
def byline_world() -> synthetic.WorldConfig:
    """The synthetic world with expert / novice bylines (data.world.bylines=true)."""
    return synthetic.WorldConfig(**byline_cfg().data.world)


@pytest.fixture(scope="session")
def byline_data(base_cfg, byline_world):
    return synthetic_data(byline_world, CACHE_DIR, base_cfg.data.max_length)


@pytest.fixture(scope="session")
def byline_tiny_path(byline_data) -> Path:
    """The tiny model of the world with bylines (pretrained once per cache, like `tiny_path`)."""
    return _ensure(byline_cfg())
