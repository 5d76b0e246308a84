"""The tiny pretrained Llama of the embedded default: built offline, trained once, cached as safetensors.

The cache folder is keyed by everything that determines the weights (world, tokenizer, architecture,
training recipe, held-out splits), written to a temporary folder and renamed into place, and carries
a manifest of sha256 checksums so that a corrupted cache is detected and rebuilt rather than used.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from harness import synthetic
from harness.batches import batch_iterator
from harness.train import lm_loss, lr_lambda, train_loop

log = logging.getLogger(__name__)
TINY_VERSION = 1
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


@dataclasses.dataclass(frozen=True)
class TinySpec:
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    max_position_embeddings: int = 32
    steps: int = 1500
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    seed: int = 0
    exclude_splits: tuple[int, ...] = ()   # hazard splits left out of pretraining (for relearning tests)


def build_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(SPECIALS + [w for w in words if w not in SPECIALS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins word tokens with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>", model_max_length=512)


def cache_key(world: synthetic.WorldConfig, spec: TinySpec) -> str:
    blob = json.dumps({"tiny_version": TINY_VERSION, "world": world.key(), **dataclasses.asdict(spec)},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path, extra: dict) -> None:
    files = {p.name: _sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != "manifest.json"}
    (folder / "manifest.json").write_text(json.dumps({"files": files, **extra}, indent=2, sort_keys=True))


def verify_manifest(folder: Path) -> str | None:
    """None if every file listed in the manifest is present with its checksum, else what is wrong."""
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return "no manifest.json"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"unreadable manifest.json ({e})"
    for name, digest in files.items():
        path = folder / name
        if not path.is_file():
            return f"missing {name}"
        if _sha256(path) != digest:
            return f"checksum mismatch in {name}"
    return None


def pretrain(world: synthetic.WorldConfig, spec: TinySpec, data_dir: Path, progress: bool = True):
    """Train the tiny Llama on `pretraining_texts`."""
    torch.manual_seed(spec.seed)
    tokenizer = build_tokenizer(synthetic.vocabulary(world))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=spec.hidden_size,
                         intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_hidden_layers,
                         num_attention_heads=spec.num_attention_heads, num_key_value_heads=spec.num_attention_heads,
                         max_position_embeddings=spec.max_position_embeddings, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    texts = pretraining_texts(world, spec, data_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("cosine", spec.warmup_steps, spec.steps))
    batches = batch_iterator(tokenizer, texts, spec.batch_size, spec.max_position_embeddings, spec.seed)
    result = train_loop(model, batches, lm_loss, [opt], schedulers=[sched], steps=spec.steps,
                        desc="pretrain tiny", progress=progress)
    log.info("pretrained tiny model: %d steps, final loss %.3f, %.0f s", result.steps, result.losses[-1],
             result.train_seconds)
    return model, tokenizer, result


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
                progress: bool = True) -> Path:
    """Path of the cached pretrained model, training it first if the cache is missing or corrupt."""
    folder = Path(cache_dir) / "tiny" / cache_key(world, spec)
    if folder.is_dir():
        problem = verify_manifest(folder)
        if problem is None:
            return folder
        log.warning("cached tiny model at %s is corrupt (%s); rebuilding", folder, problem)
        shutil.rmtree(folder)
    log.info("pretraining the tiny model (one-off, cached at %s)", folder)
    t0 = time.perf_counter()
    model, tokenizer, result = pretrain(world, spec, data_dir, progress)
    tmp = folder.with_name(folder.name + f".tmp{time.time_ns()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    write_manifest(tmp, {"world": dataclasses.asdict(world), "spec": dataclasses.asdict(spec),
                         "final_loss": result.losses[-1], "pretrain_seconds": time.perf_counter() - t0})
    try:
        tmp.rename(folder)
    except OSError:  # another process finished first; theirs is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
