"""The attackers the paper leaves out: AdamW, Lion, SignSGD, Adagrad, schedule-free AdamW, MeZO and
SGLD each take steps through the one training loop; MeZO's and SGLD's steps equal hand computations."""
from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate

from attacks.mezo import MeZO
from attacks.sgld import SGLD
from harness.batches import batch_iterator
from harness.errors import ConfigError
from harness.train import lm_loss, train_loop
from runner.validate import validate
from tests.conftest import compose_cfg
from tests.test_attacks import FixedEvaluator, snapshot

NEW = ["adamw", "lion", "signsgd", "adagrad", "schedulefree_adamw", "mezo", "sgld"]


def attack_for(name: str, *overrides: str):
    return instantiate(compose_cfg(f"attack={name}", "attack.steps=2", "attack.eval_every=1",
                                   "attack.batch_size=8", "attack.checkpoint_every=null", "lr=1e-4",
                                   *overrides).attack)


@pytest.mark.parametrize("name", NEW)
def test_each_new_optimizer_steps_the_pretrained_model(name, tiny_model, data):
    model, tokenizer = tiny_model
    before = snapshot(model)
    fixed = FixedEvaluator()
    result = attack_for(name)(model, tokenizer, data, fixed, start=fixed(model), threshold=None)
    assert result.steps == 2 and all(math.isfinite(x) for x in result.losses)
    unchanged = [n for n, p in model.named_parameters() if torch.equal(before[n], p)]
    assert not unchanged, f"{name} left {unchanged} unchanged"
    assert [p["step"] for p in result.trajectory] == [0, 1, 2]
    if name == "mezo":  # zeroth order: the loop never ran a backward
        assert all(p.grad is None for p in model.parameters())


def one_batch(tokenizer, data, n: int = 8) -> dict:
    return next(batch_iterator(tokenizer, data.forget_texts([0]), n, data.max_length, 0))


def by_hand_gaussians(params, seed: int, step: int) -> list[torch.Tensor]:
    """The documented draw of step t: one generator seeded with (seed << 32) + t, params in order."""
    g = torch.Generator().manual_seed((seed << 32) + step)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]


def loss_at(model, values, batch) -> float:
    with torch.no_grad():
        for p, v in zip(model.parameters(), values):
            p.copy_(v)
        return float(lm_loss(model, batch))


def test_mezo_step_equals_the_hand_computed_spsa_step(tiny_model, tiny_path, data):
    from harness.models import from_pretrained
    model, tokenizer = tiny_model
    model.double()  # float64: the in-place perturb/restore rounds far below the tolerance
    probe = from_pretrained(tiny_path)[0].double()
    theta = [p.detach().clone() for p in model.parameters()]
    batch = one_batch(tokenizer, data)
    lr, eps, seed = 1e-2, 1e-3, 7
    opt = MeZO(model.parameters(), lr=lr, eps=eps, seed=seed)
    result = train_loop(model, iter([batch]), lm_loss, [opt], steps=1, progress=False)

    z = by_hand_gaussians(theta, seed, 0)
    probe.train()
    plus = loss_at(probe, [t + eps * zi for t, zi in zip(theta, z)], batch)
    minus = loss_at(probe, [t - eps * zi for t, zi in zip(theta, z)], batch)
    g = (plus - minus) / (2 * eps)
    assert g != 0
    for p, t, zi in zip(model.parameters(), theta, z):
        torch.testing.assert_close(p.detach(), t - lr * g * zi, rtol=0, atol=1e-12)
    # transformers computes the loss in float32 (logits.float()), so the reported mean is float32
    assert result.losses == pytest.approx([(plus + minus) / 2], rel=1e-6)
    assert opt.param_groups[0]["step"] == 1


def test_mezo_needs_a_closure_and_skips_a_non_finite_estimate():
    p = torch.nn.Parameter(torch.ones(3))
    opt = MeZO([p], lr=1.0)
    with pytest.raises(RuntimeError, match="needs a closure"):
        opt.step()
    losses = iter([float("inf"), 2.0])
    assert math.isnan(float(opt.step(lambda: torch.tensor(next(losses)))))
    torch.testing.assert_close(p.detach(), torch.ones(3))
    # the probes overflowed, not θ: recorded as such (step 1, both probe losses), and no step taken
    assert opt.probe_overflow == {"step": 1, "loss_plus": float("inf"), "loss_minus": 2.0}
    assert opt.param_groups[0]["step"] == 0


def _ulp(x: torch.Tensor) -> torch.Tensor:
    """One unit in the last place of each (normal) value of x, in x's dtype, as float64."""
    _, exponent = torch.frexp(x.double().abs())
    return torch.finfo(x.dtype).eps * torch.pow(2.0, exponent.double() - 1)


@pytest.mark.parametrize("dtype, scale", [(torch.bfloat16, 0.02), (torch.float32, 0.02 * 1e4)],
                         ids=["bfloat16", "float32-amplified"])
def test_mezo_restores_in_place_within_its_rounding_and_bit_for_bit_with_exact_restore(dtype, scale):
    """A step whose estimate is 0 (a constant loss) must leave θ where it was. In place, the three
    roundings (to θ + εz, θ − εz, back) leave up to ~1.5 ulp per weight, whole units of θ's last place
    on some (bfloat16 weights; float32 weights amplified by α = 1e4): not ε·ulp. exact_restore=True
    restores θ bit for bit."""
    theta = (torch.randn(4096, generator=torch.Generator().manual_seed(0)) * scale).to(dtype)
    eps, seed = 1e-3, 1

    def one_step(exact: bool) -> torch.Tensor:
        p = torch.nn.Parameter(theta.clone())
        opt = MeZO([p], lr=1e-6, eps=eps, seed=seed, exact_restore=exact)
        assert float(opt.step(lambda: torch.tensor(1.0))) == 1.0  # g = 0: the update adds exactly 0
        return p.detach()

    assert torch.equal(one_step(True), theta)
    restored = one_step(False)
    z = by_hand_gaussians([theta], seed, 0)[0]
    plus = theta.add(z, alpha=eps)
    minus = plus.add(z, alpha=-2 * eps)
    error = (restored.double() - theta.double()).abs()
    assert (error <= 0.5 * (_ulp(plus) + _ulp(minus) + _ulp(restored))).all()
    assert (error >= _ulp(theta)).sum() > 100


def test_mezo_exact_restore_keeps_a_copy_in_the_memory_plan():
    from attacks.optimizers import states_per_parameter
    assert states_per_parameter(compose_cfg("attack=mezo").attack.optimizer, 2) == 0
    exact = compose_cfg("attack=mezo", "attack.optimizer.exact_restore=true").attack.optimizer
    assert states_per_parameter(exact, 2) == 1


@pytest.mark.parametrize("theta_broken", [False, True])
def test_a_mezo_probe_overflow_is_its_own_stop_reason_not_a_dagger_of_theta(theta_broken, tiny_model, data,
                                                                            monkeypatch):
    """The loss at θ + εz of step 2 overflows: no step is taken, θ (restored; step 1's) is evaluated and
    the run stops with a probe overflow as its reason. It is a † only if θ itself is broken."""
    import attacks.relearn
    from harness.train import lm_loss as real_loss
    model, tokenizer = tiny_model
    calls = []

    def overflowing(model, batch):
        calls.append(1)
        loss = real_loss(model, batch)
        return loss * float("inf") if len(calls) == 3 else loss  # step 2's first probe

    monkeypatch.setattr(attacks.relearn, "lm_loss", overflowing)
    fixed = FixedEvaluator()
    start = fixed(model)
    evaluator = (lambda m: {**fixed(m), "retain_ppl": 1e3}) if theta_broken else fixed
    result = attack_for("mezo", "attack.steps=4", "attack.eval_every=2")(model, tokenizer, data, evaluator,
                                                                       start=start, threshold=None)
    assert result.steps == 1 and result.losses and len(result.losses) == 1
    assert [p["step"] for p in result.trajectory] == [0, 1]
    point = result.trajectory[-1]
    assert point["loss"] is None and math.isinf(point["probe_losses"][0]) and math.isfinite(point["probe_losses"][1])
    assert result.stop_reason.startswith("probe overflow: non-finite loss at θ ± εz")
    assert "in step 2" in result.stop_reason
    if theta_broken:
        assert result.diverged and result.divergence_step == 1 and "retain perplexity" in result.divergence_reason
        assert result.outcome["kind"] == "diverged"
    else:
        assert not result.diverged and result.divergence_reason is None
        assert result.outcome == {"kind": "not_recovered", "step": 1, "hazard_acc": 0.4}


def test_sgld_step_equals_sgd_plus_gaussian_noise_of_variance_2lr_over_t(tiny_model, data):
    model, tokenizer = tiny_model
    model.double()
    batch = one_batch(tokenizer, data)
    theta = [p.detach().clone() for p in model.parameters()]
    model.train()
    grads = torch.autograd.grad(lm_loss(model, batch), list(model.parameters()))
    lr, temperature, seed = 1e-2, 50.0, 3
    opt = SGLD(model.parameters(), lr=lr, temperature=temperature, seed=seed)
    train_loop(model, iter([batch]), lm_loss, [opt], steps=1, progress=False)
    noise = by_hand_gaussians(theta, seed, 0)
    for p, t, g, xi in zip(model.parameters(), theta, grads, noise):
        torch.testing.assert_close(p.detach(), t - lr * g + math.sqrt(2 * lr / temperature) * xi,
                                   rtol=0, atol=1e-12)


def test_sgld_temperature_counts_tokens_since_the_loss_is_a_per_token_mean(tiny_model, data):
    """The relearning loss is the mean NLL over the batch's loss-bearing tokens (texts of different
    lengths weigh by their tokens), so SGLD's exp(-T·L) is the Bayesian posterior of a set at T = its
    number of tokens N, not its number of texts n: on a per-token-mean quadratic loss over N = 40
    tokens in n = 4 texts, the chain's variance is that of the posterior, 1/N (up to the step's
    discretisation), ten times below the 1/n of T = n."""
    import torch.nn.functional as F
    model, tokenizer = tiny_model
    batch = one_batch(tokenizer, data)
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    assert mask.sum(1).unique().numel() > 1  # texts of different lengths
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
        assert float(lm_loss(model, batch)) == pytest.approx(float(nll.sum() / mask.sum()), rel=1e-5)

    tokens = torch.randn(4, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # n=4, N=40
    theta = torch.nn.Parameter(tokens.mean().reshape(1).clone())
    lr, n_tokens = 0.05, tokens.numel()
    opt = SGLD([theta], lr=lr, temperature=float(n_tokens), seed=0)
    samples = []
    for _ in range(20000):
        opt.zero_grad()
        (0.5 * (theta - tokens) ** 2).mean().backward()
        opt.step()
        samples.append(float(theta.detach()))
    variance = torch.tensor(samples[1000:], dtype=torch.float64).var().item()
    posterior = 1 / n_tokens / (1 - lr / 2)  # exp(-N·L) = N(mean, 1/N); the step's discretisation
    assert variance == pytest.approx(posterior, rel=0.15), variance


def test_schedule_free_is_evaluated_and_left_at_its_average(tiny_model, data):
    model, tokenizer = tiny_model
    seen = []

    def evaluator(m):
        seen.append(snapshot(m))
        return FixedEvaluator()(m)

    attack = attack_for("schedulefree_adamw")
    built = []
    build = attack.build_optimizers
    attack.build_optimizers = lambda m: built.extend(build(m)) or built
    attack(model, tokenizer, data, evaluator, start=FixedEvaluator()(model), threshold=None)
    opt = built[0]
    assert not opt.param_groups[0]["train_mode"]
    final = snapshot(model)
    for n in final:  # the model it returns is the one scored (up to the rounding of the y <-> x round trip)
        torch.testing.assert_close(final[n], seen[-1][n], rtol=1e-6, atol=1e-7)
    opt.train()  # the training point y differs from the evaluated average x
    assert any(not torch.equal(final[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize("override, key", [("attack.max_grad_norm=1.0", "attack.max_grad_norm=1.0"),
                                           ("attack.second_order=true", "attack.second_order=True")])
def test_forward_only_refuses_what_needs_a_gradient(override, key):
    with pytest.raises(ConfigError, match=f"{key} with attack.optimizer._target_=attacks.mezo.MeZO"):
        validate(compose_cfg("attack=mezo", override))
