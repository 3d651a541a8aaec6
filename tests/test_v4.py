"""DeepSeek-V4 against transformers' DeepseekV4ForCausalLM (fp32, eager): logits of a prefill, of cached decode
token by token past the window, of odd prefill chunks and of batched rows; mHC's Sinkhorn matrices; hash
routing; DeepSeek-name load (sharded, FP8 block-scaled, FP4 refused) and our export; bad configs; batched
generation through Engine and Scheduler equal to each request alone; the prefix cache refused; int8 serving;
the tiny-v4 preset learning in the shared training loop.

The tiny config exercises every kind: layer 0 sliding only, CSA at rate 2 with an indexer keeping 3 of up to
20 entries (16 index heads, so no ties among the ReLU sums), HCA at rate 4, a window of 6, YaRN on the
compressed rotary, hash routing in layer 0. Sinks, compressor position biases, mHC biases, the hash table
and the selection bias are zero in transformers' init, so they are randomised here."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from fp8_blocks import fp8_blocks
from safetensors.torch import load_file, save_file

from nanoseek.engine.generate import Engine
from nanoseek.engine.sampling import SamplingParams
from nanoseek.engine.scheduler import Scheduler
from nanoseek.errors import BadInputError, UnsupportedError
from nanoseek.models.config import config_from_hf
from nanoseek.models.mhc import sinkhorn
from nanoseek.weights.hf import load_hf, save_hf

TOL = 1e-4
VOCAB = 97
TOPK = 3


def hf_v4(path, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.DeepseekV4Config(
        vocab_size=VOCAB, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=1, head_dim=32, q_lora_rank=32, num_experts_per_tok=2, n_routed_experts=8,
        n_shared_experts=1, hc_mult=2, sliding_window=6, o_groups=2, o_lora_rank=16,
        layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                     "compressed_sparse_attention"],
        compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 4},
        mlp_layer_types=["hash_moe", "moe", "moe", "moe"], index_n_heads=16, index_head_dim=16, index_topk=TOPK,
        max_position_embeddings=256, partial_rotary_factor=0.25, swiglu_limit=0.5,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                         "beta_fast": 32, "beta_slow": 1})
    model = transformers.DeepseekV4ForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("sinks", "position_bias", ".base", "hc_base")):
                p.normal_(std=0.5)
        for layer in model.model.layers:
            gate = layer.mlp.gate
            if hasattr(gate, "tid2eid"):
                gate.tid2eid.copy_(torch.stack([torch.randperm(8)[:2] for _ in range(VOCAB)]))
            else:
                gate.e_score_correction_bias.normal_(std=0.05)
            gate.weight.normal_(std=0.3)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("v4")
    ref = hf_v4(path)
    ours, _ = load_hf(path)
    return ref, ours, path


def _ids(b, t, seed):
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_prefill_logits_match(pair):
    ref, ours, _ = pair
    ids = _ids(2, 40, 0)
    assert (ours(ids) - ref(ids).logits).abs().max().item() < TOL


@torch.no_grad()
def test_cached_decode_token_by_token_past_the_window(pair):
    """40 positions: 34 past the window of 6, 20 CSA entries of which the indexer keeps 3, 10 HCA entries."""
    ref, ours, _ = pair
    ids = _ids(1, 40, 1)
    want = ref(ids).logits[0]
    cache = ours.new_cache(1, 64)
    got = [ours(ids[:, :5], torch.arange(5)[None], cache)[0]]
    for t in range(5, ids.shape[1]):
        got.append(ours(ids[:, t:t + 1], torch.tensor([[t]]), cache)[0])
    assert (torch.cat(got) - want).abs().max().item() < TOL


@torch.no_grad()
def test_indexer_scores_have_no_ties_at_the_cut(pair):
    """Top-k is only well defined if the k-th and (k+1)-th scores differ (the reason for 16 index heads)."""
    _, ours, _ = pair
    ids = _ids(1, 40, 1)
    seen = []
    idx = ours.model.layers[1].self_attn.indexer
    handle = idx.register_forward_hook(lambda m, a, out: seen.append(a))
    try:
        ours(ids)
    finally:
        handle.remove()
    x, q_latent, at, _ = seen[0]
    keys = idx.comp(x, at, None)
    from nanoseek.models.v4_attention import rope_tail, visible
    q = idx.q_b_proj(q_latent).view(1, 40, idx.heads, idx.dim)
    q = rope_tail(q, at.comp[0].unsqueeze(2), at.comp[1].unsqueeze(2))
    s = (torch.relu(torch.einsum("bthd,bnd->bthn", q, keys)) * (idx.weights_proj(x) * idx.heads ** -0.5)
         .unsqueeze(-1)).sum(2).masked_fill(~visible(keys.shape[1], at.pos, 2), float("-inf"))
    top = s.topk(TOPK + 1, dim=-1).values[0]
    full = top[:, -1] > float("-inf")  # queries with more than k entries visible
    assert full.sum() > 20
    assert ((top[full, TOPK - 1] - top[full, TOPK]).abs() > 1e-5).all()


@torch.no_grad()
def test_odd_prefill_chunks_and_rows_at_different_lengths(pair):
    ref, ours, _ = pair
    ids = _ids(1, 40, 2)
    want = ref(ids).logits[0]
    cache, got, s = ours.new_cache(1, 16), [], 0
    for n in (3, 7, 1, 5, 11, 13):  # chunk ends fall inside and on compression windows
        if s + n > cache.max_len:  # grow as the scheduler does (entries are kept, the window ring as is)
            cache = cache.resized(2 * cache.max_len)
        got.append(ours(ids[:, s:s + n], torch.arange(s, s + n)[None], cache)[0])
        s += n
    assert (torch.cat(got) - want).abs().max().item() < TOL
    a, b = _ids(1, 33, 3), _ids(1, 22, 4)
    cache = ours.new_cache(2, 64)
    ours(a[:, :-1], torch.arange(32)[None], cache.rows(0))
    ours(b[:, :-1], torch.arange(21)[None], cache.rows(1))
    cache.swap_rows(0, 1, 32, 21)  # whole-row moves: the engine's compaction
    step = ours(torch.cat([b[:, -1:], a[:, -1:]]), torch.tensor([[21], [32]]), cache)
    assert (step[0, 0] - ref(b).logits[0, -1]).abs().max().item() < TOL
    assert (step[1, 0] - ref(a).logits[0, -1]).abs().max().item() < TOL
    assert not cache.rewindable and not cache.prefix_cacheable and not ours.prefix_cacheable


@torch.no_grad()
def test_mhc_matrices_doubly_stochastic_and_equal_to_transformers(pair):
    ref, ours, _ = pair
    x = torch.randn(2, 5, 2, 64)
    post, comb, _ = ref.model.layers[2].attn_hc(x)
    _, post_o, comb_o = ours.model.layers[2].attn_hc.mixes(x)
    assert torch.allclose(comb_o, comb, atol=1e-6) and torch.allclose(post_o, post, atol=1e-6)
    eps = ref.config.hc_eps
    for m in [comb_o, sinkhorn(torch.randn(1000, 4, 4), 20, eps)]:
        assert (m >= 0).all()
        assert (m.sum(-2) - 1).abs().max() < 10 * eps  # the last step normalises columns: exact up to eps
        assert (m.sum(-1) - 1).abs().max() < 1e-3      # rows: converged within 20 iterations


@torch.no_grad()
def test_hash_layer_choice_ignores_hidden_state_and_equals_transformers(pair):
    ref, ours, _ = pair
    ids = _ids(1, 30, 5).reshape(-1)
    gate = ours.model.layers[0].mlp.gate
    _, idx1, _ = gate(torch.randn(30, 64), ids)
    _, idx2, _ = gate(torch.randn(30, 64) * 5, ids)
    _, _, want = ref.model.layers[0].mlp.gate(torch.randn(1, 30, 64), ids[None])
    assert torch.equal(idx1, idx2) and torch.equal(idx1, want)
    assert gate.hashed and not ours.model.layers[1].mlp.gate.hashed
    assert ours.moe_layers() == [layer.mlp for layer in ours.model.layers[1:]]


def test_fresh_hash_table_is_seeded_and_balanced():
    from nanoseek.models import build_model

    cfg = config_from_hf(json.loads(json.dumps(_raw_config())))
    cfg.hash_seed = 7
    t1 = build_model(cfg).model.layers[0].mlp.gate.tid2eid
    t2 = build_model(cfg).model.layers[0].mlp.gate.tid2eid
    assert torch.equal(t1, t2)
    counts = torch.bincount(t1.reshape(-1), minlength=8)
    assert counts.max() - counts.min() <= 1
    assert (t1[:, 0] != t1[:, 1]).all()  # k distinct experts per token


def _raw_config():
    return transformers.DeepseekV4Config(
        vocab_size=VOCAB, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        head_dim=32, q_lora_rank=32, num_experts_per_tok=2, n_routed_experts=8, hc_mult=2, sliding_window=6,
        o_groups=2, o_lora_rank=16, index_n_heads=4, index_head_dim=16, index_topk=3,
        layer_types=["sliding_attention", "compressed_sparse_attention"],
        mlp_layer_types=["hash_moe", "moe"], partial_rotary_factor=0.25).to_dict()


@pytest.mark.parametrize("key,value,word", [
    ("layer_types", ["sliding_attention", "linear_attention"], "layer_types"),
    ("mlp_layer_types", ["hash_moe", "dense"], "mlp_layer_types"),
    ("scoring_func", "tanh", "scoring_func"),
    ("num_key_value_heads", 2, "num_key_value_heads"),
    ("compress_ratios", [0, 16], "compress_ratios"),
    ("sliding_window", 0, "sliding_window"),
])
def test_unknown_values_give_one_line_errors_naming_the_key(key, value, word):
    raw = _raw_config()
    raw[key] = value
    if key == "compress_ratios":
        raw.pop("layer_types")
    with pytest.raises(BadInputError) as e:
        config_from_hf(raw)
    assert word in str(e.value) and "\n" not in str(e.value)


def test_legacy_config_spelling_maps_like_transformers():
    """What DeepSeek's own config.json ships: compress_ratios, num_hash_layers, qk_rope_head_dim, rope_scaling."""
    legacy = {"model_type": "deepseek_v4", "num_hidden_layers": 3, "head_dim": 32, "qk_rope_head_dim": 8,
              "compress_ratios": [0, 4, 128, 4], "num_hash_layers": 1, "compress_rope_theta": 160000.0,
              "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                               "beta_fast": 32, "beta_slow": 1}, "max_position_embeddings": 1048576}
    ours = config_from_hf(dict(legacy))
    ref = transformers.DeepseekV4Config(**legacy)
    assert ours.layer_types == ref.layer_types and ours.mlp_layer_types == ref.mlp_layer_types
    assert ours.qk_rope_head_dim == ref.qk_rope_head_dim == 8
    assert ours.compress_rope.rope_type == "yarn" and ours.compress_rope.attention_factor == 1.0
    assert ours.compress_rope.theta == 160000.0 and ours.rope.rope_type == "default"


@torch.no_grad()
def test_export_reloads_in_transformers_with_the_same_logits(pair, tmp_path):
    ref, ours, _ = pair
    out = save_hf(ours, tmp_path / "export", max_shard_bytes=200_000)  # sharded
    assert (out / "model.safetensors.index.json").exists()
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    again, _ = load_hf(out)
    ids = _ids(2, 24, 6)
    want = ref(ids).logits
    assert (back(ids).logits - want).abs().max().item() < TOL
    assert (again(ids) - want).abs().max().item() < TOL


@torch.no_grad()
def test_fp8_block_scaled_weights_load_and_fp4_experts_are_refused(pair, tmp_path):
    """DeepSeek's naming: `x.weight` in float8_e4m3fn with its block scale as `x.scale`."""
    ref, _, path = pair
    state = load_file(str(path / "model.safetensors"))
    deq = {}
    for k in [k for k in state if k.endswith(("attn.wq_b.weight", "attn.wkv.weight", "shared_experts.w1.weight"))]:
        state[k], state[k[: -len("weight")] + "scale"], deq[k] = fp8_blocks(state[k])
    (tmp_path / "fp8").mkdir()
    save_file(state, str(tmp_path / "fp8" / "model.safetensors"))
    (tmp_path / "fp8" / "config.json").write_text((path / "config.json").read_text())
    ours, _ = load_hf(tmp_path / "fp8")
    plain = load_file(str(path / "model.safetensors"))
    plain.update(deq)
    (tmp_path / "deq").mkdir()
    save_file(plain, str(tmp_path / "deq" / "model.safetensors"))
    (tmp_path / "deq" / "config.json").write_text((path / "config.json").read_text())
    want = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "deq", dtype=torch.float32).eval()
    ids = _ids(1, 20, 7)
    assert (ours(ids) - want(ids).logits).abs().max().item() < TOL
    assert (ours(ids) - ref(ids).logits).abs().max().item() > 0  # the quantisation did change something

    raw = json.loads((path / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": "fp8", "expert_dtype": "fp4"}
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UnsupportedError) as e:
        load_hf(tmp_path / "fp8")
    assert "expert_dtype" in str(e.value) and "\n" not in str(e.value)


def test_batched_generation_equals_each_request_alone(pair):
    """Engine (rows prefilled one by one, compacted as they finish) and Scheduler (continuous batching with
    chunked prefill, row moves and swaps, cache growth) give each prompt the greedy tokens it gets alone.
    The prefix cache is off: V4 caches cannot back it (see models/v4_cache.py)."""
    _, ours, _ = pair
    g = torch.Generator().manual_seed(8)
    reqs = []
    for i in range(6):
        prompt = torch.randint(2, VOCAB, (int(torch.randint(1, 30, (), generator=g)),), generator=g).tolist()
        reqs.append((prompt, SamplingParams(temperature=0, max_tokens=int(torch.randint(4, 24, (), generator=g)))))
    reqs.append((reqs[2][0], SamplingParams(temperature=0, max_tokens=30)))  # a repeated prompt: Engine copies the row
    alone = [Engine(ours, eos_token_ids=[]).generate([p], sp)[0].token_ids for p, sp in reqs]
    batched = Engine(ours, eos_token_ids=[], prefill_chunk=7).generate([p for p, _ in reqs], [sp for _, sp in reqs])
    assert [c.token_ids for c in batched] == alone
    with Scheduler(ours, max_batch=4, prefill_chunk=9, prefix_cache_tokens=0, eos_token_ids=[]) as sched:
        handles = [sched.submit(p, sp) for p, sp in reqs]
        got = [h.result(timeout=60).token_ids for h in handles]
    assert got == alone


def test_tiny_v4_preset_learns_a_seeded_corpus_and_saves_its_hash_table(tmp_path):
    """The shared training loop (train/loop.py) on configs/tiny-v4.toml, shrunk: loss falls clearly, only the
    routed layers get bias updates, and the checkpoint holds the seeded, balanced hash table."""
    from conftest import _synthetic_text
    from safetensors.torch import load_file
    from train_data import REPO, prepare_shakespeare, small_run

    from nanoseek.models.v4_moe import balanced_hash_table
    from nanoseek.train.checkpoint import checkpoints, load_model
    from nanoseek.train.config import load_config
    from nanoseek.train.loop import read_jsonl
    from nanoseek.train.pretrain import pretrain

    text = tmp_path / "corpus.txt"
    text.write_text(_synthetic_text(400))
    data = prepare_shakespeare(tmp_path, text)
    out = tmp_path / "run"
    steps = 40
    cfg = load_config(REPO / "configs" / "tiny-v4.toml", small_run(
        data, out, steps, "data.batch_size=8", "data.seq_len=64", "train.eval_every=0", f"train.ckpt_every={steps}",
        "model.hidden_size=64", "model.moe_intermediate_size=48", "model.hash_seed=3", "model.bias_update_speed=0.01"))
    pretrain(cfg)
    train = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]
    first, last = train[0]["ce"], sum(r["ce"] for r in train[-5:]) / 5
    assert last < first - 1.5, (first, last)  # measured: 5.78 → 2.15 nats (log 320 = 5.77)
    assert len(train[-1]["load_max_mean"]) == 3  # the three routed layers; the hash layer has no choice to balance
    (_, path), = checkpoints(out)
    table = load_file(str(path / "model.safetensors"))["model.layers.0.mlp.gate.tid2eid"]
    mcfg = cfg.model_config(table.shape[0])
    assert torch.equal(table, balanced_hash_table(table.shape[0], mcfg.n_routed_experts, mcfg.num_experts_per_tok, 3))
    counts = torch.bincount(table.reshape(-1))
    assert counts.max() - counts.min() <= 1
    model, _, _ = load_model(path)
    assert torch.equal(model.model.layers[0].mlp.gate.tid2eid, table)
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.abs().sum() > 0  # the bias update ran
    assert all("indexer_kl" in r for r in train)  # the CSA indexers train by V3.2's KL loss


@torch.no_grad()
def test_weight_only_quantized_model_stays_close(pair):
    """What `nanoseek generate/serve` does on CPU by default (models/quant.py): every nn.Linear becomes int8."""
    import copy

    from nanoseek.models.quant import quantize_model

    _, ours, _ = pair
    q = copy.deepcopy(ours)
    quantize_model(q, "int8")
    ids = _ids(1, 30, 9)
    a, b = ours(ids), q(ids)
    # tiny random models under int8 (bf16 activations): V3's tiny test model errs by 0.053 of 0.56, this one 0.058
    # of 0.61. (The int8 kernel needs in_features % 16 == 0, hence q_lora_rank=32 above.)
    assert (a - b).abs().max().item() < 0.15 * a.abs().max().item()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.8



def test_prefix_cache_and_drafting_are_off_for_v4(pair):
    """Prefix blocks do not align with compression windows, and drafts cannot be rolled back in them: the
    scheduler runs V4 without either (the prefix pool itself refuses V4 caches in one line)."""
    from nanoseek.engine.draft import NgramDrafter
    from nanoseek.engine.prefix import PrefixCache

    _, ours, _ = pair
    sched = Scheduler(ours, max_batch=2, prefix_cache_tokens=64, drafter=NgramDrafter())
    assert sched.prefix is None and sched.drafter is None
    with pytest.raises(UnsupportedError) as e:
        PrefixCache(ours.new_cache(1, 32), 4)
    assert "compression windows" in str(e.value) and "\n" not in str(e.value)
    h = sched.submit(_ids(1, 12, 5)[0].tolist(), SamplingParams(temperature=0, max_tokens=4))
    while sched.step():
        pass
    assert len(h.result().token_ids) == 4


@torch.no_grad()
def test_compressed_first_layer_runs_through_the_engine():
    """V4's own schedule starts with HCA layers: the cache's first layer is then a CompressedLayer (nested state),
    which the engine's row growth must handle too."""
    from nanoseek.models import build_model

    raw = _raw_config()
    raw["layer_types"] = ["heavily_compressed_attention", "compressed_sparse_attention"]
    model = build_model(config_from_hf(raw)).eval()
    assert model.new_cache(2, 16).device == torch.device("cpu")
    prompts = [[5, 6, 7, 8, 9], [3, 4, 5, 6, 7, 8, 9, 10, 11], [2, 3]] * 2
    out = Engine(model, eos_token_ids=[]).generate(prompts, SamplingParams(temperature=0, max_tokens=12))
    alone = Engine(model, eos_token_ids=[]).generate(prompts[1:2], SamplingParams(temperature=0, max_tokens=12))
    assert out[1].token_ids == out[4].token_ids == alone[0].token_ids and len(out[1].token_ids) == 12
