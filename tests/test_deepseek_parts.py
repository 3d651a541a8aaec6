"""DeepSeek-V3 pieces checked against direct computations: MLA paths, grouped experts, router, MTP, balancing."""

import pytest
import torch
import torch.nn.functional as F

from nanoseek.models import build_model
from nanoseek.models.config import DeepseekConfig, RopeConfig
from nanoseek.models.mla import MLA
from nanoseek.models.moe import Experts, Router, load_imbalance, sequence_balance_loss, update_router_bias


def tiny(**kw) -> DeepseekConfig:
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
                num_attention_heads=4, q_lora_rank=16, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4,
                v_head_dim=8, n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2,
                first_k_dense_replace=1, max_position_embeddings=128)
    base.update(kw)
    return DeepseekConfig(**base)


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    m = build_model(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(std=0.2)
        for moe in m.moe_layers():
            moe.gate.e_score_correction_bias.normal_(std=0.1)
    return m.eval()


@torch.no_grad()
def test_mla_naive_and_absorbed_agree_with_cache():
    cfg = tiny(rope=RopeConfig(rope_type="yarn", factor=4.0, original_max_position_embeddings=16,
                               mscale=1.0, mscale_all_dim=1.0))
    m = _model(cfg)
    ids = torch.randint(0, 64, (2, 20))
    outs = {}
    for mode in ("naive", "absorb"):
        for layer in m.model.layers:
            layer.self_attn.mode = mode
        cache = m.new_cache(2, 32)
        steps = [m(ids[:, :6], torch.arange(6).expand(2, -1), cache)]
        steps += [m(ids[:, t:t + 1], torch.full((2, 1), t), cache) for t in range(6, 20)]
        outs[mode] = torch.cat(steps, dim=1)
    assert (outs["naive"] - outs["absorb"]).abs().max() < 1e-4
    assert torch.allclose(outs["naive"], m(ids), atol=1e-4)


@torch.no_grad()
def test_auto_mode_absorbs_at_decode_and_expands_otherwise(monkeypatch):
    """The default `auto` mode: the absorbed path for short chunks against the cache (decode), where the small
    latent cache pays off; the naive path for prefill chunks and for training (no cache)."""
    taken = []
    for path in ("_naive", "_absorbed"):
        def spy(self, *args, _path=path, _real=getattr(MLA, path)):
            taken.append(_path)
            return _real(self, *args)
        monkeypatch.setattr(MLA, path, spy)
    m = _model(tiny())
    assert {layer.self_attn.mode for layer in m.model.layers} == {"auto"}
    ids, cache = torch.randint(0, 64, (2, 24)), m.new_cache(2, 32)

    def paths(ids, start=None):
        taken.clear()
        if start is None:
            m(ids)
        else:
            m(ids, torch.arange(start, start + ids.shape[1]).expand(2, -1), cache)
        return taken[:]

    layers = len(m.model.layers)
    assert paths(ids[:, :16], start=0) == ["_naive"] * layers          # prefill of 16
    assert paths(ids[:, 16:17], start=16) == ["_absorbed"] * layers    # one decode step
    assert paths(ids[:, 17:24], start=17) == ["_absorbed"] * layers    # a short chunk (e.g. MTP drafts)
    assert paths(ids) == ["_naive"] * layers                           # training: no cache
    assert paths(ids[:, :4]) == ["_naive"] * layers                    # even a short sequence


@torch.no_grad()
def test_latent_cache_holds_kv_lora_plus_rope_per_token():
    cfg = tiny()
    cache = _model(cfg).new_cache(1, 10)
    assert cache.layers[0].kv.shape == (1, 10, cfg.kv_lora_rank + cfg.qk_rope_head_dim)


def test_grouped_experts_equal_loop_forward_and_backward():
    cfg = tiny()
    torch.manual_seed(0)
    ex = Experts(cfg)
    x0 = torch.randn(37, cfg.hidden_size)
    idx = torch.randint(0, 8, (37, 2))
    idx[:, 1] = (idx[:, 0] + 1 + torch.randint(0, 7, (37,))) % 8  # distinct experts per token
    idx[idx == 5] = 4  # leave expert 5 empty: empty groups must work
    w0 = torch.rand(37, 2)
    gout = torch.randn(37, cfg.hidden_size)   # one upstream gradient for every path

    def run(path):
        """Output and gradients (inputs, gating weights, both expert weights) of one path."""
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        ex.zero_grad(set_to_none=True)
        if path == "direct":   # per token, per chosen expert: the definition
            out = torch.stack([sum(w[n, j] * F.linear(F.silu(g) * u, ex.down_proj[idx[n, j]])
                                   for j in range(2)
                                   for g, u in [F.linear(x[n], ex.gate_up_proj[idx[n, j]]).chunk(2)])
                               for n in range(37)])
        else:
            ex.use_grouped_mm = path == "grouped"
            assert ex._grouped(x) is (path == "grouped")   # the path under test is the one that runs
            out = ex(x, idx, w)
        out.backward(gout)
        return {"out": out.detach(), "d x": x.grad, "d weights": w.grad, "d gate_up": ex.gate_up_proj.grad.clone(),
                "d down": ex.down_proj.grad.clone()}

    direct = run("direct")
    assert direct["d gate_up"][5].abs().sum() == 0 and direct["d gate_up"][4].abs().sum() > 0
    paths = ["loop", "grouped"] if hasattr(torch, "_grouped_mm") else ["loop"]
    for path in paths:
        got = run(path)
        for name, want in direct.items():
            assert torch.allclose(got[name], want, atol=1e-5, rtol=1e-4), (path, name)
    if paths == ["loop"]:
        pytest.skip("this torch build has no torch._grouped_mm: only the loop was checked")


def test_router_bias_selects_but_does_not_weight():
    cfg = tiny(n_group=1, topk_group=1)
    torch.manual_seed(0)
    r = Router(cfg)
    x = torch.randn(5, cfg.hidden_size)
    r.e_score_correction_bias[3] = 100.0  # forces expert 3 into every selection
    w, idx, scores = r(x)
    assert (idx == 3).any(dim=1).all()
    chosen = scores.gather(1, idx)
    assert torch.allclose(w, chosen / chosen.sum(1, keepdim=True) * cfg.routed_scaling_factor)


def test_group_limited_selection_stays_in_kept_groups():
    cfg = tiny(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3)
    torch.manual_seed(1)
    r = Router(cfg)
    _, idx, scores = r(torch.randn(50, cfg.hidden_size))
    groups = idx // 2
    assert all(len(set(row.tolist())) <= 2 for row in groups)


def test_bias_update_rule():
    bias = torch.zeros(4)
    update_router_bias(bias, torch.tensor([10, 0, 5, 5]), gamma=0.01)
    assert torch.allclose(bias, torch.tensor([-0.01, 0.01, 0.0, 0.0]))
    assert load_imbalance(torch.tensor([10, 0, 5, 5])) == 2.0


def test_sequence_balance_loss_matches_formula():
    torch.manual_seed(0)
    b, t, e, k = 2, 5, 4, 2
    scores = torch.rand(b, t, e)
    idx = torch.stack([torch.randperm(e)[:k] for _ in range(b * t)]).view(b, t, k)
    loss = sequence_balance_loss(scores, idx, k)
    want = 0.0
    for s in range(b):
        for i in range(e):
            f = e / (k * t) * (idx[s] == i).sum().item()
            p = (scores[s, :, i] / scores[s].sum(-1)).mean().item()
            want += f * p
    assert abs(loss.item() - want / b) < 1e-5


@torch.no_grad()
def test_mtp_logits_equal_direct_computation():
    cfg = tiny(num_nextn_predict_layers=1)
    m = _model(cfg)
    ids = torch.randint(0, 64, (2, 9))
    h = m.hidden(ids)
    (logits,) = m.mtp_logits(ids, h)
    mod = m.mtp[0]
    # position t combines h_t with the embedding of token t+1 (embedding first) and predicts token t+2
    x = mod.eh_proj(torch.cat([mod.enorm(m.model.embed_tokens(ids[:, 1:])), mod.hnorm(h[:, :-1])], -1))
    pos = torch.arange(8).expand(2, -1)
    x = x + mod.self_attn(mod.input_layernorm(x), m.model.rotary.positions(pos, torch.float32, cached=False))
    x = x + mod.mlp(mod.post_attention_layernorm(x))
    want = m.lm_head(mod.shared_head.norm(x))
    assert logits.shape == (2, 8, 64)
    assert torch.allclose(logits, want, atol=1e-5)
