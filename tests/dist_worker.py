"""Training paths run the same way in one process and sharded over ranks (tests/test_distributed.py).

`python -m tests.dist_worker OUT [overrides...]` in one process, or under
`torchrun --nproc-per-node=2 -m tests.dist_worker OUT dist=fsdp [overrides...]`: the pretrained tiny
model with SpecDef layers in every block is evaluated, fine-tuned with Adam, fine-tuned with LoRA, and
unlearned with NPO (a reference model); rank 0 writes the losses, the metrics and the final weights
to OUT (`results.json`, `<scenario>.safetensors`).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from hydra.utils import instantiate
from safetensors.torch import save_file

from harness import distributed
from harness.models import from_pretrained
from specdef.core import apply_specdef
from tests.conftest import CACHE_DIR, compose_cfg

SPECDEF = {"alpha": 100.0, "k": 4, "layers": ["model.layers.*.mlp.down_proj"]}
ATTACK = ["attack.steps=3", "attack.eval_every=3", "attack.batch_size=8", "attack.checkpoint_every=null", "lr=1e-4"]
LORA_TARGETS = "attack.peft.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj]"


class WeightsAtTheEnd:
    """An evaluator that scores nothing and keeps the whole weights of the model it last saw (gathered
    from every rank when sharded): what an attack's final step leaves."""

    def __init__(self):
        self.weights: dict[str, torch.Tensor] = {}

    def __call__(self, model) -> dict:
        from torch.distributed.tensor import DTensor
        self.weights = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
                        for n, p in model.named_parameters() if p.requires_grad}
        return {"hazard_acc": 0.0, "utility_acc": 0.0, "retain_ppl": 1.0}


def defended_tiny(tiny_path):
    model, tokenizer = from_pretrained(tiny_path)
    torch.manual_seed(0)
    return apply_specdef(model, **SPECDEF), tokenizer


def attack(cfg, tiny_path, data) -> tuple[list[float], dict]:
    model, tokenizer = defended_tiny(tiny_path)
    weights = WeightsAtTheEnd()
    start = {"hazard_acc": 0.0, "utility_acc": 0.0, "retain_ppl": 1.0}
    result = instantiate(cfg.attack)(model, tokenizer, data, weights, start=start, threshold=None)
    return result.losses, weights.weights


def npo(cfg, tiny_path, data) -> tuple[list[float], dict]:
    import baselines.npo
    model, tokenizer = defended_tiny(tiny_path)
    losses = []

    def recorded(*args, **kwargs):  # the defense keeps only its final loss; the test wants every step's
        result = train_loop(*args, **kwargs)
        losses.extend(result.losses)
        return result
    train_loop, baselines.npo.train_loop = baselines.npo.train_loop, recorded
    try:
        model = instantiate(cfg.defense)(model, tokenizer, data)
    finally:
        baselines.npo.train_loop = train_loop
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


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
    runs = {"adam": compose_cfg(*ATTACK, "attack=adam", *overrides),
            "lora": compose_cfg(*ATTACK, "attack=adam", "attack/peft=lora", LORA_TARGETS, *overrides),
            "npo": compose_cfg("defense=npo", "defense.steps=3", "defense.batch_size=8", "defense.lr=1e-4", *overrides)}
    for name, cfg in runs.items():
        losses, weights = (npo if name == "npo" else attack)(cfg, tiny_path, data)
        results[name] = losses
        if distributed.is_main():
            save_file({k: v.contiguous() for k, v in weights.items()}, str(out / f"{name}.safetensors"))
    if distributed.is_main():
        (out / "results.json").write_text(json.dumps(results))
    return results


if __name__ == "__main__":
    torch.set_num_threads(1)
    folder = Path(sys.argv[1])
    folder.mkdir(parents=True, exist_ok=True)
    scenarios(folder, *sys.argv[2:])
