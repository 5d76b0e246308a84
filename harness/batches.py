"""Text -> token batches for the training loop and perplexity."""
from __future__ import annotations

import math
import random
from typing import Iterator, Sequence

import torch


def encode(tokenizer, texts: Sequence[str], max_length: int) -> dict:
    """Right-padded batch with causal-LM labels (-100 on padding). Adds BOS/EOS as the model was trained."""
    ids = [_with_specials(tokenizer, tokenizer(t, add_special_tokens=False)["input_ids"])[:max_length]
           for t in texts]
    width = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, :len(x)] = torch.tensor(x)
        mask[i, :len(x)] = 1
    labels = input_ids.masked_fill(mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def _with_specials(tokenizer, ids: list[int]) -> list[int]:
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return bos + ids + eos


def batch_iterator(tokenizer, texts: Sequence[str], batch_size: int, max_length: int,
                   seed: int) -> Iterator[dict]:
    """Endless shuffled batches: each epoch is a fresh seeded permutation, so runs are reproducible."""
    if not texts:
        raise ValueError("batch_iterator: no texts to train on")
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            perm = list(range(len(texts)))
            rng.shuffle(perm)
            order += perm
        chunk, order = order[:batch_size], order[batch_size:]
        yield encode(tokenizer, [texts[i] for i in chunk], max_length)


def encode_batches(tokenizer, texts: Sequence[str], max_length: int, batch_size: int = 64) -> list[dict]:
    """`texts` as consecutive encoded batches (for perplexity: tokenize once, score many models)."""
    return [encode(tokenizer, texts[i:i + batch_size], max_length) for i in range(0, len(texts), batch_size)]


@torch.no_grad()
def perplexity(model, batches: Sequence[dict]) -> float:
    """Token-level perplexity exp(mean NLL) over encoded batches (`encode_batches`); inf if the model
    produces non-finite logits."""
    model.eval()
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
        shift_labels = b["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), shift_labels.flatten(),
                                                 ignore_index=-100, reduction="sum")
        nll += loss.item()
        count += int((shift_labels != -100).sum())
    mean = nll / max(count, 1)
    return math.exp(mean) if math.isfinite(mean) and mean < 700 else float("inf")
