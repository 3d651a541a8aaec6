"""DeepSeek-V3.2's GRPO stability options, each against a hand computation on a constructed batch: the
unbiased (importance-weighted) KL, off-policy sequence masking, keep sampling mask, and keep routing (the
training forward picks the rollout's experts even after the router changed)."""

from __future__ import annotations

import math

import pytest
import torch
from test_chat import make_tokenizer
from test_grpo import DigitTask

from nanoseek.models import build_model
from nanoseek.models.config import DeepseekConfig
from nanoseek.train.grpo import (
    GRPOConfig,
    GRPOObjective,
    Rollouts,
    replay_routing,
    routers,
)
from nanoseek.train.grpo_loss import grpo_loss
from nanoseek.train.loop import LMForward
from nanoseek.train.pretrain import init_weights

# Two sequences of three tokens; the second has only two completion tokens.
LOGP = [[-1.0, -2.0, -0.5], [-0.3, -1.2, -9.0]]
OLD = [[-1.1, -1.8, -0.5], [-0.9, -0.2, -9.0]]
REF = [[-1.5, -2.0, -0.2], [-0.3, -0.7, -9.0]]
MASK = [[1, 1, 1], [1, 1, 0]]


def _t(x):
    return torch.tensor(x, dtype=torch.float32)


def _surrogate(lp, old, a, eps=0.2):
    r = math.exp(lp - old)
    return -min(r * a, max(min(r, 1 + eps), 1 - eps) * a)


def _k3(lp, ref):
    return math.exp(ref - lp) - (ref - lp) - 1


def test_unbiased_kl_weights_k3_by_the_importance_ratio():
    adv, beta = [0.5, -1.0], 0.1
    for unbiased in (False, True):
        loss, m = grpo_loss(_t(LOGP), _t(OLD), _t(adv), _t(MASK), ref_logp=_t(REF), beta=beta,
                            aggregation="dapo", unbiased_kl=unbiased)
        total, kl_sum, n = 0.0, 0.0, 0
        for i in range(2):
            for t in range(3):
                if MASK[i][t]:
                    kl = _k3(LOGP[i][t], REF[i][t])
                    if unbiased:
                        kl *= math.exp(LOGP[i][t] - OLD[i][t])
                    total += _surrogate(LOGP[i][t], OLD[i][t], adv[i]) + beta * kl
                    kl_sum += kl
                    n += 1
        assert float(loss) == pytest.approx(total / n, rel=1e-5)
        assert m["kl"] == pytest.approx(kl_sum / n, rel=1e-5)
    # The gradient of ρ·k3 with respect to log π_θ is ρ·(k3 + 1 − π_ref/π_θ) = ρ·(1 − (ref − logp))·… by hand:
    lp = torch.tensor([-1.0], requires_grad=True)
    grpo_loss(lp[None], _t([[-1.3]]), _t([0.0]), _t([[1]]), ref_logp=_t([[-0.4]]), beta=1.0,
              unbiased_kl=True)[0].backward()
    rho, d = math.exp(-1.0 + 1.3), -0.4 + 1.0
    # d/dlogp [ρ (e^d − d − 1)] with dρ/dlogp = ρ and dd/dlogp = −1: ρ(e^d − d − 1) + ρ(−e^d + 1) = −ρ·d
    assert float(lp.grad) == pytest.approx(-rho * d, rel=1e-5)


def test_offpolicy_masking_drops_only_divergent_negative_sequences():
    # Per-sequence mean of old − logp: seq 0: (−0.1 + 0.2 + 0)/3 = 0.0333; seq 1: (−0.6 + 1.0)/2 = 0.2.
    # Seq 2 (A > 0) diverges as much as seq 1 but is kept: only negative-advantage sequences are dropped.
    logp = _t(LOGP + [[-0.3, -1.2, -9.0]])
    old = _t(OLD + [[-0.9, -0.2, -9.0]])
    mask = _t(MASK + [[1, 1, 0]])
    adv = [-1.0, -1.0, 0.7]
    loss, m = grpo_loss(logp, old, _t(adv), mask, aggregation="grpo", offpolicy_threshold=0.1)
    per_seq = []
    for i in range(3):
        if i == 1:          # A < 0 and divergence 0.2 > 0.1: its surrogate is masked, its length still counts
            per_seq.append(0.0)
            continue
        toks = [_surrogate(float(logp[i, t]), float(old[i, t]), adv[i]) for t in range(3) if mask[i, t]]
        per_seq.append(sum(toks) / len(toks))
    assert float(loss) == pytest.approx(sum(per_seq) / 3, rel=1e-5)
    assert m["offpolicy_masked"] == pytest.approx(1 / 3)
    # Above every divergence nothing is masked: the default loss.
    same = grpo_loss(logp, old, _t(adv), mask, aggregation="grpo", offpolicy_threshold=0.5)[0]
    assert float(same) == pytest.approx(float(grpo_loss(logp, old, _t(adv), mask, aggregation="grpo")[0]))


def test_keep_sampling_mask_renormalises_over_the_top_p_set_of_pi_old():
    # One row, V = 4. π_old at position 0: probs ∝ e^[2, 1, 0, −1] = [.644, .237, .087, .032]: top-p 0.8 keeps
    # tokens 0 and 1 (mass before token 1 is .644 < .8; before token 2 it is .881 ≥ .8).
    old_logits = torch.tensor([[[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0], [0.0] * 4]])
    ids = torch.tensor([[3, 1, 2]])   # targets: token 1 at position 0, token 2 at position 1
    obj = GRPOObjective(GRPOConfig(top_p=0.8, keep_sampling_mask=True))
    allowed = obj.sampling_mask(old_logits, ids)
    assert allowed[0, 0].tolist() == [True, True, False, False]
    # Position 1 is uniform: top-p 0.8 keeps the first 4·0.8 → 4 tokens (mass before the 4th is .75 < .8).
    assert allowed[0, 1].tolist() == [True] * 4
    # The current policy's logits moved; its log-prob of token 1 is renormalised over {0, 1} only.
    new_logits = torch.tensor([[[0.5, 1.5, 3.0, 0.0], [0.0] * 4, [0.0] * 4]])
    logp, entropy = obj._logp(new_logits, ids, allowed)
    z = math.log(math.exp(0.5) + math.exp(1.5))
    assert float(logp[0, 0]) == pytest.approx(1.5 - z, rel=1e-6)
    p0, p1 = math.exp(0.5 - z), math.exp(1.5 - z)
    assert float(entropy[0, 0]) == pytest.approx(-(p0 * math.log(p0) + p1 * math.log(p1)), rel=1e-6)
    assert float(logp[0, 1]) == pytest.approx(math.log(0.25), rel=1e-6)
    # A sampled token outside the recomputed set (rounding at the boundary) is added back.
    assert obj.sampling_mask(old_logits, torch.tensor([[3, 3, 0]]))[0, 0].tolist() == [True, True, False, True]


def _moe(tok):
    torch.manual_seed(0)
    cfg = DeepseekConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                         num_hidden_layers=3, num_attention_heads=4, q_lora_rank=None, kv_lora_rank=12,
                         qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8, n_group=1,
                         topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=64,
                         num_nextn_predict_layers=0, eos_token_id=tok.eos_token_id)
    model = build_model(cfg)
    init_weights(model, 0.02)
    return model


def _chosen(model, ids):
    """The experts each router picked in one forward: [b, L, n_layers, k]."""
    seen = []
    hooks = [r.register_forward_hook(lambda m, a, out: seen.append(out[1])) for r in routers(model)]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    return torch.stack([s.view(ids.shape[0], ids.shape[1], -1) for s in seen], dim=2)


def test_keep_routing_replays_the_rollouts_experts_after_the_router_changed():
    tok = make_tokenizer(None)
    policy = _moe(tok)
    cfg = GRPOConfig(group_size=2, prompts_per_step=2, max_new_tokens=5, template="plain", open_think=False,
                     keep_routing=True)
    src = Rollouts(policy, tok, DigitTask(), cfg, micro_batches=1)
    batch = src.next_batch()
    routing = batch.routing
    assert routing is not None and routing.shape[:2] == batch.ids.shape and routing.shape[2:] == (2, 2)
    # Every prompt position and every completion token fed back is recorded, for all four rows: the group's
    # second row got its prompt from a prefill-once copy, and carries the record along.
    recorded = (routing[..., 0, 0] >= 0)
    lengths = (batch.mask.sum(1) + (batch.mask.argmax(1) + 1)).long()   # prompt + completion tokens per row
    for b in range(batch.ids.shape[0]):
        assert recorded[b].sum() >= lengths[b] - 1
    # With the rollout's weights, a plain forward already picks the recorded experts (sanity of the record).
    free = _chosen(policy, batch.ids)
    at = recorded[..., None, None].expand_as(free)
    assert torch.equal(free[at], routing[at])
    # The router changes (as training would move it): the free forward now picks other experts ...
    with torch.no_grad():
        for r in routers(policy):
            r.weight.copy_(torch.randn_like(r.weight))
    moved = _chosen(policy, batch.ids)
    assert not torch.equal(moved[at], routing[at])
    # ... and the replayed forward picks the rollout's, at every recorded position; unrecorded ones are free.
    with replay_routing(policy, routing):
        replayed = _chosen(policy, batch.ids)
    assert torch.equal(replayed[at], routing[at])
    assert torch.equal(replayed[~at], moved[~at])
    assert all(r.forced is None for r in routers(policy))   # cleared after the block
    # And the GRPO loss runs through it, with gradient reaching the router (weights from current scores).
    policy.train()
    loss, _ = GRPOObjective(cfg).loss(LMForward(policy), batch)
    loss.backward()
    assert all(r.weight.grad is not None for r in routers(policy))


def test_keep_routing_needs_a_moe_policy():
    from test_grpo import _policy

    from nanoseek.errors import BadInputError

    tok = make_tokenizer(None)
    with pytest.raises(BadInputError, match="keep_routing"):
        Rollouts(_policy(tok), tok, DigitTask(), GRPOConfig(keep_routing=True, template="plain"), micro_batches=1)


def test_offpolicy_masking_takes_pi_old_from_the_sampler_where_recorded():
    # One inner update: the trainer's old_logp equals logp, so only the sampler's log-probs can show a gap.
    logp = _t(LOGP)
    mask = _t(MASK)
    adv = _t([-1.0, -1.0])
    behaviour = torch.full((2, 3), float("nan"))
    behaviour[1, :2] = torch.tensor([-0.3 + 0.5, -1.2 + 0.5])   # the sampler saw seq 1 0.5 nats likelier
    _, m = grpo_loss(logp, logp.clone(), adv, mask, aggregation="grpo", offpolicy_threshold=0.3,
                     behaviour_logp=behaviour)
    assert m["offpolicy_masked"] == pytest.approx(0.5)          # seq 1 only: mean gap 0.5 > 0.3
    _, m = grpo_loss(logp, logp.clone(), adv, mask, aggregation="grpo", offpolicy_threshold=0.3)
    assert m["offpolicy_masked"] == 0.0


def test_rollouts_record_the_samplers_logprobs_for_offpolicy_masking():
    """At temperature 1 the engine's log-probs of the sampled tokens are recorded at their positions; they
    match the training forward's on the same weights (the train–inference gap is rounding only here)."""
    from test_grpo import _policy

    tok = make_tokenizer(None)
    policy = _policy(tok)
    cfg = GRPOConfig(group_size=2, prompts_per_step=2, max_new_tokens=5, template="plain", open_think=False,
                     offpolicy_threshold=0.1)
    batch = Rollouts(policy, tok, DigitTask(), cfg, micro_batches=1).next_batch()
    beh = batch.behaviour_logp
    assert beh is not None and beh.shape == batch.mask.shape
    recorded = ~torch.isnan(beh)
    assert bool((batch.mask.bool() | ~recorded).all())            # only on completion positions
    assert int(recorded.sum()) >= int(batch.mask.sum()) - batch.ids.shape[0]   # all but each ending token
    with torch.no_grad():
        logp = GRPOObjective(cfg)._logp(policy(batch.ids), batch.ids)[0]
    assert torch.allclose(beh[recorded], logp[recorded], atol=1e-4)
    assert GRPOConfig(offpolicy_threshold=0.1, top_p=0.9).records_behaviour is False
