"""Same weights in, same logits out: nanoseek vs transformers (eager attention, fp32)."""

import pytest
import torch
import transformers
from hf_models import deepseek, llama, qwen2

from nanoseek.weights.hf import load_hf

TOL = 1e-4
CASES = {
    "llama": lambda p: llama(p),
    "llama-untied-llama3rope": lambda p: llama(p, tie=False, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "qwen2": lambda p: qwen2(p),
    "deepseek": lambda p: deepseek(p),
    "deepseek-yarn": lambda p: deepseek(p, yarn=True),
    "deepseek-no-qlora": lambda p: deepseek(p, q_lora=False),
}


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    CASES[request.param](path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    ours, _ = load_hf(path)
    return request.param, ref.eval(), ours


def _ids(vocab, b=2, t=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (b, t), generator=g)


@torch.no_grad()
def test_prefill_logits_match(pair):
    name, ref, ours = pair
    ids = _ids(ours.config.vocab_size, t=80 if "yarn" in name else 40)
    want = ref(ids).logits
    got = ours(ids)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < TOL, name


def decode_token_by_token(model, ids: torch.Tensor, prefix: int = 5) -> torch.Tensor:
    """Logits [T, V] of one sequence fed through the model's cache: a `prefix`-token chunk, then one token at a
    time (the decode path)."""
    cache = model.new_cache(1, 64)
    got = [model(ids[:, :prefix], torch.arange(prefix)[None], cache)[0]]
    for t in range(prefix, ids.shape[1]):
        got.append(model(ids[:, t:t + 1], torch.tensor([[t]]), cache)[0])
    return torch.cat(got)


@torch.no_grad()
def test_cached_decode_matches_full_sequence(pair):
    """Token-by-token through our cache equals transformers' full-sequence logits at every position."""
    name, ref, ours = pair
    ids = _ids(ours.config.vocab_size, b=1, t=24, seed=3)
    want = ref(ids).logits[0]
    got = decode_token_by_token(ours, ids)
    assert (got - want).abs().max().item() < TOL, name


@torch.no_grad()
def test_batched_rows_with_different_lengths(pair):
    """Rows of one cache at different positions decode independently."""
    _, _, ours = pair
    a, b = _ids(ours.config.vocab_size, b=1, t=12, seed=4), _ids(ours.config.vocab_size, b=1, t=7, seed=5)
    cache = ours.new_cache(2, 32)
    ours(a[:, :-1], torch.arange(11)[None], cache.rows(0))
    ours(b[:, :-1], torch.arange(6)[None], cache.rows(1))
    step = ours(torch.cat([a[:, -1:], b[:, -1:]]), torch.tensor([[11], [6]]), cache)
    assert torch.allclose(step[0, 0], ours(a)[0, -1], atol=TOL)
    assert torch.allclose(step[1, 0], ours(b)[0, -1], atol=TOL)


@torch.no_grad()
def test_fused_inference_model_matches(pair):
    import copy

    name, ref, ours = pair
    fused = copy.deepcopy(ours)
    fused.fuse()
    ids = _ids(ours.config.vocab_size, t=16, seed=9)
    assert (fused(ids) - ref(ids).logits).abs().max().item() < TOL, name
