"""Shared fixtures: the cached pretrained tiny model (trained once per cache, reused by every test),
the synthetic data, and Hydra `compose()` of the real configs.

`SPECDEF_TEST_OVERRIDES` (Hydra overrides separated by spaces, e.g. "model.spec.seed=1
model.spec.numerics=native") is appended to every composed config, so the suite can be run against
another tiny model to check that no test is fitted to one model (see results/tiny_robustness.md)."""
from __future__ import annotations

import os
import threading
from pathlib import Path

# One pretraining thread per core: the session scores on one core while the other pretrains the next
# tiny model (below). Pinned pretraining gives the same bits with any thread count (harness/tiny.py).
os.environ.setdefault("SPECDEF_PRETRAIN_THREADS", "1")

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


def compose_cfg(*overrides: str):
    """The config `python run.py <overrides>` would run with (no local overrides), plus the
    variation under test (SPECDEF_TEST_OVERRIDES)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=[*TEST_OVERRIDES, *overrides], return_hydra_config=False)


@pytest.fixture(scope="session")
def base_cfg():
    return compose_cfg()


@pytest.fixture(scope="session")
def data(base_cfg):
    return synthetic_data(synthetic.WorldConfig(**base_cfg.data.world), CACHE_DIR, base_cfg.data.max_length)


@pytest.fixture(scope="session")
def tiny_path(base_cfg, data) -> Path:
    return tiny.ensure_tiny(synthetic.WorldConfig(**base_cfg.data.world), tiny_spec(base_cfg.model),
                            data.root, CACHE_DIR, progress=False)


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
    """The tiny model pretrained without hazard split 1 (relearning a never-seen split)."""
    return compose_cfg("model.spec.exclude_splits=[1]")


@pytest.fixture(scope="session")
def naive_model_path(data) -> Path:
    cfg = naive_cfg()
    return tiny.ensure_tiny(synthetic.WorldConfig(**cfg.data.world), tiny_spec(cfg.model), data.root,
                            CACHE_DIR, progress=False)


# Session fixtures that pretrain a tiny model other than the default, and what each needs.
EXTRA_MODELS = ("naive_model_path", "byline_tiny_path")


def pytest_collection_modifyitems(session, config, items):
    """Start pretraining the other tiny models the selected tests need, one after the other, on the
    core the tests leave free; a fixture that needs one before it is ready waits on its cache lock."""
    needed = [name for name in EXTRA_MODELS if any(name in getattr(item, "fixturenames", ()) for item in items)]
    if needed and not config.option.collectonly:
        threading.Thread(target=_pretrain_models, args=(needed,), name="pretrain-tiny", daemon=True).start()


def _pretrain_models(names) -> None:
    base = compose_cfg()
    for name in names:
        cfg = naive_cfg() if name == "naive_model_path" else compose_cfg("data.world.bylines=true")
        world = synthetic.WorldConfig(**cfg.data.world)
        data = synthetic_data(world, CACHE_DIR, base.data.max_length)
        tiny.ensure_tiny(world, tiny_spec(cfg.model), data.root, CACHE_DIR, progress=False)


@pytest.fixture(scope="session")
def byline_world(base_cfg) -> synthetic.WorldConfig:
    """The synthetic world with expert / novice bylines (data.world.bylines=true)."""
    return synthetic.WorldConfig(**{**base_cfg.data.world, "bylines": True})


@pytest.fixture(scope="session")
def byline_data(base_cfg, byline_world):
    return synthetic_data(byline_world, CACHE_DIR, base_cfg.data.max_length)


@pytest.fixture(scope="session")
def byline_tiny_path(base_cfg, byline_world, byline_data) -> Path:
    """The tiny model of the world with bylines (pretrained once per cache, like `tiny_path`)."""
    return tiny.ensure_tiny(byline_world, tiny_spec(base_cfg.model), byline_data.root, CACHE_DIR, progress=False)
