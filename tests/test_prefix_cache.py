"""Prefix cache: blocks found by chained token hashes, copied into rows, evicted least-recently-used first —
and a request served from cached blocks generates exactly what it generates when computed from scratch."""

import pytest
import torch

from nanoseek.engine.generate import Engine
from nanoseek.engine.prefix import PrefixCache, block_hashes
from nanoseek.engine.sampling import SamplingParams
from nanoseek.engine.scheduler import Scheduler
from test_engine import _tiny_deepseek, _tiny_dense

MODELS = {"dense": _tiny_dense, "deepseek": _tiny_deepseek}
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    return MODELS[request.param]()


def _run(sched, prompt, params=GREEDY):
    h = sched.submit(prompt, params)
    while not h.done:
        sched.step()
    return h.result()


def test_block_hashes_chain_on_every_earlier_token():
    a = list(range(40))
    b = a.copy()
    b[3] = 99  # differs inside the first block: no later block may match either
    c = a[:32] + [7] * 8  # same first 32 tokens
    ha, hb, hc = (block_hashes(t, 8) for t in (a, b, c))
    assert len(ha) == 5 and len(block_hashes(a[:39], 8)) == 4  # only full blocks are hashed
    assert all(x != y for x, y in zip(ha, hb))
    assert ha[:4] == hc[:4] and ha[4] != hc[4]
    assert block_hashes(list(range(8, 16)), 8)[0] != ha[1]  # same tokens at other positions: other block


def test_store_then_load_copies_every_layer_exactly(model):
    cache = model.new_cache(2, 64)
    for layer in cache.layers:
        for t in layer.span(0, 0, 64):
            t.copy_(torch.randn_like(t))
    pc = PrefixCache(cache, num_blocks=8, block_size=8)
    tokens = list(range(30))
    assert pc.store(cache, 0, tokens) == 3  # 3 full blocks of 8
    n, blocks = pc.match(tokens + [1, 2])
    assert n == 24 and len(blocks) == 3
    pc.load(cache, 1, blocks)
    for layer in cache.layers:
        for src, dst in zip(layer.span(0, 0, 24), layer.span(1, 0, 24)):
            assert torch.equal(src, dst)
    assert pc.store(cache, 0, tokens) == 0  # already there: nothing rewritten
    assert (pc.queried_tokens, pc.hit_tokens, pc.blocks_used) == (32, 24, 3)


def test_match_always_leaves_the_last_prompt_token_to_compute(model):
    cache = model.new_cache(1, 64)
    pc = PrefixCache(cache, num_blocks=8, block_size=8)
    pc.store(cache, 0, list(range(16)))
    assert pc.match(list(range(16)))[0] == 8   # 16 cached, but the 16th token's logits are needed
    assert pc.match(list(range(17)))[0] == 16


def test_lru_evicts_the_coldest_chain_tail_first(model):
    cache = model.new_cache(1, 64)
    pc = PrefixCache(cache, num_blocks=4, block_size=4)
    a, b, c = list(range(100, 109)), list(range(200, 209)), list(range(300, 309))
    pc.store(cache, 0, a)  # 2 blocks
    pc.store(cache, 0, b)  # 2 blocks: pool full
    pc.match(a)            # a is now the most recent
    pc.store(cache, 0, c)  # needs 2 blocks: b's go, leaf first
    assert pc.match(a)[0] == 8 and pc.match(c)[0] == 8 and pc.match(b)[0] == 0
    assert pc.blocks_used == 4
    pc.store(cache, 0, list(range(500, 500 + 4 * 6)))  # a chain longer than the pool keeps its head
    assert pc.blocks_used == 4 and pc.match(list(range(500, 500 + 17)))[0] == 16


def test_shared_prefix_hits_and_generates_what_a_cold_run_does(model):
    system = list(range(5, 45))            # 40 tokens shared, as a long system prompt would be
    first, second = system + [1, 2, 3], system + [9, 8, 7, 6]
    sched = Scheduler(model, max_batch=4, prefill_chunk=16, block_size=8)
    a = _run(sched, first)
    b = _run(sched, second)
    assert a.cached_tokens == 0 and b.cached_tokens == 40
    cold = Engine(model, prefix_cache_tokens=0).generate([first, second], GREEDY)
    assert a.token_ids == cold[0].token_ids and b.token_ids == cold[1].token_ids
    st = sched.stats()
    assert st["prefix_hit_tokens"] == 40 and st["prefix_queried_tokens"] == len(first) + len(second)
    assert 0 < st["prefix_blocks_used"] <= st["prefix_blocks_total"]
    assert st["prompt_tokens"] == len(first) + len(second)  # hits count as prompt tokens served


SYSTEM = list(range(5, 45))   # 40 tokens: two full 16-token blocks shared
BURST = [SYSTEM + [1, 2, 3], SYSTEM + [9, 8, 7, 6], SYSTEM + [4]]


def test_requests_admitted_together_share_what_the_first_prefilled(model):
    # An offline call (or a burst at the server) is admitted in one step, before any prompt is cached: the
    # rows prefilled after the first take the blocks it stored.
    engine = Engine(model, max_batch=4)
    got = engine.generate(BURST, GREEDY)
    assert [o.cached_tokens for o in got] == [0, 32, 32]
    assert engine.loop.stats()["prefix_hit_tokens"] == 64
    cold = Engine(model, prefix_cache_tokens=0).generate(BURST, GREEDY)
    assert [o.token_ids for o in got] == [o.token_ids for o in cold]


def test_the_offline_prefix_cache_lives_for_one_call(model):
    # GRPO changes the weights between calls: keys and values cached by the last call are stale.
    import copy

    engine = Engine(copy.deepcopy(model), max_batch=4)
    engine.generate(BURST, GREEDY)
    with torch.no_grad():
        for p in engine.model.parameters():
            p.mul_(1.5)
    after = engine.generate(BURST, GREEDY)
    assert [o.cached_tokens for o in after] == [0, 32, 32]
    fresh = Engine(engine.model, prefix_cache_tokens=0).generate(BURST, GREEDY)
    assert [o.token_ids for o in after] == [o.token_ids for o in fresh]


def test_next_chat_turn_hits_the_previous_reply(model):
    """The reply's keys and values are kept when a request ends, so a conversation's next turn (history +
    reply + new message) finds more than its first prompt."""
    sched = Scheduler(model, max_batch=2, prefill_chunk=64, block_size=4)
    turn1 = list(range(3, 23))
    r1 = _run(sched, turn1)
    turn2 = turn1 + r1.token_ids + [11, 12, 13]
    r2 = _run(sched, turn2)
    fed = len(turn1) + len(r1.token_ids) - 1   # the last sampled token is never fed, so never cached
    assert r2.cached_tokens == fed // 4 * 4 > len(turn1)
    assert r2.token_ids == Engine(model).generate([turn2], GREEDY)[0].token_ids


def test_prefix_cache_off(model):
    sched = Scheduler(model, max_batch=2, prefix_cache_tokens=0)
    p = list(range(3, 40))
    _run(sched, p)
    assert _run(sched, p).cached_tokens == 0
    assert sched.stats()["prefix_blocks_total"] == 0


@pytest.mark.parametrize("factory", list(MODELS.values()), ids=list(MODELS))
def test_a_cache_miss_never_shrinks_rows_under_running_requests(factory):
    """Regression: admitting a request that hits nothing (0 cached tokens) once shrank the rows back to their
    initial length while a long request was decoding, zeroing its keys past position 256."""
    model = factory(context=1024)
    sched = Scheduler(model, max_batch=2, max_len=1024, prefill_chunk=512)
    g = torch.Generator().manual_seed(5)
    long_prompt = torch.randint(0, 50, (300,), generator=g).tolist()
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    a = sched.submit(long_prompt, params)
    while sched.stats()["decoding"] < 1:
        sched.step()
    b = sched.submit([7, 8, 9, 10, 11], params)   # misses the prefix cache
    while not (a.done and b.done):
        sched.step()
    alone = Engine(model).generate([long_prompt], params)[0]
    assert a.result().token_ids == alone.token_ids
