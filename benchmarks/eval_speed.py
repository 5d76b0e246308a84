"""How close is one evaluation to the forward passes it needs? (Not a test: timings depend on the machine.)

    python -m benchmarks.eval_speed [--repeats 7] [--threads 1] [extra Hydra overrides ...]

On the run's default evaluation (the cached tiny model, `eval=synthetic`), measured side by side in
one process, alternating, `--repeats` times each, medians compared (so load from other jobs on a
shared machine hits all alike):
- evaluation: `evaluator(model)` on a new model state (weights nudged before each call, so the memo
  misses): fingerprint, lm-eval scoring and both perplexities, as an attack's evaluation costs;
- forward passes: lm-eval's batched log-likelihood (HFLM `_loglikelihood_tokens`) over the same
  pre-tokenized requests, plus the perplexity forward passes over the same pre-tokenized texts;
- plain lm-eval: `evaluator.evaluate(model, plain=True)`, lm-eval's `evaluate` rendering and tokenizing
  every request again (the path before requests were built once).
Target: evaluation / forward passes <= 1.5.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from experiments.common import compose_config
from harness.batches import perplexity
from harness.data import load_data
from harness.evaluate import _quiet_hflm, build_evaluator
from harness.models import load_model


def load(overrides: list[str]):
    """The run config, data, model and tokenizer `python run.py <overrides>` would use."""
    cfg = compose_config(overrides)
    cache = Path(cfg.paths.cache_dir).expanduser()
    data = load_data(cfg.data, cache)
    return (cfg, data, *load_model(cfg.model, cfg.data, data, cache))


def forward_passes(evaluator, model) -> None:
    """What an evaluation cannot avoid: the model on every request and every perplexity text."""
    lm = _quiet_hflm()(pretrained=model, tokenizer=evaluator.tokenizer, device=str(model.device),
                       batch_size=evaluator.batch_size, max_length=evaluator.max_length)
    requests = evaluator.requests.token_requests(lm, evaluator.tokenizer_id)
    with torch.no_grad():
        lm._loglikelihood_tokens(requests, disable_tqdm=True)
    for batches in evaluator.ppl_batches.values():
        perplexity(model, batches)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as the tests run)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of the run config (e.g. eval.limit=50)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg, data, model, tokenizer = load(args.overrides)
    evaluator = build_evaluator(cfg.eval, tokenizer, data)

    def evaluation():
        with torch.no_grad():
            model.lm_head.weight.mul_(1 + 1e-6)  # a new state: the memo must miss
        return timed(lambda: evaluator(model))

    evaluation()  # first call: tokenizes the requests (once per process)
    runs = {"evaluation": [], "forward passes": [], "plain lm-eval": []}
    for _ in range(args.repeats):
        runs["evaluation"].append(evaluation())
        runs["forward passes"].append(timed(lambda: forward_passes(evaluator, model)))
        runs["plain lm-eval"].append(timed(lambda: evaluator.evaluate(model, plain=True)))
    medians = {name: statistics.median(times) for name, times in runs.items()}
    requests = len(evaluator.requests.instances)
    texts = sum(len(t) for t in evaluator.ppl_texts.values())
    print(f"tiny model, {requests} lm-eval requests + {texts} perplexity texts, {args.threads} thread(s), "
          f"median of {args.repeats}:")
    for name, seconds in medians.items():
        print(f"  {name:<15} {seconds:6.3f} s   ({', '.join(f'{t:.2f}' for t in runs[name])})")
    bare = medians["forward passes"]
    print(f"evaluation / forward passes: {medians['evaluation'] / bare:.2f}x (target <= 1.5); "
          f"plain lm-eval / forward passes: {medians['plain lm-eval'] / bare:.2f}x")


if __name__ == "__main__":
    main()
