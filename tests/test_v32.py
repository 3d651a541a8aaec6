"""DeepSeek-V3.2 (DSA, models/dsa.py) against transformers' DeepseekV32ForCausalLM, through our cache and
engine, in and out of HF files, and the indexer's training loss by hand."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from fp8_blocks import fp8_blocks
from test_models_vs_transformers import decode_token_by_token
from train_data import FixedBatches

from nanoseek.errors import BadInputError, UnsupportedError
from nanoseek.models.config import DeepseekV32Config, config_from_hf
from nanoseek.weights.hf import load_hf

TOL = 1e-4
REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
TOPK = 6  # far below the test lengths, so top-k selection drops most keys


def hf_v32(path, *, mtp: int = 0):
    """A tiny random DeepseekV32ForCausalLM saved with save_pretrained. 16 index heads: with 1-2 the ReLU sum
    is exactly 0 for many keys and top-k breaks the ties differently by tensor length."""
    torch.manual_seed(7)
    cfg = transformers.DeepseekV32Config(
        vocab_size=113, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_group=4, topk_group=2,
        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=256,
        index_n_heads=16, index_head_dim=16, index_topk=TOPK, num_nextn_predict_layers=mtp)
    model = transformers.DeepseekV32ForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None:  # zero by default: exercise the selection-only bias
                gate.e_score_correction_bias.normal_(std=0.05)
                gate.weight.normal_(std=0.3)
            idx = layer.self_attn.indexer  # LayerNorm starts as (1, 0): make both matter
            idx.k_norm.weight.normal_(1.0, 0.3)
            idx.k_norm.bias.normal_(std=0.3)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("v32")
    hf_v32(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    ours, cfg = load_hf(path)
    assert isinstance(cfg, DeepseekV32Config) and cfg.index_topk == TOPK
    return ref.eval(), ours, path


def _ids(vocab, b=2, t=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (b, t), generator=g)


def _record_margins(model):
    """Wrap every indexer's `scores` to record the gap between each query's k-th and (k+1)-th best visible
    score: a tie there would make the selection (and the comparison) ill-defined."""
    gaps = []
    for layer in model.model.layers:
        ix = layer.self_attn.indexer
        inner = ix.scores

        def scores(*a, _inner=inner, **kw):
            s = _inner(*a, **kw)
            if s.shape[-1] > TOPK:
                top = s.topk(TOPK + 1, dim=-1).values
                live = top[..., TOPK] > float("-inf")
                # relative to the score's size: fp32 rounding differs by ~1e-7 of it between implementations
                gaps.append(((top[..., TOPK - 1] - top[..., TOPK]) / top[..., TOPK - 1].abs())[live])
            return s
        ix.scores = scores
    return gaps


@torch.no_grad()
def test_prefill_logits_match(pair):
    ref, ours, _ = pair
    gaps = _record_margins(ours)
    ids = _ids(ours.config.vocab_size)
    got, want = ours(ids), ref(ids).logits
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < TOL
    assert gaps and min(g.min().item() for g in gaps) > 1e-5  # selection happened, and without near-ties


@torch.no_grad()
def test_cached_decode_matches_full_sequence(pair):
    """Token by token through our cache (the gathered top-k path) equals transformers' full-sequence logits."""
    ref, ours, _ = pair
    ids = _ids(ours.config.vocab_size, b=1, t=24, seed=3)
    want = ref(ids).logits[0]
    assert (decode_token_by_token(ours, ids) - want).abs().max().item() < TOL


@torch.no_grad()
def test_chunked_prefill_and_ragged_batch_decode(pair):
    """A prefill in chunks through the cache, and one decode step for two rows at different lengths (one
    still under index_topk keys), equal the full forward."""
    _, ours, _ = pair
    a, b = _ids(ours.config.vocab_size, b=1, t=30, seed=4), _ids(ours.config.vocab_size, b=1, t=5, seed=5)
    cache = ours.new_cache(2, 48)
    ours(a[:, :12], torch.arange(12)[None], cache.rows(0))
    ours(a[:, 12:-1], torch.arange(12, 29)[None], cache.rows(0))
    ours(b[:, :-1], torch.arange(4)[None], cache.rows(1))
    step = ours(torch.cat([a[:, -1:], b[:, -1:]]), torch.tensor([[29], [4]]), cache)
    assert torch.allclose(step[0, 0], ours(a)[0, -1], atol=TOL)
    assert torch.allclose(step[1, 0], ours(b)[0, -1], atol=TOL)


def _hf_config(**changes):
    d = json.loads(transformers.DeepseekV32Config(num_hidden_layers=4, first_k_dense_replace=1).to_json_string())
    d.update(changes)
    return {k: v for k, v in d.items() if v is not ...}


def test_config_maps_and_refuses_what_we_do_not_implement():
    cfg = config_from_hf(_hf_config(mlp_layer_types=["dense", "dense", "sparse", "sparse"]))
    assert isinstance(cfg, DeepseekV32Config) and cfg.first_k_dense_replace == 2 and cfg.index_n_heads == 64
    missing = _hf_config()
    del missing["q_lora_rank"]
    bad = [(BadInputError, "q_lora_rank", missing), (BadInputError, "q_lora_rank", _hf_config(q_lora_rank=None)),
           (UnsupportedError, "layer_types", _hf_config(layer_types=["indexed_attention", "sliding_attention"] * 2)),
           (UnsupportedError, "mlp_layer_types", _hf_config(mlp_layer_types=["sparse", "dense", "sparse", "sparse"])),
           (UnsupportedError, "hidden_act", _hf_config(hidden_act="gelu")),
           (UnsupportedError, "attention_bias", _hf_config(attention_bias=True)),
           (BadInputError, "index_head_dim", _hf_config(index_head_dim=32, qk_rope_head_dim=64))]
    with pytest.raises(BadInputError, match="rope_interleave"):
        DeepseekV32Config(rope_interleave=False)
    for kind, key, d in bad:
        with pytest.raises(kind, match=key) as e:
            config_from_hf(d)
        assert "\n" not in str(e.value)


# --- engine: batched rows, row operations and the prefix cache with the index-key cache ----------------------

def _tiny_v32(topk=8):
    from nanoseek.models import build_model

    torch.manual_seed(0)
    cfg = DeepseekV32Config(vocab_size=50, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            num_hidden_layers=2, num_attention_heads=4, q_lora_rank=16, kv_lora_rank=12,
                            qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4, n_group=1,
                            topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
                            max_position_embeddings=128, eos_token_id=None, index_n_heads=16, index_head_dim=8,
                            index_topk=topk)
    m = build_model(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(std=0.3)
    return m.eval()


PROMPTS = [list(range(1, 20)), [9, 8], [4] * 13, list(range(30, 45))]  # decode runs past index_topk=8


def test_engine_batch_equals_each_alone_greedy():
    from nanoseek.engine.generate import Engine
    from nanoseek.engine.sampling import SamplingParams

    eng = Engine(_tiny_v32())
    # different lengths: rows finish at different steps, so the batch cache is compacted (select) mid-run
    ps = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (14, 5, 9, 14)]
    together = eng.generate(PROMPTS, ps)
    for prompt, p, c in zip(PROMPTS, ps, together):
        assert c.token_ids == eng.generate([prompt], p)[0].token_ids


def test_scheduler_with_prefix_cache_equals_each_alone():
    """Concurrent requests (rows admitted, swapped, compacted and resized while others decode) and prompts
    served partly from the prefix cache generate what each does alone."""
    from nanoseek.engine.generate import Engine
    from nanoseek.engine.sampling import SamplingParams
    from nanoseek.engine.scheduler import Scheduler

    model = _tiny_v32()
    greedy = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
    system = list(range(5, 29))
    prompts = PROMPTS + [system + [1, 2, 3], system + [9, 8, 7, 6]]
    sched = Scheduler(model, max_batch=3, prefill_chunk=16, block_size=8)
    first = sched.submit(prompts[-2], greedy)
    while not first.done:
        sched.step()
    handles = [sched.submit(p, greedy) for p in prompts]
    while not all(h.done for h in handles):
        sched.step()
    eng = Engine(model)
    for p, h in zip(prompts, handles):
        assert h.result().token_ids == eng.generate([p], greedy)[0].token_ids
    assert handles[-1].result().cached_tokens == 24 and sched.stats()["prefix_hit_tokens"] >= 48


def test_index_key_cache_rows_move_with_the_latent():
    """Every row operation the engine uses moves the index keys with their latent rows."""
    cache = _tiny_v32().new_cache(3, 16)
    for layer in cache.layers:
        assert type(layer).__name__ == "IndexedLatentLayer" and layer.rewindable
        layer.kv.normal_()
        layer.index_k.normal_()
    before = [(lay.kv.clone(), lay.index_k.clone()) for lay in cache.layers]
    picked = cache.select(torch.tensor([2, 0]))
    grown = cache.resized(32)
    cache.swap_rows(0, 1, 16, 16)
    cache.copy_row(2, 0, 10)
    for lay, (kv, ik), p, g in zip(cache.layers, before, picked.layers, grown.layers):
        assert torch.equal(p.index_k, ik[[2, 0]]) and torch.equal(p.kv, kv[[2, 0]])
        assert torch.equal(g.index_k[:, :16], ik) and g.index_k.shape[1] == 32
        assert torch.equal(lay.index_k[1], ik[0]) and torch.equal(lay.index_k[0, :10], ik[2, :10])
        assert torch.equal(lay.index_k[0, 10:], ik[1, 10:])
    assert cache.nbytes() == 3 * 16 * 2 * (12 + 4 + 8) * 4


# --- HF files: export (sharded) reloads in transformers; FP8 block-scaled weights; MTP ------------------------

@torch.no_grad()
def test_export_sharded_reloads_in_transformers_with_the_same_logits(pair, tmp_path):
    from nanoseek.weights.hf import save_hf

    _, ours, _ = pair
    out = save_hf(ours, tmp_path / "export", max_shard_bytes=100_000)
    assert (out / "model.safetensors.index.json").exists()
    assert json.loads((out / "config.json").read_text())["model_type"] == "deepseek_v32"
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    assert type(back).__name__ == "DeepseekV32ForCausalLM"
    ids = _ids(ours.config.vocab_size, t=32, seed=11)
    assert (back.eval()(ids).logits - ours(ids)).abs().max().item() < TOL


@torch.no_grad()
def test_mtp_weights_load_as_v3s(tmp_path):
    """V3.2's MTP layer (model.layers.{N}) is V3's MTP block whose attention carries an indexer: our MTPModule
    (a DeepseekBlock) builds DSA for a V3.2 config, so the V3 renaming loads it."""
    from dataclasses import replace

    from nanoseek.models import build_model
    from nanoseek.weights.hf import save_hf

    src = build_model(replace(_tiny_v32().config, num_nextn_predict_layers=1))
    with torch.no_grad():
        for p in src.parameters():
            p.normal_(std=0.3)
    out = save_hf(src, tmp_path / "mtp")
    names = json.loads((out / "config.json").read_text())
    assert names["num_nextn_predict_layers"] == 1
    back, cfg = load_hf(out)
    assert cfg.num_nextn_predict_layers == 1
    assert torch.equal(back.mtp[0].self_attn.indexer.wq_b.weight, src.mtp[0].self_attn.indexer.wq_b.weight)
    ids = _ids(50, b=1, t=20, seed=2)
    h = src.hidden(ids)
    assert torch.equal(back.mtp_logits(ids, back.hidden(ids))[0], src.mtp_logits(ids, h)[0])


@torch.no_grad()
def test_fp8_block_scaled_indexer_and_attention_weights(pair, tmp_path):
    """V3.2's released weights: float8_e4m3fn with one fp32 scale per 128x128 block, the indexer's wq_b and wk
    included; loading dequantizes them (the V3 path) to what the scales say."""
    import shutil

    from safetensors.torch import load_file, save_file

    _, _, src = pair
    state = load_file(str(src / "model.safetensors"))
    dequant = dict(state)
    for name in list(state):
        if ".self_attn." in name and state[name].dim() == 2 and "weights_proj" not in name:
            # e.g. indexer.wq_b [256, 32]: two row blocks
            state[name], state[name + "_scale_inv"], dequant[name] = fp8_blocks(state[name])
    assert "model.layers.0.self_attn.indexer.wq_b.weight_scale_inv" in state
    for d, st in (("fp8", state), ("dq", dequant)):
        (tmp_path / d).mkdir()
        save_file(st, str(tmp_path / d / "model.safetensors"))
        shutil.copy(src / "config.json", tmp_path / d / "config.json")
    fp8, _ = load_hf(tmp_path / "fp8")
    dq, _ = load_hf(tmp_path / "dq")
    ids = _ids(fp8.config.vocab_size, t=24, seed=6)
    assert torch.equal(fp8(ids), dq(ids))
    # bf16 serving keeps the index-head weights in fp32, as the reference does, and still runs
    bf, _ = load_hf(tmp_path / "dq", dtype=torch.bfloat16)
    ix = bf.model.layers[0].self_attn.indexer
    assert ix.weights_proj.weight.dtype == torch.float32 and ix.wq_b.weight.dtype == torch.bfloat16
    assert (bf(ids).float() - dq(ids)).abs().max().item() < 0.1


# --- training: the indexer's KL by hand, and the two stages through the shared loop --------------------------

def _hand_index_loss(attn, x, stage, topk):
    """The indexer loss of one SparseMLA (float64, batch 1) from its weights with explicit formulas."""
    import math

    T, H = x.shape[1], attn.n_heads
    x = x[0]
    pos = torch.arange(T, dtype=torch.float64)
    r = attn.rope
    ang = pos[:, None] / (10000.0 ** (torch.arange(0, r, 2, dtype=torch.float64) / r))  # [T, r/2]
    cos, sin = ang.cos(), ang.sin()

    def rms(v, g):
        return v / torch.sqrt((v * v).mean(-1, keepdim=True) + 1e-6) * g

    def rot_pairs(v):  # MLA: adjacent pairs (2i, 2i+1)
        a, b = v[..., 0::2], v[..., 1::2]
        c, s = (cos, sin) if v.dim() == 2 else (cos[:, None], sin[:, None])
        return torch.cat([a * c - b * s, b * c + a * s], -1)

    def rot_halves(v):  # the indexer: (i, i + r/2)
        a, b = v[..., :r // 2], v[..., r // 2:r]
        c, s = (cos, sin) if v.dim() == 2 else (cos[:, None], sin[:, None])
        return torch.cat([a * c - b * s, b * c + a * s, v[..., r:]], -1)

    q_lat = rms(x @ attn.q_a_proj.weight.T, attn.q_a_layernorm.weight)
    q = (q_lat @ attn.q_b_proj.weight.T).view(T, H, -1)
    q_nope, q_pe = q[..., :attn.nope], rot_pairs(q[..., attn.nope:])
    ckv = x @ attn.kv_a_proj_with_mqa.weight.T
    lat, k_pe = rms(ckv[:, :attn.kv_lora], attn.kv_a_layernorm.weight), rot_pairs(ckv[:, attn.kv_lora:])
    k_nope = (lat @ attn.kv_b_proj.weight.T).view(T, H, -1)[..., :attn.nope]
    ix = attn.indexer
    qi = rot_halves((q_lat @ ix.wq_b.weight.T).view(T, ix.n_heads, -1))
    ki = x @ ix.wk.weight.T
    ki = (ki - ki.mean(-1, keepdim=True)) / torch.sqrt(ki.var(-1, unbiased=False, keepdim=True) + 1e-6)
    ki = rot_halves(ki * ix.k_norm.weight + ix.k_norm.bias)
    w = x @ ix.weights_proj.weight.T * ix.n_heads ** -0.5
    total = 0.0
    for t in range(T):
        score = [sum(w[t, j].item() * max(0.0, (qi[t, j] @ ki[s]).item() * ix.head_dim ** -0.5)
                     for j in range(ix.n_heads)) for s in range(t + 1)]
        keep = list(range(t + 1)) if stage == "warmup" else sorted(range(t + 1), key=lambda s: -score[s])[:topk]
        p = [0.0] * (t + 1)
        for h in range(H):
            logit = {s: ((q_nope[t, h] @ k_nope[s, h]) + (q_pe[t, h] @ k_pe[s])).item() * attn.scale for s in keep}
            m = max(logit.values())
            z = sum(math.exp(v - m) for v in logit.values())
            for s in keep:
                p[s] += math.exp(logit[s] - m) / z
        norm = sum(p)
        m = max(score[s] for s in keep)
        log_z = m + math.log(sum(math.exp(score[s] - m) for s in keep))
        total += sum(p[s] / norm * (math.log(p[s] / norm) - (score[s] - log_z)) for s in keep if p[s] > 0)
    return total / T


@pytest.mark.parametrize("stage", ["warmup", "sparse"])
def test_indexer_loss_equals_a_hand_computation(stage):
    """KL(attention summed over heads, L1-normalised ‖ softmax(index scores)), mean over queries; over every
    visible key in the warm-up, over the top-k in the sparse stage. Its gradient reaches the indexer only, and
    the LM output's gradient never does."""
    from nanoseek.models.layers import Rotary

    model = _tiny_v32(topk=5).double().train()
    attn = model.model.layers[0].self_attn
    attn.stage = stage
    x = torch.randn(1, 12, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    at = Rotary(model.config.rope, 4, 64, interleaved=True).positions(torch.arange(12)[None], torch.float64,
                                                                        cached=False)
    out = attn(x, at)
    loss = attn.last_index_loss
    # rel 1e-5: the rotary tables and the index scores are fp32 by design (the rest runs in float64 here)
    assert loss.item() == pytest.approx(_hand_index_loss(attn, x, stage, 5), rel=1e-5)
    loss.backward(retain_graph=True)
    grads = {n for n, p in attn.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads == {f"indexer.{n}" for n in ("wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias",
                                              "weights_proj.weight")}
    attn.zero_grad()
    out.sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in attn.indexer.parameters())


def test_tiny_v32_preset_warms_up_the_indexer_then_trains_sparse(tmp_path):
    """Through the shared Trainer: warm-up steps change only indexer weights (router biases hold still) and
    lower the KL; sparse steps train everything."""
    from nanoseek.models import build_model
    from nanoseek.train.config import load_config
    from nanoseek.train.loop import Trainer
    from nanoseek.train.pretrain import LanguageModeling, init_weights

    cfg = load_config(REPO / "configs" / "tiny-v32.toml",
                      [f"train.out_dir={tmp_path}", "train.indexer_warmup_steps=12", "optim.warmup_steps=1",
                       "data.seq_len=64", "data.batch_size=2", "optim.lr=1e-2"])
    torch.manual_seed(0)
    model = build_model(cfg.model_config(vocab_size=64, bos_id=0, eos_id=1))
    init_weights(model, cfg.train.init_std)
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, 64, (2, 65), generator=g)

    trainer = Trainer(cfg, model, LanguageModeling(cfg.model["mtp_loss_weight"]), FixedBatches(seq))
    start = {n: t.detach().clone() for n, t in model.state_dict().items()}
    recs = [trainer.train_step() for _ in range(12)]
    assert all("indexer_kl" in r and "lm_loss" in r for r in recs)
    assert recs[-1]["indexer_kl"] < 0.8 * recs[0]["indexer_kl"]
    moved = {n for n, t in model.state_dict().items() if not torch.equal(t, start[n])}
    assert moved and all(".indexer." in n for n in moved)
    assert any(n.startswith("mtp.") for n in moved)  # the MTP block's indexer learns too
    rec = trainer.train_step()
    assert "lm_loss" not in rec and rec["indexer_kl"] > 0
    moved = {n for n, t in model.state_dict().items() if not torch.equal(t, start[n])}
    assert "model.embed_tokens.weight" in moved and any(n.endswith("e_score_correction_bias") for n in moved)
