"""DeepSeek-V3.2 (DSA, models/dsa.py) against transformers' DeepseekV32ForCausalLM, through our cache and
engine, in and out of HF files, and the indexer's training loss by hand."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from nanoseek.errors import BadInputError, UnsupportedError
from nanoseek.models.config import DeepseekV32Config, config_from_hf
from nanoseek.weights.hf import load_hf

TOL = 1e-4
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
    ref = hf_v32(path)
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
    cache = ours.new_cache(1, 64)
    prefix = 5
    got = [ours(ids[:, :prefix], torch.arange(prefix)[None], cache)[0]]
    for t in range(prefix, ids.shape[1]):
        got.append(ours(ids[:, t:t + 1], torch.tensor([[t]]), cache)[0])
    assert (torch.cat(got) - want).abs().max().item() < TOL


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
            w = state[name]  # e.g. indexer.wq_b [256, 32]: two row blocks
            rb, cb = -(-w.shape[0] // 128), -(-w.shape[1] // 128)
            amax = torch.stack([blk.abs().max() for row in w.split(128) for blk in row.split(128, 1)])
            scale = (amax / 448.0).view(rb, cb)
            full = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:w.shape[0], :w.shape[1]]
            state[name] = (w / full).to(torch.float8_e4m3fn)
            state[name + "_scale_inv"] = scale
            dequant[name] = state[name].float() * full
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
