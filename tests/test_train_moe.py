"""Training-side DeepSeek-V3 pieces: aux-loss-free bias balancing in the loop, the MTP loss against a direct
computation, grouped-GEMM experts against the per-expert loop (forward and gradients), and Muon."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nanoseek.models import build_model
from nanoseek.models.config import DeepseekConfig
from nanoseek.models.moe import Experts, Router
from nanoseek.train.config import OptimConfig, load_config
from nanoseek.train.loop import LMForward, read_jsonl
from nanoseek.train.optim import build_optimizers
from nanoseek.train.pretrain import LanguageModeling, init_weights, pretrain
from train_data import TINY, prepare_shakespeare, small_run


@pytest.fixture(scope="module")
def data(train_text, tmp_path_factory):
    return prepare_shakespeare(tmp_path_factory.mktemp("corpus"), train_text)


def _tiny(**kw) -> DeepseekConfig:
    base = dict(vocab_size=61, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
                num_attention_heads=2, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                v_head_dim=8, n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2,
                first_k_dense_replace=1, num_nextn_predict_layers=1)
    return DeepseekConfig(**{**base, **kw})


def test_bias_update_lowers_load_imbalance(data, tmp_path):
    """Same data, seed and steps; only γ differs. γ = 0.01 rather than V3's 0.001 because this run has 30
    steps, not hundreds of thousands: the bias must move far enough to matter within the test."""
    imbalance = {}
    for gamma in (0.0, 0.01):
        out = tmp_path / f"g{gamma}"
        pretrain(load_config(TINY, small_run(data, out, 30, "data.batch_size=8", "data.seq_len=64",
                                             f"model.bias_update_speed={gamma}", "train.eval_every=0")))
        loads = np.array([r["load_max_mean"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"])
        assert loads.shape == (30, 4)
        imbalance[gamma] = loads[-5:].mean()  # the last steps, all MoE layers
    # Measured on tinyshakespeare ~2.2 without the bias, ~1.4 with it; on the synthetic corpus 1.55 vs 1.33
    # (1.0 is perfectly even). Both clear a 10% drop.
    assert imbalance[0.01] < 0.9 * imbalance[0.0], imbalance


def _hand_balance_loss(moe) -> torch.Tensor:
    """V3 eq. 17–20 from one MoE's last routing, written out: per sequence Σ_i f_i·P_i, f_i = E/(K·T)·(times
    expert i was chosen), P_i = the mean over tokens of its scores normalized over experts; mean over sequences."""
    scores, idx, k = moe.last_scores, moe.last_idx, moe.gate.top_k
    b, t, e = scores.shape
    chosen = torch.nn.functional.one_hot(idx, e).sum((1, 2)).float()   # [B, E]
    f = chosen * e / (k * t)
    p = (scores / scores.sum(-1, keepdim=True)).mean(1)
    return (f * p).sum(-1).mean()


def test_trainer_adds_alpha_times_the_balance_loss(tmp_path):
    """One step from the same weights on the same batch with α = 0 and α = 0.5: the logged loss and every
    router's gradient must differ by exactly α·Σ_layers L_bal and its gradient (main stack and MTP MoEs)."""
    from nanoseek.train.config import RunConfig, TrainConfig
    from nanoseek.train.loop import Trainer
    from nanoseek.train.sft import SFTBatches

    torch.manual_seed(0)
    stream = torch.randint(0, 61, (3, 17))
    x, y = stream[:, :-1], stream[:, 1:]
    alpha = 0.5

    def fresh(a: float):
        torch.manual_seed(1)
        model = build_model(_tiny(seq_aux_alpha=a))
        init_weights(model, 0.2)
        return model

    def step(a: float):
        model = fresh(a)
        grads = {}
        for i, moe in enumerate(model.moe_layers()):   # the gradient as backward computes it, before the step
            moe.gate.weight.register_hook(lambda g, i=i: grads.__setitem__(i, g.clone()))
        cfg = TrainConfig(optim=OptimConfig(lr=1e-3, schedule="constant", warmup_steps=0, weight_decay=0.0),
                          train=RunConfig(steps=1, device="cpu", out_dir=str(tmp_path / f"alpha{a}"), eval_every=0,
                                          ckpt_every=0, plots=False, log_every=1000))
        rec = Trainer(cfg, model, LanguageModeling(mtp_weight=0.3), SFTBatches(x, y, batch_size=3)).train_step()
        return rec, grads

    (off, g_off), (on, g_on) = step(0.0), step(alpha)
    # By hand: the same forward, then α·Σ L_bal from each MoE's routing and its gradient.
    model = fresh(alpha).train()
    LanguageModeling(mtp_weight=0.3).loss(LMForward(model), (x, y))
    moes = model.moe_layers()
    assert len(moes) == 2 and all(m.last_scores is not None for m in moes)   # layer 1 and the MTP module
    bal = sum(_hand_balance_loss(m) for m in moes)
    want = torch.autograd.grad(alpha * bal, [m.gate.weight for m in moes])
    assert "balance" not in off and on["balance"] == pytest.approx(float(bal.detach()), rel=1e-5)
    assert on["loss"] - off["loss"] == pytest.approx(alpha * float(bal.detach()), rel=1e-4)
    assert set(g_on) == set(g_off) == {0, 1}
    for i, w in enumerate(want):
        assert w.abs().max() > 1e-4
        assert torch.allclose(g_on[i] - g_off[i], w, atol=1e-6, rtol=1e-4), i


def test_mtp_loss_is_the_shifted_cross_entropy():
    torch.manual_seed(0)
    cfg = _tiny()
    model = build_model(cfg)
    init_weights(model, 0.1)
    stream = torch.randint(0, cfg.vocab_size, (3, 14))
    x, y = stream[:, :-1], stream[:, 1:]  # what the packed loader yields
    obj = LanguageModeling(mtp_weight=0.3)
    loss, metrics = obj.loss(LMForward(model), (x, y))
    # Direct: the MTP module at position t sees h_t and the embedding of token t+1 and predicts token t+2.
    h = model.hidden(x)
    mod = model.mtp[0]
    z = mod.eh_proj(torch.cat([mod.enorm(model.model.embed_tokens(x[:, 1:])), mod.hnorm(h[:, :-1])], -1))
    at = model.model.rotary.positions(torch.arange(z.shape[1]).expand(3, -1), torch.float32, cached=False)
    z = z + mod.self_attn(mod.input_layernorm(z), at)
    z = z + mod.mlp(mod.post_attention_layernorm(z))
    logp = model.lm_head(mod.shared_head.norm(z)).log_softmax(-1)
    T = x.shape[1]
    want = -torch.stack([logp[b, t, stream[b, t + 2]] for b in range(3) for t in range(T - 1)]).mean()
    assert torch.allclose(metrics["mtp"], want, atol=1e-6)
    ce = -model.lm_head(h).log_softmax(-1).gather(-1, y[..., None]).mean()
    assert torch.allclose(metrics["ce"], ce, atol=1e-6)
    assert torch.allclose(loss, ce + 0.3 * want, atol=1e-6)


def test_grouped_gemm_experts_equal_the_loop_forward_and_gradients():
    torch.manual_seed(0)
    cfg = _tiny()
    ex, router = Experts(cfg), Router(cfg)
    router.e_score_correction_bias.normal_(std=0.05)
    router.e_score_correction_bias[3] = -10.0  # expert 3 gets no tokens: empty groups must work too
    x = torch.randn(53, cfg.hidden_size)
    weights, idx, _ = router(x)
    assert not (idx == 3).any()
    gout = torch.randn(53, cfg.hidden_size)
    results = []
    for grouped in (True, False):
        ex.use_grouped_mm = grouped
        xi, wi = x.clone().requires_grad_(), weights.detach().clone().requires_grad_()
        ex.zero_grad(set_to_none=True)
        out = ex(xi, idx, wi)
        out.backward(gout)
        results.append((out.detach(), xi.grad, wi.grad, ex.gate_up_proj.grad.clone(), ex.down_proj.grad.clone()))
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch build has no torch._grouped_mm: only the loop runs")
    for name, a, b in zip(("out", "d x", "d weights", "d gate_up", "d down"), *results):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), name
        assert a.abs().sum() > 0, name


def test_muon_takes_block_matrices_and_adamw_the_rest(data, tmp_path):
    model = build_model(_tiny())
    opts = build_optimizers(model, OptimConfig(name="muon"), torch.device("cpu"))
    muon, adamw = opts
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    assert "model.layers.0.self_attn.kv_b_proj.weight" in in_muon and "mtp.0.eh_proj.weight" in in_muon
    assert "model.layers.1.mlp.shared_experts.down_proj.weight" in in_muon
    assert not any("embed" in n or "lm_head" in n or ".mlp.experts." in n or n.endswith("mlp.gate.weight")
                   for n in in_muon)
    everything = in_muon | {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert everything == set(names.values())
    last = pretrain(load_config(TINY, small_run(data, tmp_path, 12, "optim.name=\"muon\"", "train.eval_every=0")))
    first = read_jsonl(tmp_path / "metrics.jsonl")[0]
    assert last["train"]["ce"] < first["ce"] - 0.5
