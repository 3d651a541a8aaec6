"""The batched generation loop: batching never changes greedy results, seeds reproduce, stops stop."""

import pytest
import torch

from nanoseek.engine.generate import Engine
from nanoseek.engine.sampling import SamplingParams
from nanoseek.errors import BadInputError
from nanoseek.models import build_model
from nanoseek.models.config import DeepseekConfig, DenseConfig


def _tiny_dense(context=64):
    torch.manual_seed(0)
    cfg = DenseConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context, eos_token_id=None)
    m = build_model(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(std=0.3)
    return m.eval()


def _tiny_deepseek(context=64):
    torch.manual_seed(0)
    cfg = DeepseekConfig(vocab_size=50, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                         num_hidden_layers=2, num_attention_heads=4, q_lora_rank=None, kv_lora_rank=12,
                         qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4, n_group=1,
                         topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=context,
                         eos_token_id=None)
    m = build_model(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(std=0.3)
    return m.eval()


PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4], [30]]


@pytest.mark.parametrize("make", [_tiny_dense, _tiny_deepseek])
def test_batch_equals_each_alone_greedy(make):
    eng = Engine(make())
    p = SamplingParams(temperature=0, max_tokens=12)
    together = eng.generate(PROMPTS, p)
    for prompt, c in zip(PROMPTS, together):
        alone = eng.generate([prompt], p)[0]
        assert c.token_ids == alone.token_ids
        assert len(c.token_ids) == 12 and c.finish_reason == "length"


def test_greedy_matches_full_sequence_argmax():
    m = _tiny_dense()
    out = Engine(m).generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=8))[0]
    ids = list(PROMPTS[0])
    for _ in range(8):
        ids.append(int(m(torch.tensor([ids]))[0, -1].argmax()))
    assert out.token_ids == ids[len(PROMPTS[0]):]


def test_seed_reproduces_and_differs():
    eng = Engine(_tiny_dense())
    runs = [eng.generate([PROMPTS[0]], SamplingParams(temperature=1.0, seed=s, max_tokens=16))[0].token_ids
            for s in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    # the same seeded request inside a batch with other requests
    batch = eng.generate([PROMPTS[1], PROMPTS[0]], [SamplingParams(temperature=1.0, max_tokens=16),
                                                      SamplingParams(temperature=1.0, seed=7, max_tokens=16)])
    assert batch[1].token_ids == runs[0]


def test_stop_token_and_cancellation():
    m = _tiny_dense()
    eng = Engine(m)
    free = eng.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=10))[0]
    stop_tok = free.token_ids[3]
    cut = eng.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_tok]))[0]
    assert cut.finish_reason == "stop"
    assert cut.token_ids == free.token_ids[:free.token_ids.index(stop_tok)]
    seen = []
    out = eng.generate([PROMPTS[0], PROMPTS[1]], SamplingParams(temperature=0, max_tokens=10),
                       on_delta=seen.append, cancelled=lambda i: i == 1 and len(seen) >= 4)
    assert out[1].finish_reason == "cancelled" and len(out[1].token_ids) < 10
    assert out[0].finish_reason == "length" and len(out[0].token_ids) == 10


def test_context_overflow_and_empty_prompt_are_clear_errors():
    eng = Engine(_tiny_dense())
    with pytest.raises(BadInputError, match="64"):
        eng.generate([[1] * 64], SamplingParams(max_tokens=1))
    with pytest.raises(BadInputError, match="empty"):
        eng.generate([[]], SamplingParams(max_tokens=1))
    # generation stops at the context edge with finish_reason length
    out = eng.generate([[1] * 60], SamplingParams(temperature=0, max_tokens=50))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 4


@pytest.mark.parametrize("make", [_tiny_dense, _tiny_deepseek])
@torch.no_grad()
def test_fused_projections_keep_logits(make):
    m = make()
    ids = torch.randint(0, 50, (2, 9))
    want = m(ids)
    m.fuse()
    assert not hasattr(m.model.layers[0].mlp, "up_proj")
    assert torch.allclose(m(ids), want, atol=1e-5)


def test_compiled_blocks_generate_the_same_tokens():
    m = _tiny_dense()
    p = SamplingParams(temperature=0, max_tokens=6)
    want = Engine(m).generate(PROMPTS[:2], p)
    got = Engine(m, compile=True).generate(PROMPTS[:2], p)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]


@pytest.mark.parametrize("make", [_tiny_dense, _tiny_deepseek])
def test_repeated_prompts_are_prefilled_once_with_the_same_results(make):
    """n samples of one prompt (GRPO groups, eval's k samples) share one prefill: the copied rows give what
    each sample gives alone."""
    model = make()
    eng = Engine(model)
    calls = []
    real = eng.runner.prefill
    eng.runner.prefill = lambda tokens, start, row: (calls.append(len(tokens)), real(tokens, start, row))[1]
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[0], PROMPTS[0], PROMPTS[2]]
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=10) for s in range(5)]
    batch = eng.generate(prompts, params)
    assert calls == [len(PROMPTS[0]), len(PROMPTS[2])]
    for prompt, sp, got in zip(prompts, params, batch):
        assert got.token_ids == Engine(model).generate([prompt], sp)[0].token_ids
