"""The tiny pretrained Llama of the embedded default: built offline, trained once, cached as safetensors.

The weights must not depend on the machine. MKL and ATen pick different kernels on AVX2 and AVX-512
CPUs, and 2,000 steps of training turn that rounding into a different model (0.90 vs 0.99 hazard
accuracy with the first recipe). So pretraining runs in a subprocess whose numerics are pinned before
torch loads (`PINNED_ENV`): MKL's SSE2 code path without approximate reciprocals, ATen's unvectorised
kernels, a fixed thread count. Every x86-64 machine then computes the same bits (tests pin the
checksum), at about 2x the time per step. Where that cannot hold (no MKL, not x86-64) the model is
trained natively and the cache key says so; the recipe is chosen to land at >= 0.97 under any of
these numerics (results/tiny_robustness.md).

The cache folder is keyed by everything that determines the weights (world, tokenizer, architecture,
training recipe and its source code, numerics, torch and transformers versions), written to a
temporary folder and renamed into place, and carries a manifest of sha256 checksums so that a
corrupted cache is detected and rebuilt rather than used (harness/manifest.py).
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
import platform
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import torch
from filelock import FileLock
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from harness import synthetic
from harness.batches import batch_iterator
from harness.errors import ConfigError
from harness.manifest import verify_manifest, write_manifest
from harness.train import lm_loss, lr_lambda, train_loop

log = logging.getLogger(__name__)
TINY_VERSION = 2
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
NUMERICS = ("pinned", "native")
# Threads of the pretraining process. Under pinned numerics the bits do not depend on it (1 and 2 threads
# give the same weights: results/tiny_robustness), so the cache key leaves it out and a test session
# may pretrain with 1 thread on each core (SPECDEF_PRETRAIN_THREADS=1, tests/conftest.py).
PRETRAIN_THREADS = int(os.environ.get("SPECDEF_PRETRAIN_THREADS", "2"))
# Read by MKL and ATen when they initialise, hence set in a fresh process. MKL_CBWR=COMPATIBLE is the
# one MKL branch documented to give the same results on Intel and non-Intel x86-64 CPUs; the MKL and
# OpenMP thread counts are fixed because MKL's reproducibility is conditional on them.
PINNED_ENV = {"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "default", "MKL_DYNAMIC": "FALSE"}
# Variables that would override or fight the pinned ones in the child.
UNPINNED_VARS = ("MKL_ENABLE_INSTRUCTIONS", "MKL_DEBUG_CPU_TYPE", "MKL_CBWR", "ATEN_CPU_CAPABILITY")
REPO = Path(__file__).resolve().parents[1]


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
    numerics: str = "pinned"       # pinned: bit-identical on every x86-64 machine | native: this CPU's kernels


def build_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(SPECIALS + [w for w in words if w not in SPECIALS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins word tokens with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>", model_max_length=512)


def numerics_id(numerics: str) -> str:
    """What, besides the spec, decides the bits: the numerics actually used and the library versions."""
    versions = f"torch={torch.__version__} transformers={metadata.version('transformers')}"
    if numerics == "pinned" and pinned_numerics_available():
        return f"pinned {json.dumps(PINNED_ENV, sort_keys=True)} {versions}"  # thread count: see PRETRAIN_THREADS
    mkl = {k: os.environ[k] for k in UNPINNED_VARS if k in os.environ}
    return (f"native {platform.machine()} {torch.backends.cpu.get_cpu_capability()} {json.dumps(mkl, sort_keys=True)} "
            f"threads={PRETRAIN_THREADS} {versions}")


def pinned_numerics_available() -> bool:
    """MKL's COMPATIBLE branch exists only where torch uses MKL, on x86-64."""
    return platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkl.is_available()


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
    blob = json.dumps({"tiny_version": TINY_VERSION, "world": world.key(), **dataclasses.asdict(spec),
                       "numerics_id": numerics_id(spec.numerics), "recipe": recipe_digest()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def weights_digest(folder: Path) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes (not the file, whose header may vary)."""
    from safetensors.torch import load_file
    state = load_file(Path(folder) / "model.safetensors")
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def pretrain(world: synthetic.WorldConfig, spec: TinySpec, data_dir: Path, progress: bool = True):
    """Train the tiny Llama on `pretraining_texts`."""
    torch.manual_seed(spec.seed)
    tokenizer = build_tokenizer(synthetic.vocabulary(world))
    model = LlamaForCausalLM(model_config(spec, tokenizer))
    texts = pretraining_texts(world, spec, data_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay, betas=(0.9, spec.beta2))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("cosine", spec.warmup_steps, spec.steps))
    batches = batch_iterator(tokenizer, texts, spec.batch_size, spec.max_position_embeddings, spec.seed)
    result = train_loop(model, batches, lm_loss, [opt], schedulers=[sched], steps=spec.steps,
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
    """Path of the cached pretrained model, training it first (with `threads`, default
    PRETRAIN_THREADS) if the cache is missing or corrupt. Processes that need the same model at once
    (the jobs of a parallel sweep) train it once: the others wait on a file lock."""
    if spec.numerics not in NUMERICS:
        raise ConfigError(f"model.spec.numerics={spec.numerics!r}: allowed {', '.join(NUMERICS)}")
    folder = Path(cache_dir) / "tiny" / cache_key(world, spec)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if folder.is_dir():
            problem = verify_manifest(folder)
            if problem is None:
                return folder
            log.warning("cached tiny model at %s is corrupt (%s); rebuilding", folder, problem)
            shutil.rmtree(folder)
        _build(world, spec, Path(data_dir), folder, progress, threads or PRETRAIN_THREADS)
    return folder


def _build(world: synthetic.WorldConfig, spec: TinySpec, data_dir: Path, folder: Path, progress: bool,
           threads: int) -> None:
    pinned = spec.numerics == "pinned" and pinned_numerics_available()
    if spec.numerics == "pinned" and not pinned:
        log.warning("model.spec.numerics=pinned needs an x86-64 CPU and torch with MKL (here: %s); pretraining "
                    "with this machine's numerics, so the weights differ from the reference checksum",
                    platform.machine())
    log.info("pretraining the tiny model (one-off, %s numerics, cached at %s)", "pinned" if pinned else "native",
             folder)
    tmp = folder.with_name(folder.name + f".tmp{time.time_ns()}")
    t0 = time.perf_counter()
    report = _pretrain_in_subprocess(world, spec, data_dir, tmp, pinned, progress, threads)
    write_manifest(tmp, {"world": dataclasses.asdict(world), "spec": dataclasses.asdict(spec),
                         "numerics_id": numerics_id(spec.numerics), "weights_sha256": weights_digest(tmp),
                         "pretrain_seconds": round(time.perf_counter() - t0, 1), **report})
    tmp.rename(folder)


def _pretrain_in_subprocess(world: synthetic.WorldConfig, spec: TinySpec, data_dir: Path, out: Path,
                            pinned: bool, progress: bool, threads: int = PRETRAIN_THREADS,
                            extra_env: dict | None = None) -> dict:
    """Pretrain in a fresh interpreter whose numerics are set before torch loads; returns its report.
    `threads` and `extra_env` (e.g. an emulated CPU capability) are for experiments/tiny_robustness.py."""
    env = {k: v for k, v in os.environ.items() if not (pinned and k in UNPINNED_VARS)}
    env.update(extra_env or {})
    env.update(PINNED_ENV if pinned else {})
    # MKL's reproducibility is conditional on a fixed thread count: fix it before MKL loads
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    args = [sys.executable, "-m", "harness.tiny", "--world", json.dumps(dataclasses.asdict(world)),
            "--spec", json.dumps(dataclasses.asdict(spec)), "--data-dir", str(data_dir), "--out", str(out),
            "--threads", str(threads)]
    if pinned:
        args.append("--expect-pinned")
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
    parser.add_argument("--expect-pinned", action="store_true")
    parser.add_argument("--progress", action="store_true")
    a = parser.parse_args(argv)
    torch.set_num_threads(a.threads)
    capability = torch.backends.cpu.get_cpu_capability()
    if a.expect_pinned and capability != "DEFAULT":
        raise SystemExit(f"pinned numerics did not take effect: ATen runs {capability} kernels")
    spec = json.loads(a.spec)
    world = synthetic.WorldConfig(**json.loads(a.world))
    spec = TinySpec(**{**spec, "exclude_splits": tuple(spec["exclude_splits"])})
    model, tokenizer, result = pretrain(world, spec, Path(a.data_dir), progress=a.progress)
    model.save_pretrained(a.out, safe_serialization=True)
    tokenizer.save_pretrained(a.out)
    print(json.dumps({"final_loss": result.losses[-1], "train_seconds": round(result.train_seconds, 1),
                      "cpu_capability": capability, "threads": torch.get_num_threads()}), flush=True)


if __name__ == "__main__":
    _main()
