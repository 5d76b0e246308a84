"""ELM, Erasure of Language Memory (Gandikota et al. 2024, rohitgandikota/erasing-llm).

A LoRA adapter on the attention and MLP projections of `lora_layers` is trained with three terms
(all weights 1 in the paper), then merged into the weights so later stages see a plain model:

- erase: on forget text, cross-entropy to the soft target
      P'(x_t | x_<t) ∝ exp( log P(x_t|x_<t) − η_t · [log P(x_t | expert, x_<t) − log P(x_t | novice, x_<t)] )
  computed by the adapter-disabled (original) model at temperature `temperature`, restricted to its
  `top_k` largest entries; η_t ramps linearly from 1 to `eta` along each sequence's tokens (as in
  the original's `get_edit_vector`). Tokens an "expert" context makes likelier are pushed down.
- retain: cross-entropy on retain text to the adapter-disabled model's predictions: its top-1
  tokens (`retain_soft: false`, the original's default) or its full distribution (`true`, the
  original's `use_retain_soft_loss`).
- consistency: NLL of the continuation that the original model writes after forget text followed
  by a "confused" prompt, sampled with the same expert/novice guidance (γ = `gamma`, erase
  direction), so the erased model keeps writing fluent text instead of gibberish.

ELM needs a model whose predictions depend on who it believes is writing: the guidance is what an
"expert" context makes likelier than a "novice" one. Real LMs learn that from web text. The
synthetic world gives its tiny model that property with `data.world.bylines=true` (each hazard fact
once more behind an expert's byline with the true value and behind a novice's with a random one;
harness/synthetic.py), and its data hands those bylines to ELM as the expert and novice prompts
(`Data.concept_prompts`): hazard 0.99 -> 0.25, utility 1.00 -> 0.98. The default world has no
bylines; its prompts are words of its own vocabulary never seen as a prefix, so the guidance is
noise: the target still moves mass off the true value, but onto one arbitrary token, and the
ranking of the four answer choices, which the multiple-choice evaluation reads, survives (hazard
0.98 -> 0.59). The world's tokenizer is word-level and maps unknown words to <unk>, so prompts are
checked against its vocabulary at start.

Each prompt may be a list, as the original samples one of its 10 expert, 10 novice and 20
confused templates per prompt: here one expert/novice pair per erase batch and per group of
consistency texts, one confused prompt per consistency text (seeded).

The guidance model sees prefix + whole context (the original's sampling guidance conditions the
prefix on the generated tokens only); consistency texts are generated once before training, as
the original's default (`use_existing_data`) does.
"""
from __future__ import annotations

import logging
import random
import time
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from transformers import LogitsProcessor, LogitsProcessorList

from baselines.common import (BATCH_SIZE, LR, STEPS, TermLog, adamw, check_layer_ids, forget_texts, mean_nll,
                              rules_hook, run_info, zip_batches)
from harness import distributed
from harness.batches import batch_iterator
from harness.errors import ConfigError
from harness.memory import Costs, Shape, Stage, lora_params, training_stage
from harness.train import train_loop

log = logging.getLogger(__name__)

ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------------------------------------
# Prompts and prefixes
# ---------------------------------------------------------------------------------------------

def prompt_ids(tokenizer, text: str, key: str) -> list[int]:
    """Token ids of a prompt, refusing words the tokenizer does not know (they would all be <unk>)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    unk = tokenizer.unk_token_id
    if not ids or (unk is not None and unk in ids):
        raise ConfigError(f"defense.{key}={text!r}: allowed a non-empty text the tokenizer knows "
                          "(the synthetic world's tokenizer maps unknown words to <unk>)")
    return ids


def with_prefix(batch: dict, prefix: list[int]) -> dict:
    """Insert `prefix` right after the BOS token of every (right-padded) sequence. All rows shift
    by the same amount, so position t of the original is position t + len(prefix) here."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    p = torch.tensor(prefix, dtype=ids.dtype, device=ids.device).expand(ids.shape[0], -1)
    return {"input_ids": torch.cat([ids[:, :1], p, ids[:, 1:]], dim=1),
            "attention_mask": torch.cat([mask[:, :1], torch.ones_like(p), mask[:, 1:]], dim=1)}


def logprobs(model, batch: dict, skip: int = 0, temperature: float = 1.0) -> torch.Tensor:
    """Next-token log-probabilities (B, T, V) at the original positions of a batch prefixed with `skip`
    tokens after BOS (`with_prefix`). The prediction of the first text token is made from the last
    prefix token, so position t of the original reads position t + skip of the prefixed batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    return F.log_softmax(logits[:, skip:] / temperature, dim=-1)


# ---------------------------------------------------------------------------------------------
# Loss terms
# ---------------------------------------------------------------------------------------------

def eta_ramp(mask: torch.Tensor, eta: float) -> torch.Tensor:
    """η_t rising linearly from 1 at a sequence's first token to `eta` at its last real token (B, T)."""
    pos = (mask.cumsum(dim=1) - 1).clamp_min(0).to(torch.float32)
    length = mask.sum(dim=1, keepdim=True).to(torch.float32)
    return 1 + (eta - 1) * pos / (length - 1).clamp_min(1)


def erase_target(logp: torch.Tensor, logp_expert: torch.Tensor, logp_novice: torch.Tensor,
                 eta: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """softmax(log P − η (log P_expert − log P_novice)) over the top_k entries of that score (B, T, V)."""
    score = logp - eta.unsqueeze(-1) * (logp_expert - logp_novice)
    if top_k:
        kth = score.topk(min(top_k, score.shape[-1]), dim=-1).values[..., -1:]
        score = score.masked_fill(score < kth, float("-inf"))
    return score.softmax(dim=-1)


def soft_ce(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real positions of −Σ_v target_v log softmax(logits)_v."""
    ce = -(target * F.log_softmax(logits.float(), dim=-1)).sum(-1)
    return (ce * mask).sum() / distributed.global_sum(mask.sum()).clamp_min(1)


# ---------------------------------------------------------------------------------------------
# Consistency data: sampled once from the original model with erase guidance
# ---------------------------------------------------------------------------------------------

class EraseGuidance(LogitsProcessor):
    """log P(·|context) − γ [log P(·|expert, context) − log P(·|novice, context)] at each sampling step."""

    def __init__(self, model, expert: list[int], novice: list[int], gamma: float):
        self.model, self.expert, self.novice, self.gamma = model, expert, novice, gamma

    def _last_logprobs(self, input_ids: torch.Tensor, prefix: list[int]) -> torch.Tensor:
        b = with_prefix({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}, prefix)
        return F.log_softmax(self.model(**b).logits[:, -1].float(), dim=-1)

    def __call__(self, input_ids, scores):
        guidance = self._last_logprobs(input_ids, self.expert) - self._last_logprobs(input_ids, self.novice)
        return F.log_softmax(scores.float(), dim=-1) - self.gamma * guidance


@torch.no_grad()
def consistency_sequences(model, tokenizer, texts: Sequence[str], confused: Sequence[list[int]],
                          guidances: Sequence[EraseGuidance], max_length: int,
                          seed: int) -> list[tuple[list[int], int]]:
    """(token ids, number of prompt tokens) per text: BOS + text + a confused prompt + a continuation
    sampled under one of `guidances`. Texts of equal token length and confused prompt are sampled
    together, so no padding enters generation."""
    rng = random.Random(seed)
    groups: dict[tuple[int, int], list[list[int]]] = {}
    for t in texts:
        c = rng.randrange(len(confused))
        ids = [tokenizer.bos_token_id] + tokenizer(t, add_special_tokens=False)["input_ids"] + confused[c]
        groups.setdefault((len(ids), c), []).append(ids)
    torch.manual_seed(seed)
    out = []
    room = max_length - max(len(p) for g in guidances for p in (g.expert, g.novice))  # guidance adds its prefix
    for (n, c), group in sorted(groups.items()):
        if n >= room:
            continue
        prompt = torch.tensor(group, device=model.device)
        guidance = rng.choice(guidances)
        gen = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=0,
                             max_new_tokens=room - n, logits_processor=LogitsProcessorList([guidance]),
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        for row in gen.tolist():
            row = row[:row.index(tokenizer.eos_token_id, n) + 1] if tokenizer.eos_token_id in row[n:] else row
            out.append((row, n - len(confused[c])))
    return out


def consistency_batches(seqs: list[tuple[list[int], int]], batch_size: int, pad_id: int,
                        seed: int) -> Iterator[dict]:
    """Endless right-padded batches whose labels cover only the confused prompt and continuation."""
    rng = random.Random(seed)
    while True:
        chunk = rng.sample(seqs, min(batch_size, len(seqs)))
        width = max(len(s) for s, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for i, (s, n_prompt) in enumerate(chunk):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
            labels[i, n_prompt:len(s)] = ids[i, n_prompt:len(s)]
        yield {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ---------------------------------------------------------------------------------------------
# The defense
# ---------------------------------------------------------------------------------------------

def _texts(prompt: str | Sequence[str] | None) -> list[str] | None:
    return [prompt] if isinstance(prompt, str) else None if prompt is None else list(prompt)


class ELM:
    name = "elm"

    # Hooks (harness/hooks.py): what the runner asks of the defense before anything is built.
    check_config = rules_hook(STEPS, BATCH_SIZE, LR, text=True)

    @classmethod
    def memory_stages(cls, node, shape: Shape, c: Costs) -> list[Stage]:
        """LoRA adapters on `lora_layers` train on forget, retain and consistency text."""
        trained = lora_params(shape, ATTN_MLP, int(node.lora_r), list(node.lora_layers))
        batch = int(node.get("batch_size", 1))
        return [training_stage(cls.name, c, shape.params + trained, trained, {
            "activations": c.activations(batch, forwards=3),  # forget, retain and consistency text
            "erase target": c.per_token(batch, 4 * shape.vocab)})]  # three log-softmaxes and the target

    def __init__(self, lora_layers: Sequence[int], lora_r: int, lora_alpha: float, lora_dropout: float,
                 eta: float, top_k: int | None, temperature: float, gamma: float,
                 expert_prompt: str | Sequence[str] | None, novice_prompt: str | Sequence[str] | None,
                 confused_prompt: str | Sequence[str] | None, erase_coeff: float, retain_coeff: float,
                 consistency_coeff: float, n_consistency: int, lr: float, steps: int, batch_size: int,
                 retain_soft: bool = False, forget_splits: Sequence[int] = (0, 1), seed: int = 0):
        self.lora_layers = list(lora_layers)
        self.lora_r, self.lora_alpha, self.lora_dropout = lora_r, lora_alpha, lora_dropout
        self.eta, self.top_k, self.temperature, self.gamma = eta, top_k, temperature, gamma
        self.prompts = {"expert": _texts(expert_prompt), "novice": _texts(novice_prompt),
                        "confused": _texts(confused_prompt)}
        self.coeffs = {"erase": erase_coeff, "retain": retain_coeff, "consistency": consistency_coeff}
        self.n_consistency = n_consistency
        self.retain_soft = retain_soft
        self.lr, self.steps, self.batch_size = lr, steps, batch_size
        self.forget_splits = list(forget_splits)
        self.seed = seed
        self.info: dict = {}

    def prompts_for(self, kind: str, data) -> list[str]:
        """The configured prompts of one kind, else the data's (`Data.concept_prompts`)."""
        texts = self.prompts[kind] or data.concept_prompts.get(kind)
        if not texts:
            raise ConfigError(f"defense.{kind}_prompt={self.prompts[kind]!r}: allowed a text or a list of texts "
                              f"(this data gives no concept_prompts.{kind} to fall back on)")
        return texts

    def erase_loss(self, model, batch: dict) -> torch.Tensor:
        mask = batch["attention_mask"]
        expert, novice = self.rng.choice(self.ids["expert"]), self.rng.choice(self.ids["novice"])
        with torch.no_grad(), model.disable_adapter():
            t = self.temperature
            logp = logprobs(model, batch, temperature=t)
            logp_e = logprobs(model, with_prefix(batch, expert), len(expert), t)
            logp_n = logprobs(model, with_prefix(batch, novice), len(novice), t)
            target = erase_target(logp, logp_e, logp_n, eta_ramp(mask, self.eta), self.top_k)
        logits = model(input_ids=batch["input_ids"], attention_mask=mask).logits
        return soft_ce(logits, target, mask)

    def retain_loss(self, model, batch: dict) -> torch.Tensor:
        mask = batch["attention_mask"]
        with torch.no_grad(), model.disable_adapter():
            probs = model(input_ids=batch["input_ids"], attention_mask=mask).logits.float().softmax(-1)
        if not self.retain_soft:
            probs = F.one_hot(probs.argmax(-1), probs.shape[-1]).float()
        logits = model(input_ids=batch["input_ids"], attention_mask=mask).logits
        return soft_ce(logits, probs, mask)

    def loss(self, model, terms: TermLog, batch: dict) -> torch.Tensor:
        erase = self.erase_loss(model, batch["forget"])
        retain = self.retain_loss(model, batch["retain"])
        c = batch["consistency"]
        consistency = mean_nll(model(input_ids=c["input_ids"], attention_mask=c["attention_mask"]).logits,
                               c["labels"])
        terms(erase=erase, retain=retain, consistency=consistency)
        return (self.coeffs["erase"] * erase + self.coeffs["retain"] * retain
                + self.coeffs["consistency"] * consistency)

    def consistency_data(self, model, tokenizer, texts: list[str], max_length: int):
        sample = random.Random(self.seed).sample(texts, min(self.n_consistency, len(texts)))
        guidances = [EraseGuidance(model, e, n, self.gamma)
                     for e in self.ids["expert"] for n in self.ids["novice"]]
        seqs = consistency_sequences(model, tokenizer, sample, self.ids["confused"], guidances,
                                     max_length, self.seed)
        if not seqs:
            raise ConfigError("defense=elm: no forget text is short enough to append the confused prompt "
                              f"and a continuation within max_length={max_length}")
        return seqs

    def __call__(self, model, tokenizer, data):
        from peft import LoraConfig, get_peft_model
        t0 = time.perf_counter()
        check_layer_ids(self.lora_layers, model, "lora_layers")
        prompts = {k: self.prompts_for(k, data) for k in self.prompts}
        self.ids = {k: [prompt_ids(tokenizer, text, f"{k}_prompt") for text in v] for k, v in prompts.items()}
        self.rng = random.Random(self.seed)
        forget = forget_texts(data, self.forget_splits)
        was_training = {n: p.requires_grad for n, p in model.named_parameters()}

        def sample_consistency():
            with distributed.on_device(model):  # dist=fsdp: the plain model samples on the GPU
                return self.consistency_data(model.eval(), tokenizer, forget, data.max_length)
        seqs = distributed.on_main(sample_consistency)  # dist=fsdp: rank 0 samples once for every rank
        config = LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                            target_modules=ATTN_MLP, layers_to_transform=self.lora_layers, bias="none",
                            task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, config)
        batches = zip_batches({
            "forget": batch_iterator(tokenizer, forget, self.batch_size, data.max_length, self.seed),
            "retain": batch_iterator(tokenizer, data.retain, self.batch_size, data.max_length, self.seed + 1),
            "consistency": consistency_batches(seqs, self.batch_size, tokenizer.pad_token_id, self.seed + 2),
        }, model.device)
        terms = TermLog()
        with distributed.sharded(peft_model) as trained:  # dist=fsdp: a sharded twin, written back at the end
            params = [p for p in trained.parameters() if p.requires_grad]  # the LoRA factors only
            result = train_loop(trained, batches, lambda m, b: self.loss(m, terms, b), [adamw(params, self.lr)],
                                steps=self.steps, desc="defense elm")
        model = peft_model.merge_and_unload()
        for n, p in model.named_parameters():  # peft froze the base weights; give them back
            p.requires_grad_(was_training.get(n, True))
        self.info = run_info(t0, {"train": result}, terms, lora_params=sum(p.numel() for p in params),
                             consistency_texts=len(seqs), prompts=prompts)
        log.info("elm: %s", self.info)
        return model.eval()
