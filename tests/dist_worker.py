"""Training paths run the same way in one process and sharded over ranks (tests/test_distributed.py).

`python -m tests.dist_worker OUT` in one process, or
`torchrun --nproc-per-node=2 -m tests.dist_worker OUT dist=fsdp` (one launch for every check: starting
the ranks costs more than the checks). Scenarios:
- the pretrained tiny model with SpecDef in every block: evaluated, fine-tuned with Adam (sharded also
  with activation checkpointing), with LoRA, Muon, SGLD and MeZO (sharded also killed and resumed from a
  checkpoint, and MeZO evaluated between its steps), unlearned with NPO (a reference model);
- the other training-based defenses (RMU, RepNoise, ELM, TAR) on the plain tiny model, as the pipeline
  runs them before SpecDef;
- tiny random GPT-2 and Mixtral models with SpecDef's default layers (a Conv1D; an MoE experts module
  with its compensation) in every block, fine-tuned with Adam.
Rank 0 writes the losses, the metrics and the final weights to OUT (`results.json`,
`<scenario>.safetensors`). Sharded, the launch then runs the whole pipeline once (`RUN`, run folder
OUT/run): the uninterrupted run a killed and resumed one is compared with.
"""
from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import torch
from hydra.utils import instantiate
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

from harness import distributed
from harness.models import from_pretrained
from harness.train import lm_loss, train_loop
from specdef.core import apply_specdef
from tests.conftest import CACHE_DIR, compose_cfg

SPECDEF = {"alpha": 100.0, "k": 4, "layers": ["model.layers.*.mlp.down_proj"]}
ATTACK = ["attack.steps=3", "attack.eval_every=3", "attack.batch_size=8", "attack.checkpoint_every=null", "lr=1e-4"]
LORA_TARGETS = "attack.peft.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj]"
# every training-based defense, a few steps each (ELM without LoRA dropout: each rank would draw its own)
DEFENSES = {
    "npo": ["defense=npo", "defense.steps=3", "defense.batch_size=8", "defense.lr=1e-4"],
    "rmu": ["defense=rmu", "defense.steps=3", "defense.batch_size=8", "defense.lr=1e-3"],
    "repnoise": ["defense=repnoise", "defense.steps=3", "defense.batch_size=8"],
    "elm": ["defense=elm", "defense.steps=3", "defense.batch_size=8", "defense.lora_dropout=0", "defense.n_consistency=8"],
    "tar": ["defense=tar", "defense.rm_steps=2", "defense.outer_steps=2", "defense.inner_steps=2",
            "defense.inner_subsample=1", "defense.warmup_steps=1", "defense.batch_size=8",
            "defense.adversary_batch_size=8"],
}
# SGLD and MeZO checkpointed (their step counters live in the param groups), and killed in between
CHECKPOINTED = ["attack.eval_every=1", "attack.checkpoint_every=1"]
# MeZO with evaluations (forward passes without a backward) between its steps
EVALUATED = ["attack.eval_every=1"]
# the whole pipeline, sharded: 12 attack steps, evaluated and checkpointed (sharded) every 4
RUN = ["dist=fsdp", "attack.steps=12", "attack.eval_every=4", "attack.checkpoint_every=4", "eval.limit=20"]
# tiny random models of the families whose SpecDef layers are not nn.Linear
FAMILY_SHAPE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0, bos_token_id=1,
                    eos_token_id=2)
# dropout off: each rank would draw its own mask for its rows
FAMILIES = {"gpt2": {"n_positions": 32, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},  # Conv1D c_proj
            "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2}}  # fused 3-D experts


class WeightsAtTheEnd:
    """An evaluator that scores nothing and keeps the whole weights of the model it last saw (gathered
    from every rank when sharded): what an attack's final step leaves."""

    def __init__(self):
        self.weights: dict[str, torch.Tensor] = {}

    def __call__(self, model) -> dict:
        self.weights = whole_weights(model, trained_only=True)
        return {"hazard_acc": 0.0, "utility_acc": 0.0, "retain_ppl": 1.0}


class ForwardThenWeights(WeightsAtTheEnd):
    """An evaluator that runs a forward pass without a backward, as every evaluation does (this rank's
    rows of a fixed batch), then keeps the whole weights."""

    def __init__(self, batch: dict):
        super().__init__()
        self.batch = batch

    def __call__(self, model) -> dict:
        with torch.no_grad():
            lm_loss(model, distributed.local_part(self.batch, next(model.parameters()).device))
        return super().__call__(model)


class Killed(Exception):
    """What a SIGKILL leaves of an attack: whatever its last checkpoint holds."""


class KilledAt(WeightsAtTheEnd):
    """Kills the attack at its `at`-th evaluation, before the checkpoint of that step."""

    def __init__(self, at: int):
        super().__init__()
        self.at, self.calls = at, 0

    def __call__(self, model) -> dict:
        self.calls += 1
        if self.calls == self.at:
            raise Killed
        return super().__call__(model)


def whole_weights(model, trained_only: bool = False) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in model.named_parameters() if p.requires_grad or not trained_only}


def defended_tiny(tiny_path, specdef: bool = True):
    """The pretrained tiny model, with SpecDef on every block's down_proj unless `specdef` is false."""
    model, tokenizer = from_pretrained(tiny_path)
    torch.manual_seed(0)
    return (apply_specdef(model, **SPECDEF) if specdef else model), tokenizer


def attack(cfg, tiny_path, data, evaluator=None, checkpoint_dir=None) -> tuple[list[float], dict]:
    model, tokenizer = defended_tiny(tiny_path)
    weights = evaluator or WeightsAtTheEnd()
    start = {"hazard_acc": 0.0, "utility_acc": 0.0, "retain_ppl": 1.0}
    result = instantiate(cfg.attack)(model, tokenizer, data, weights, start=start, threshold=None,
                                     checkpoint_dir=checkpoint_dir)
    return result.losses, weights.weights


def killed_and_resumed(cfg, tiny_path, data, folder: Path) -> tuple[list[float], dict]:
    """The attack killed at its second evaluation (step 2; the last checkpoint is step 1's), then run
    again on a fresh model, from that checkpoint."""
    try:
        attack(cfg, tiny_path, data, KilledAt(2), folder)
        raise AssertionError("the attack was not killed")
    except Killed:
        pass
    assert json.loads((folder / "meta.json").read_text())["step"] == 1
    return attack(cfg, tiny_path, data, checkpoint_dir=folder)


def fixed_batch(tiny_path, data) -> dict:
    """A batch of retain text, the same on every rank (each evaluates its own rows)."""
    from harness.batches import batch_iterator
    return next(batch_iterator(from_pretrained(tiny_path)[1], list(data.retain), 8, data.max_length, seed=5))


def defend(cfg, tiny_path, data) -> tuple[list[float], dict]:
    """A training-based defense on the defended tiny model: the losses of every step of its training
    loops (TAR has two) and its final weights."""
    module = sys.modules[type(instantiate(cfg.defense)).__module__]
    # NPO with SpecDef in every block; the others as the pipeline runs them, before SpecDef (RMU trains
    # down_proj's weight, ELM puts LoRA on it)
    model, tokenizer = defended_tiny(tiny_path, specdef=cfg.defense._target_.endswith(".NPO"))
    losses = []

    def recorded(*args, **kwargs):  # a defense keeps only its final loss; the test wants every step's
        result = train_loop_of_defense(*args, **kwargs)
        losses.extend(result.losses)
        return result
    train_loop_of_defense, module.train_loop = module.train_loop, recorded
    try:
        model = instantiate(cfg.defense)(model, tokenizer, data)
    finally:
        module.train_loop = train_loop_of_defense
    return losses, whole_weights(model)


def family(model_type: str) -> tuple[list[float], dict]:
    """3 Adam steps of a tiny random model of `model_type` defended by SpecDef's default layers, through
    the one training loop (sharded under dist=fsdp, written back into the plain model)."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **FAMILY_SHAPE, **FAMILIES[model_type])
    model = apply_specdef(AutoModelForCausalLM.from_config(config), alpha=100.0, k=4)
    ids = torch.randint(1, FAMILY_SHAPE["vocab_size"], (8, 16), generator=torch.Generator().manual_seed(1))
    batches = itertools.repeat({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    with distributed.sharded(model) as trained:
        optimizer = torch.optim.Adam(trained.parameters(), lr=1e-3)
        result = train_loop(trained, batches, lm_loss, [optimizer], steps=3, progress=False)
    return result.losses, whole_weights(model)


def scenarios(out: Path, *overrides: str) -> dict:
    """Run every scenario with `overrides` (e.g. dist=fsdp); rank 0 writes them to `out`."""
    from harness import synthetic
    from harness.data import load_data
    from harness.evaluate import build_evaluator
    from harness.models import tiny_spec
    from harness.tiny import ensure_tiny
    base = compose_cfg(*ATTACK, *overrides)
    distributed.setup(base)
    with distributed.main_first():
        data = load_data(base.data, CACHE_DIR)
        tiny_path = ensure_tiny(synthetic.WorldConfig(**base.data.world), tiny_spec(base.model), data.root,
                                CACHE_DIR, progress=False)
        evaluator = build_evaluator(base.eval, from_pretrained(tiny_path)[1], data)
    results = {"metrics": evaluator(defended_tiny(tiny_path)[0])}

    def keep(name: str, losses: list[float], weights: dict) -> None:
        results[name] = losses
        if distributed.is_main():
            save_file({k: v.contiguous() for k, v in weights.items()}, str(out / f"{name}.safetensors"))

    attacks = {"adam": compose_cfg(*ATTACK, "attack=adam", *overrides),
               "lora": compose_cfg(*ATTACK, "attack=adam", "attack/peft=lora", LORA_TARGETS, *overrides),
               "muon": compose_cfg(*ATTACK, "attack=muon", *overrides),
               "sgld": compose_cfg(*ATTACK, "attack=sgld", *overrides),     # seeded noise on every weight
               "mezo": compose_cfg(*ATTACK, "attack=mezo", *overrides)}     # forward passes only
    for name, cfg in attacks.items():
        keep(name, *attack(cfg, tiny_path, data))
    for name, defense_overrides in DEFENSES.items():
        keep(name, *defend(compose_cfg(*defense_overrides, *overrides), tiny_path, data))
    for name in FAMILIES:
        keep(name, *family(name))
    if distributed.active():  # the Adam attack again, each block's activations recomputed in backward
        distributed.setup(compose_cfg(*ATTACK, *overrides, "dist.activation_checkpointing=true"))
        keep("adam_checkpointed", *attack(attacks["adam"], tiny_path, data))
        distributed.setup(base)
        sharded_only(out, keep, tiny_path, data, *overrides)
        distributed.setup(base)
    if distributed.is_main():
        (out / "results.json").write_text(json.dumps(results))
    return results


def sharded_only(out: Path, keep, tiny_path, data, *overrides: str) -> None:
    """SGLD and MeZO killed and resumed from a sharded checkpoint, MeZO evaluated between its steps:
    each is compared with its plain scenario, sharded and in one process."""
    for name in ("sgld", "mezo"):
        cfg = compose_cfg(*ATTACK, *CHECKPOINTED, f"attack={name}", *overrides)
        keep(f"{name}_resumed", *killed_and_resumed(cfg, tiny_path, data, out / f"checkpoint_{name}"))
    evaluated, batch = compose_cfg(*ATTACK, *EVALUATED, "attack=mezo", *overrides), fixed_batch(tiny_path, data)
    keep("mezo_evaluated", *attack(evaluated, tiny_path, data, ForwardThenWeights(batch)))
    distributed.setup(compose_cfg(*ATTACK, *overrides, "dist.reshard_after_forward=false"))
    keep("mezo_evaluated_blocks_gathered", *attack(evaluated, tiny_path, data, ForwardThenWeights(batch)))


def uninterrupted_run(out: Path) -> None:
    """The whole pipeline with RUN, as `torchrun ... run.py <RUN>` runs it; its record goes to out/run."""
    from runner.pipeline import run
    run(compose_cfg(*RUN), out / "run")


if __name__ == "__main__":
    torch.set_num_threads(1)
    folder = Path(sys.argv[1])
    folder.mkdir(parents=True, exist_ok=True)
    scenarios(folder, *sys.argv[2:])
    if distributed.active():
        uninterrupted_run(folder)
