"""The tiny pretrained Llama of the embedded default: built offline, trained once, cached as safetensors.

The weights must not depend on the machine. MKL and ATen pick different kernels on AVX2 and AVX-512
CPUs, and 2,000 steps of training turn that rounding into a different model (0.90 vs 0.99 hazard
accuracy with the first recipe). So pretraining runs in a subprocess whose numerics are pinned before
torch loads (harness/numerics.py, named by `TinySpec.numerics`): `scalar` (MKL's COMPATIBLE branch,
ATen's unvectorised kernels; what the default model and every committed result were built with, ~2x
native per step), `avx2` (MKL's and ATen's AVX2 kernels, about native speed, the same bits on AVX2 and
AVX-512 CPUs), `machine` (avx2 where the CPU has it, else scalar) or `native`. Where a pin cannot hold
(no MKL, not x86-64, no AVX2) the model is trained natively and the cache key says so.

The cache folder is keyed by everything that determines the weights (world, tokenizer, architecture,
training recipe and its source code, the pin actually used, torch and transformers versions), written
to a temporary folder and renamed into place, and carries a manifest of sha256 checksums so that a
corrupted cache is detected and rebuilt rather than used (harness/manifest.py). A model whose key has
a folder under `assets/tiny/` (the default model and the tests' two others, shipped with the repository
and rebuilt by `python -m experiments.ship_tiny`) is copied from there after its checksums are verified,
instead of pretrained; a shipped file that fails them is refused, with one warning line, and the model
is pretrained.
"""
from __future__ import annotations

import argparse
import atexit
import dataclasses
import hashlib
import inspect
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from filelock import FileLock
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from harness import numerics, synthetic
from harness.batches import batch_iterator
from harness.errors import ConfigError
from harness.manifest import verify_manifest, write_manifest
from harness.train import lm_loss, lr_lambda, train_loop

log = logging.getLogger(__name__)
TINY_VERSION = 2
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
NUMERICS = (*numerics.PINS, numerics.MACHINE)
# Threads of the pretraining process. Under a pin the bits do not depend on it (1 and 2 threads give the
# same weights under both pins), so the cache key leaves it out and a test session may pretrain with
# 1 thread on each core (SPECDEF_PRETRAIN_THREADS=1, tests/conftest.py). The MKL and OpenMP thread
# counts are fixed in the child because MKL's reproducibility is conditional on them.
PRETRAIN_THREADS = int(os.environ.get("SPECDEF_PRETRAIN_THREADS", "2"))
REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "assets" / "tiny"   # shipped weights, one folder per cache key (experiments/ship_tiny.py)


@dataclasses.dataclass(frozen=True)
class TinySpec:
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    max_position_embeddings: int = 32
    steps: int = 2000
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    beta2: float = 0.95            # AdamW's second-moment decay; 0.999 let a loss spike at the end of warm-up
    max_grad_norm: float | None = 1.0
    seed: int = 0
    exclude_splits: tuple[int, ...] = ()   # hazard splits left out of pretraining (for relearning tests)
    numerics: str = "scalar"       # a pin of harness/numerics.py (scalar, avx2, native) or machine


def build_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(SPECIALS + [w for w in words if w not in SPECIALS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins word tokens with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>", model_max_length=512)


def pin_of(spec: TinySpec) -> str:
    """The pin `spec` pretrains under on this machine (`native` where the one it names cannot hold)."""
    return numerics.resolve(spec.numerics, "model.spec.numerics")


def numerics_id(spec: TinySpec) -> str:
    """What, besides the spec, decides the bits: the numerics actually used and the library versions."""
    return numerics.numerics_id(pin_of(spec), PRETRAIN_THREADS)


def recipe_digest() -> str:
    """sha256 of the source of the code that turns a spec into weights: an edit to it is a new model,
    an edit elsewhere (the cache plumbing, the other users of the training loop's module) is not."""
    from harness import batches, train
    recipe = (SPECIALS, TinySpec, build_tokenizer, pretrain, pretraining_texts, _read_rows, _read_texts,
              train.train_loop, train._forward_only, train._accumulate_gradients, train._closure_step,
              train._zero, train.lr_lambda, train.lm_loss, batches.encode,
              batches._with_specials, batches.batch_iterator, synthetic)
    h = hashlib.sha256()
    for part in recipe:
        h.update((repr(part) if isinstance(part, list) else inspect.getsource(part)).encode())
    return h.hexdigest()[:12]


def cache_key(world: synthetic.WorldConfig, spec: TinySpec) -> str:
    # the pin resolved: `machine` and the pin it picks here are the same model; two pins never share a key
    pin = pin_of(spec)
    blob = json.dumps({"tiny_version": TINY_VERSION, "world": world.key(), **dataclasses.asdict(spec),
                       "numerics": pin, "numerics_id": numerics.numerics_id(pin, PRETRAIN_THREADS),
                       "recipe": recipe_digest()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def weights_digest(folder: Path, name: str = "model.safetensors") -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes (not the file, whose header may vary)."""
    from safetensors.torch import load_file
    state = load_file(Path(folder) / name)
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def pretrain(world: synthetic.WorldConfig, spec: TinySpec, data_dir: Path, progress: bool = True,
             stop_after: int | None = None):
    """Train the tiny Llama on `pretraining_texts`; `stop_after`: only the recipe's first steps (the same
    schedule, cut short: the reproducible prefix that tests/test_backbone.py checks)."""
    torch.manual_seed(spec.seed)
    tokenizer = build_tokenizer(synthetic.vocabulary(world))
    model = LlamaForCausalLM(model_config(spec, tokenizer))
    texts = pretraining_texts(world, spec, data_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay, betas=(0.9, spec.beta2))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("cosine", spec.warmup_steps, spec.steps))
    batches = batch_iterator(tokenizer, texts, spec.batch_size, spec.max_position_embeddings, spec.seed)
    result = train_loop(model, batches, lm_loss, [opt], schedulers=[sched], steps=stop_after or spec.steps,
                        max_grad_norm=spec.max_grad_norm, desc="pretrain tiny", progress=progress)
    log.info("pretrained tiny model: %d steps, final loss %.3f, %.0f s", result.steps, result.losses[-1],
             result.train_seconds)
    return model, tokenizer, result


def model_config(spec: TinySpec, tokenizer) -> LlamaConfig:
    """The tiny Llama's architecture (the memory plan reads it without building the model)."""
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=spec.hidden_size,
                       intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_hidden_layers,
                       num_attention_heads=spec.num_attention_heads, num_key_value_heads=spec.num_attention_heads,
                       max_position_embeddings=spec.max_position_embeddings, tie_word_embeddings=False,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)


def pretraining_texts(world: synthetic.WorldConfig, spec: TinySpec, data_dir: Path) -> list[str]:
    """Benign and unrelated text, the hazard text of every split not excluded, and in a world with
    bylines the attributed text (an excluded split's facts left out of it too, so nothing leaks in)."""
    texts = _read_texts(data_dir, "retain.jsonl") + _read_texts(data_dir, "unrelated.jsonl")
    for s in range(world.n_splits):
        if s not in spec.exclude_splits:
            texts += _read_texts(data_dir, f"forget_split{s}.jsonl")
    if world.bylines:
        texts += [r["text"] for r in _read_rows(data_dir, "attributed.jsonl") if r["split"] not in spec.exclude_splits]
    return texts


def _read_rows(data_dir: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (data_dir / name).read_text().splitlines()]


def _read_texts(data_dir: Path, name: str) -> list[str]:
    return [r["text"] for r in _read_rows(data_dir, name)]


def ensure_tiny(world: synthetic.WorldConfig, spec: TinySpec, data_dir: Path, cache_dir: Path,
                progress: bool = True, threads: int | None = None) -> Path:
    """Path of the cached pretrained model: the cache if valid, else the shipped copy of this key if it
    passes its checksums, else pretrained (with `threads`, default PRETRAIN_THREADS). Processes that
    need the same model at once (the jobs of a parallel sweep) build it once: the others wait on a file lock."""
    if spec.numerics not in NUMERICS:
        raise ConfigError(f"model.spec.numerics={spec.numerics!r}: allowed {', '.join(NUMERICS)}")
    folder = Path(cache_dir) / "tiny" / cache_key(world, spec)
    return cached_model(folder, lambda: _build(world, spec, Path(data_dir), folder, progress,
                                               threads or PRETRAIN_THREADS))


def cached_model(folder: Path, build, shipped: Path | None = None, weights: str = "model.safetensors",
                 what: str = "tiny model") -> Path:
    """The cache folder of a pretrained model (its name is the cache key): kept if its checksums hold, else
    the shipped copy of its key (`shipped`/<key>, default assets/tiny) if that passes its own, else `build()`
    into it. Processes that need it at once (the jobs of a parallel sweep) build it once: the others wait on
    a file lock."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if folder.is_dir():
            problem = verify_manifest(folder)
            if problem is None:
                return folder
            log.warning("cached %s at %s is corrupt (%s); rebuilding", what, folder, problem)
            shutil.rmtree(folder)
        if not install_shipped(folder.name, folder, shipped, weights):
            build()
    return folder


def shipped_problem(src: Path, weights: str = "model.safetensors") -> str | None:
    """None if a shipped folder's files match its manifest and its weights their recorded digest."""
    problem = verify_manifest(src)
    if problem is None:
        recorded = json.loads((src / "manifest.json").read_text()).get("weights_sha256")
        if weights_digest(src, weights) != recorded:
            problem = "weights digest differs from the manifest's weights_sha256"
    return problem


def install_shipped(key: str, folder: Path, shipped: Path | None = None,
                    weights: str = "model.safetensors") -> bool:
    """Copy the shipped model of `key` (`shipped`/<key>, default assets/tiny/<key>) into the cache folder
    `folder` after verifying it; False if none is shipped for this key or it fails its checksums (said in
    one warning line)."""
    src = Path(shipped or SHIPPED) / key
    if not src.is_dir():
        return False
    problem = shipped_problem(src, weights)
    if problem is not None:
        log.warning("shipped model %s refused (%s); pretraining it instead", src, problem)
        return False
    tmp = folder.with_name(folder.name + f".tmp{time.time_ns()}")
    shutil.copytree(src, tmp)
    manifest = json.loads((tmp / "manifest.json").read_text())
    manifest["installed_from"] = f"assets/{src.parent.name}/{key}"  # not a file: the checksums stay valid
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    tmp.rename(folder)
    log.info("%s model %s: shipped weights verified and copied into the cache", src.parent.name, key)
    return True


def _build(world: synthetic.WorldConfig, spec: TinySpec, data_dir: Path, folder: Path, progress: bool,
           threads: int) -> None:
    pin = pin_of(spec)
    if spec.numerics != "native" and pin == "native":
        log.warning("model.spec.numerics=%s cannot hold here (%s); pretraining with this machine's numerics, "
                    "so the weights are this machine's own", spec.numerics,
                    numerics.why_unavailable(numerics.machine_pin() if spec.numerics == numerics.MACHINE
                                             else spec.numerics) or "no pin available")
    log.info("pretraining the tiny model (one-off, %s numerics, cached at %s)", pin, folder)
    tmp = folder.with_name(folder.name + f".tmp{time.time_ns()}")
    t0 = time.perf_counter()
    report = _pretrain_in_subprocess(world, spec, data_dir, tmp, pin, progress, threads)
    write_manifest(tmp, {"world": dataclasses.asdict(world), "spec": dataclasses.asdict(spec), "numerics": pin,
                         "numerics_id": numerics_id(spec), "recipe": recipe_digest(),
                         "weights_sha256": weights_digest(tmp),
                         "pretrain_seconds": round(time.perf_counter() - t0, 1), **report})
    tmp.rename(folder)


def _pretrain_in_subprocess(world: synthetic.WorldConfig, spec: TinySpec, data_dir: Path, out: Path,
                            pin: str, progress: bool, threads: int = PRETRAIN_THREADS,
                            extra_env: dict | None = None, stop_after: int | None = None) -> dict:
    """Pretrain in a fresh interpreter whose numerics are set (`pin`, harness/numerics.py) before torch
    loads; returns its report. `stop_after`: only the recipe's first steps. `threads` and `extra_env`
    (e.g. an emulated CPU capability, under pin `native`) are for experiments/tiny_robustness.py."""
    env = numerics.child_env(pin, {**os.environ, **(extra_env or {})})
    # MKL's reproducibility is conditional on a fixed thread count: fix it before MKL loads
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    args = [sys.executable, "-m", "harness.tiny", "--world", json.dumps(dataclasses.asdict(world)),
            "--spec", json.dumps(dataclasses.asdict(spec)), "--data-dir", str(data_dir), "--out", str(out),
            "--threads", str(threads), "--pin", pin]
    if stop_after:
        args += ["--stop-after", str(stop_after)]
    if progress:
        args.append("--progress")
    with subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.PIPE,
                          stderr=None if progress else subprocess.PIPE, text=True) as proc:
        _running.add(proc)
        try:
            stdout, stderr = proc.communicate()
        finally:
            _running.discard(proc)
    if proc.returncode != 0:
        shutil.rmtree(out, ignore_errors=True)
        raise RuntimeError(f"pretraining the tiny model failed (exit {proc.returncode}):\n{(stderr or '')[-3000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


_running: set[subprocess.Popen] = set()


@atexit.register
def _stop_running_pretraining() -> None:
    """A pretraining started from a background thread (tests/conftest.py) must not outlive its parent."""
    for proc in list(_running):
        proc.kill()


def _main(argv: list[str] | None = None) -> None:
    """The pretraining subprocess: train, save into --out, print a one-line JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag in ("--world", "--spec", "--data-dir", "--out"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--threads", type=int, default=PRETRAIN_THREADS)
    parser.add_argument("--pin", default="native", choices=list(numerics.PINS))
    parser.add_argument("--stop-after", type=int, default=None)
    parser.add_argument("--progress", action="store_true")
    a = parser.parse_args(argv)
    torch.set_num_threads(a.threads)
    capability = torch.backends.cpu.get_cpu_capability()
    problem = numerics.in_effect(a.pin)
    if problem:
        raise SystemExit(problem)
    spec = json.loads(a.spec)
    world = synthetic.WorldConfig(**json.loads(a.world))
    spec = TinySpec(**{**spec, "exclude_splits": tuple(spec["exclude_splits"])})
    model, tokenizer, result = pretrain(world, spec, Path(a.data_dir), progress=a.progress, stop_after=a.stop_after)
    model.save_pretrained(a.out, safe_serialization=True)
    tokenizer.save_pretrained(a.out)
    print(json.dumps({"final_loss": result.losses[-1], "train_seconds": round(result.train_seconds, 1),
                      "cpu_capability": capability, "threads": torch.get_num_threads()}), flush=True)


if __name__ == "__main__":
    _main()
