"""Each baseline's loss terms on tiny inputs, against values worked out by hand here (explicit
formulas over a few numbers, not the code under test)."""
from __future__ import annotations

import math
import types

import pytest
import torch

from baselines import common, elm, npo, repnoise, rmu, tar


def close(a, b, tol=1e-5):
    a = a.detach() if torch.is_tensor(a) else a
    return abs(float(a) - float(b)) <= tol * max(1.0, abs(float(b)))


# --------------------------------------------------------------------------------------------- common

def test_sequence_and_mean_nll_by_hand():
    # one sequence [BOS=0, 1, 2] over a 3-token vocabulary; the last label is padding
    logits = torch.tensor([[[0.0, 1.0, 2.0], [1.0, 0.0, 0.0], [5.0, 5.0, 5.0]]])
    labels = torch.tensor([[0, 1, -100]])
    # position 0 predicts token 1: -log softmax([0,1,2])[1]; position 1 predicts padding: ignored
    expected = -(1.0 - math.log(math.exp(0) + math.exp(1) + math.exp(2)))
    assert close(common.sequence_nll(logits, labels)[0], expected)
    assert close(common.mean_nll(logits, labels), expected)


def test_only_train_restores_flags(tiny_model):
    model, _ = tiny_model
    w = model.model.layers[0].mlp.down_proj.weight
    with common.only_train(model, [w]) as params:
        assert [p for p in model.parameters() if p.requires_grad] == params == [w]
    assert all(p.requires_grad for p in model.parameters())


def test_capture_outputs_sees_layer_outputs(tiny_model):
    model, _ = tiny_model
    ids = torch.tensor([[2, 10, 11, 3]])
    with common.capture_outputs(list(model.model.layers)) as out:
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    # transformers' hidden_states[i + 1] is layer i's output, except the last, which it norms
    assert torch.allclose(out[0], hs[1]) and torch.allclose(out[2], hs[3])
    assert torch.allclose(model.model.norm(out[3]), hs[4])


# --------------------------------------------------------------------------------------------- RMU

def test_rmu_terms_by_hand():
    h = torch.tensor([[[1.0, 2.0], [9.0, 9.0]]])          # second token is padding
    mask = torch.tensor([[True, False]])
    control = torch.tensor([3.0, 0.0])
    # only the first token counts: ((1-3)^2 + (2-0)^2) / 2 hidden units
    assert close(rmu.forget_term(h, mask, control), (4 + 4) / 2)
    frozen = torch.tensor([[[0.0, 0.0], [0.0, 0.0]]])
    assert close(rmu.retain_term(h, frozen, mask), (1 + 4) / 2)


def test_rmu_control_vector_is_scaled_positive_unit():
    u = rmu.control_vector(16, 6.5, torch.Generator().manual_seed(0))
    assert close(u.norm(), 6.5) and bool((u >= 0).all())


# --------------------------------------------------------------------------------------------- NPO

def test_npo_loss_by_hand():
    beta = 0.1
    nll, ref = torch.tensor([3.0, 1.0]), torch.tensor([1.0, 1.0])
    # (2/β) E[log(1 + (π_θ/π_ref)^β)] with π_θ/π_ref = exp(−(NLL_θ − NLL_ref))
    ratios = [math.exp(-(3.0 - 1.0)), math.exp(-(1.0 - 1.0))]
    expected = (2 / beta) * sum(math.log(1 + r ** beta) for r in ratios) / 2
    assert close(npo.npo_loss(nll, ref, beta), expected)
    # unchanged model: (2/β) log 2; the loss falls as the forget NLL rises
    assert close(npo.npo_loss(ref, ref, beta), 20 * math.log(2))
    assert npo.npo_loss(ref + 50, ref, beta) < npo.npo_loss(ref + 5, ref, beta)


def test_npo_schedule_is_the_originals():
    """One epoch of the forget set warms the lr up linearly, then it decays linearly to 0 (HF Trainer,
    as the original runs it); the gradient norm is clipped at 1.0."""
    from harness.train import lr_lambda
    defense = npo.NPO(beta=0.1, npo_coeff=1, retain_coeff=1, lr=1e-5, weight_decay=0.01, steps=300,
                      batch_size=4, grad_accum=4)
    assert defense.warmup_steps(n_forget=1000) == 63                      # ceil(1000 / 16)
    assert defense.warmup_steps(n_forget=10 ** 6) == 300                  # never past the run
    assert defense.max_grad_norm == 1.0
    factor = lr_lambda("linear", 63, 300)
    assert close(factor(0), 1 / 63) and close(factor(62), 1.0)
    assert close(factor(63), 1.0) and close(factor(63 + 237 // 2), 1 - (237 // 2) / 237)


# --------------------------------------------------------------------------------------------- RepNoise

def test_mmd_by_hand():
    x, y = torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0], [3.0]])
    pts = [0.0, 1.0, 0.0, 3.0]
    sq = [[(a - b) ** 2 for b in pts] for a in pts]
    bandwidth = sum(map(sum, sq)) / (4 * 4 - 4) / 2 ** 2          # mean off-diagonal, / mul^(num // 2)
    k = [[sum(math.exp(-sq[i][j] / (bandwidth * 2 ** m)) for m in range(5)) for j in range(4)] for i in range(4)]
    xx = sum(k[i][j] for i in (0, 1) for j in (0, 1))
    yy = sum(k[i][j] for i in (2, 3) for j in (2, 3))
    xy = sum(k[i][j] for i in (0, 1) for j in (2, 3))
    expected = (xx + yy - 2 * xy) / 4
    assert close(repnoise.mmd(x, y), expected)
    assert close(repnoise.mmd(x, x), 0.0)


def test_repnoise_ascent_term_by_hand():
    assert close(repnoise.ascent_term([torch.tensor(2.0), torch.tensor(4.0)]), math.log(3 + 1))


# --------------------------------------------------------------------------------------------- ELM

def test_eta_ramp_by_hand():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    ramp = elm.eta_ramp(mask, 1000)
    assert torch.allclose(ramp[0, :3], torch.tensor([1.0, 500.5, 1000.0]))
    assert torch.allclose(ramp[1], torch.tensor([1.0, 334.0, 667.0, 1000.0]))


def test_erase_target_by_hand():
    logp = torch.log(torch.tensor([[[0.5, 0.3, 0.2]]]))
    expert = torch.log(torch.tensor([[[0.8, 0.1, 0.1]]]))
    novice = torch.log(torch.tensor([[[0.4, 0.4, 0.2]]]))
    eta = torch.tensor([[2.0]])
    scores = [math.log(p) - 2.0 * (math.log(e) - math.log(n))
              for p, e, n in zip([0.5, 0.3, 0.2], [0.8, 0.1, 0.1], [0.4, 0.4, 0.2])]
    z = sum(math.exp(s) for s in scores)
    full = elm.erase_target(logp, expert, novice, eta, top_k=None)[0, 0]
    assert all(close(full[i], math.exp(scores[i]) / z) for i in range(3))
    # top_k = 2 drops the lowest score (token 0, which the expert context favours most)
    kept = sorted(range(3), key=lambda i: scores[i])[1:]
    z2 = sum(math.exp(scores[i]) for i in kept)
    top2 = elm.erase_target(logp, expert, novice, eta, top_k=2)[0, 0]
    assert top2[0] == 0 and all(close(top2[i], math.exp(scores[i]) / z2) for i in kept)


def test_soft_ce_and_prefix_by_hand():
    logits = torch.tensor([[[0.0, math.log(3.0)], [7.0, 7.0]]])   # softmax of the first: [1/4, 3/4]
    target = torch.tensor([[[0.5, 0.5], [1.0, 0.0]]])
    mask = torch.tensor([[1, 0]])
    assert close(elm.soft_ce(logits, target, mask), -(0.5 * math.log(0.25) + 0.5 * math.log(0.75)))
    b = elm.with_prefix({"input_ids": torch.tensor([[2, 7, 8, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 0]])},
                        [5, 6])
    assert b["input_ids"].tolist() == [[2, 5, 6, 7, 8, 0]] and b["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0]]


def test_prefixed_logprobs_align_the_first_text_token_with_the_last_prefix_token():
    """ELM's expert/novice log-probabilities at original position t come from position t + len(prefix)
    of the prefixed batch: the first text token is predicted from the last prefix token, not from BOS."""
    class Echo(torch.nn.Module):  # logits favour the input token at each position
        def forward(self, input_ids, attention_mask):
            return types.SimpleNamespace(logits=10.0 * torch.nn.functional.one_hot(input_ids, 10).float())

    batch = {"input_ids": torch.tensor([[2, 7, 8]]), "attention_mask": torch.tensor([[1, 1, 1]])}
    plain = elm.logprobs(Echo(), batch)
    prefixed = elm.logprobs(Echo(), elm.with_prefix(batch, [5, 6]), skip=2)
    assert plain.shape == prefixed.shape
    assert plain.argmax(-1).tolist() == [[2, 7, 8]]
    assert prefixed.argmax(-1).tolist() == [[6, 7, 8]]


# --------------------------------------------------------------------------------------------- TAR

def test_tar_random_mapping_and_representation_terms_by_hand():
    h = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [5.0, 5.0]]])
    targets = torch.tensor([[[0.0, 2.0], [-1.0, -1.0], [1.0, 0.0]]])
    mask = torch.tensor([[True, True, False]])
    # token 0: orthogonal -> 1 - 0; token 1: opposite -> 1 - |-1| = 0; token 2 is padding
    assert close(tar.random_mapping_term([h, h], targets, mask), 0.5)
    base = torch.zeros_like(h)
    assert close(tar.representation_term([h], [base], mask), (1.0 + math.sqrt(2)) / 2)


def test_negative_entropy_and_weights_by_hand():
    uniform = torch.zeros(1, 2, 4)
    assert close(tar.negative_entropy(uniform), -math.log(4))
    peaked = torch.tensor([[[0.0, math.log(3.0)]]])                # probabilities [1/4, 3/4]
    assert close(tar.negative_entropy(peaked), 0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert close(tar.inner_weight(63, 64, 0.0625), 1.0)
    assert close(tar.inner_weight(0, 64, 0.0625), math.exp(-0.0625 * 63))


def test_attach_gradient_adds_exactly_the_given_gradient():
    theta = torch.tensor([1.0, -2.0], requires_grad=True)
    g = torch.tensor([0.5, 3.0])
    loss = tar.attach_gradient((theta ** 2).sum(), [theta], [g])
    loss.backward()
    assert close(loss, 5.0)                                         # value unchanged
    assert torch.allclose(theta.grad, torch.tensor([2 * 1.0 + 0.5, 2 * -2.0 + 3.0]))


@pytest.mark.parametrize("bad", [[4], [-1], []])
def test_layer_ids_are_checked(tiny_model, bad):
    from harness.errors import ConfigError
    model, _ = tiny_model
    with pytest.raises(ConfigError, match="layer indices 0..3"):
        common.check_layer_ids(bad, model, "layer_id")
