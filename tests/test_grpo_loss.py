"""GRPO's advantages, KL and loss aggregations against hand computations."""

import math

import pytest
import torch

from nanoseek.train.grpo_loss import group_advantages, grpo_loss, k3_kl, token_logprobs


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    # group 1: mean 0.5, sample std sqrt(1/3); group 2 all equal → 0 whatever the scaling
    s = math.sqrt(1 / 3)
    want = torch.tensor([0.5 / (s + 1e-4), -0.5 / (s + 1e-4), -0.5 / (s + 1e-4), 0.5 / (s + 1e-4), 0, 0, 0, 0])
    assert torch.allclose(group_advantages(r, 4), want)
    assert torch.allclose(group_advantages(r, 4, "none"), torch.tensor([.5, -.5, -.5, .5, 0, 0, 0, 0]))
    bs = r.std()
    assert torch.allclose(group_advantages(r, 4, "batch"), torch.tensor([.5, -.5, -.5, .5, 0, 0, 0, 0]) / (bs + 1e-4))
    with pytest.raises(ValueError):
        group_advantages(r, 3)


def test_k3_is_zero_when_policy_equals_reference_and_positive_otherwise():
    lp = torch.log_softmax(torch.randn(4, 7), -1)
    assert torch.equal(k3_kl(lp, lp), torch.zeros_like(lp))
    other = torch.log_softmax(torch.randn(4, 7), -1)
    assert (k3_kl(lp, other) >= 0).all() and k3_kl(lp, other).sum() > 0
    # k3 is an unbiased estimator of KL(p‖q) under samples of p: its p-weighted sum is the exact KL
    p = lp.exp()
    exact = (p * (lp - other)).sum(-1)
    assert torch.allclose((p * k3_kl(lp, other)).sum(-1), exact, atol=1e-6)


def test_token_logprobs_and_entropy():
    logits = torch.randn(2, 3, 5)
    targets = torch.tensor([[0, 4, 2], [1, 1, 3]])
    logp, ent = token_logprobs(logits, targets)
    ref = torch.log_softmax(logits, -1)
    assert torch.allclose(logp, ref.gather(-1, targets[..., None])[..., 0])
    assert torch.allclose(ent, torch.distributions.Categorical(logits=logits).entropy(), atol=1e-6)


def _case():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -9.0]])
    old = torch.tensor([[-1.2, -1.5, -0.5], [-0.3, -0.2, -9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = torch.tensor([1.0, -2.0])
    return logp, old, mask, adv


def _per_token_by_hand(logp, old, adv, lo, hi):
    out = torch.zeros_like(logp)
    for b in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            ratio = math.exp(float(logp[b, t] - old[b, t]))
            a = float(adv[b])
            out[b, t] = -min(ratio * a, min(max(ratio, 1 - lo), 1 + hi) * a)
    return out


@pytest.mark.parametrize("agg", ["grpo", "dapo", "dr_grpo"])
def test_clipped_surrogate_and_aggregations_by_hand(agg):
    logp, old, mask, adv = _case()
    pt = _per_token_by_hand(logp, old, adv, 0.2, 0.28)
    m = mask.float()
    want = {"grpo": ((pt * m).sum(1) / m.sum(1)).mean(),
            "dapo": (pt * m).sum() / m.sum(),
            "dr_grpo": (pt * m).sum() / (2 * 8)}[agg]
    loss, metrics = grpo_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28, aggregation=agg, max_len=8)
    assert torch.allclose(loss, want, atol=1e-6)
    # row 0 token 1: ratio e^-0.5 ≈ 0.61 < 0.8 but advantage > 0 → unclipped (min picks ratio·A);
    # row 1 token 1: ratio e^-0.5 < 0.8 with advantage < 0 → clipped low. 1 of 5 tokens.
    assert metrics["clip_low"] == pytest.approx(1 / 5) and metrics["clip_high"] == 0


def test_first_update_is_the_plain_policy_gradient():
    """With old = logp (detached), the ratio is 1: the gradient is −A·∇logp per token (aggregated)."""
    logits = torch.randn(2, 4, 6, requires_grad=True)
    targets = torch.randint(0, 6, (2, 4))
    mask = torch.ones(2, 4)
    adv = torch.tensor([0.7, -1.3])
    logp, _ = token_logprobs(logits, targets)
    loss, m = grpo_loss(logp, logp.detach(), adv, mask, aggregation="dapo")
    loss.backward()
    g1 = logits.grad.clone()
    logits.grad = None
    logp, _ = token_logprobs(logits, targets)
    (-(adv[:, None] * logp).sum() / 8).backward()
    assert torch.allclose(g1, logits.grad, atol=1e-6) and m["ratio"] == pytest.approx(1.0)


def test_kl_term_needs_reference_and_adds_beta_k3():
    logp, old, mask, adv = _case()
    ref = logp - 0.1
    with pytest.raises(ValueError):
        grpo_loss(logp, old, adv, mask, beta=0.04)
    base, _ = grpo_loss(logp, old, adv, mask, aggregation="dapo")
    with_kl, m = grpo_loss(logp, old, adv, mask, ref_logp=ref, beta=0.04, aggregation="dapo")
    k = k3_kl(logp, ref)
    mf = mask.float()
    assert torch.allclose(with_kl - base, 0.04 * (k * mf).sum() / mf.sum(), atol=1e-6)
    assert m["kl"] == pytest.approx(float((k * mf).sum() / mf.sum()), rel=1e-5)
