"""Continuous batching: a request's output never depends on who else is in the batch or when it joined."""

import threading

import pytest
import torch

from nanoseek.engine.generate import Engine
from nanoseek.engine.sampling import SamplingParams
from nanoseek.engine.scheduler import Scheduler
from nanoseek.errors import BadInputError, QueueFullError
from nanoseek.serve.errors import error_response
from test_engine import _tiny_deepseek, _tiny_dense

MODELS = {"dense": _tiny_dense, "deepseek": _tiny_deepseek}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    return MODELS[request.param]()


def _requests(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(1, 30, (), generator=g))
        prompt = torch.randint(0, 50, (length,), generator=g).tolist()
        out.append((prompt, SamplingParams(temperature=0, max_tokens=int(torch.randint(1, 20, (), generator=g)))))
    return out


def _alone(model, prompt, params):
    return Engine(model).generate([prompt], params)[0]


def test_sixteen_concurrent_greedy_requests_match_each_alone(model):
    reqs = _requests(16)
    handles = [None] * len(reqs)
    barrier = threading.Barrier(len(reqs))

    def client(i):  # one thread per request, all submitting at once, as HTTP handlers would
        barrier.wait()
        handles[i] = sched.submit(*reqs[i])

    with Scheduler(model, max_batch=16, prefill_chunk=64) as sched:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(reqs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        results = [h.result(timeout=60) for h in handles]
        st = sched.stats()
    for (p, sp), h, got in zip(reqs, handles, results):
        want = _alone(model, p, sp)
        assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason == "length"
        assert h.queued_s is not None and h.ttft_s is not None and h.total_s >= h.ttft_s
    assert st["max_batch_seen"] > 1
    assert st["running"] == st["waiting"] == 0
    assert st["generation_tokens"] == sum(sp.max_tokens for _, sp in reqs)
    assert st["prompt_tokens"] == sum(len(p) for p, _ in reqs)


def test_requests_join_mid_decode_and_rows_swap(model):
    """Driven step by step: fewer rows than requests, chunked prefill smaller than prompts, a first request
    that finishes early (its row is refilled from the end) and late joiners while others decode."""
    reqs = _requests(10, seed=1)
    reqs[0] = (reqs[0][0], SamplingParams(temperature=0, max_tokens=2))  # leaves first; row 0 gets reused
    reqs[1] = (list(range(3, 40)), SamplingParams(temperature=0, max_tokens=25))
    sched = Scheduler(model, max_batch=4, prefill_chunk=7)
    moved, swapped = [], []   # spy on the row bookkeeping: both layout operations must have run
    real_move, real_swap = sched.rows._move, sched.rows._swap
    sched.rows._move = lambda src, dst: (moved.append((src, dst)), real_move(src, dst))
    sched.rows._swap = lambda a, b: (swapped.append((a, b)), real_swap(a, b))
    handles = [sched.submit(p, sp) for p, sp in reqs[:5]]
    while not handles[0].done:
        sched.step()
    while sched.stats()["decoding"] < 2:
        sched.step()
    assert not handles[1].done
    handles += [sched.submit(p, sp) for p, sp in reqs[5:]]
    while sched.step():
        pass
    for (p, sp), h in zip(reqs, handles):
        assert h.result(timeout=0).token_ids == _alone(model, p, sp).token_ids
    st = sched.stats()
    assert st["running"] == 0 and st["max_batch_seen"] == 4
    assert (0, 0) not in moved and any(dst == 0 for _, dst in moved) and swapped


def test_streamed_deltas_concatenate_to_result():
    sched = Scheduler(_tiny_dense(), max_batch=2)
    h = sched.submit([1, 2, 3], SamplingParams(temperature=0, max_tokens=5))
    seen = []
    h2 = sched.submit([4, 5], SamplingParams(temperature=0, max_tokens=3), on_delta=seen.append)
    with sched:
        deltas = list(h)
    assert [t for d in deltas for t in d.token_ids] == h.result().token_ids
    assert deltas[-1].finish_reason == "length" and all(d.finish_reason is None for d in deltas[:-1])
    assert [t for d in seen for t in d.token_ids] == h2.result().token_ids


def test_cancel_mid_stream_frees_the_row(model):
    p = SamplingParams(temperature=0, max_tokens=30)
    sched = Scheduler(model, max_batch=4)
    victim = sched.submit([1, 2, 3], p)
    others = [sched.submit([7, 8, 9, 10], p), sched.submit([5], p)]
    for _ in range(5):
        sched.step()
    victim.cancel()
    sched.step()
    assert victim.done and victim.result().finish_reason == "cancelled"
    assert list(victim)[-1].finish_reason == "cancelled"
    assert sched.stats()["running"] == 2
    while sched.step():
        pass
    assert sched.stats()["running"] == 0
    for h, prompt in zip(others, ([7, 8, 9, 10], [5])):
        assert h.result().token_ids == _alone(model, prompt, p).token_ids


def test_cancel_while_waiting_and_in_a_running_thread():
    sched = Scheduler(_tiny_dense(), max_batch=1)
    first = sched.submit([1, 2], SamplingParams(temperature=0, max_tokens=5))
    queued = sched.submit([3], SamplingParams(temperature=0, max_tokens=5))
    queued.cancel()
    sched.step()
    assert queued.result(timeout=0).finish_reason == "cancelled" and queued.result().token_ids == []
    with sched:
        long = sched.submit([4], SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))
        it = iter(long)
        next(it)
        long.cancel()
        assert long.result(timeout=10).finish_reason == "cancelled"
        assert first.result(timeout=10).finish_reason == "length"
    assert sched.stats()["running"] == 0


def test_queue_full_and_bad_input():
    sched = Scheduler(_tiny_dense(), max_batch=1, max_queue=2)
    p = SamplingParams(temperature=0, max_tokens=2)
    sched.submit([1], p)
    sched.submit([2], p)
    with pytest.raises(QueueFullError) as full:
        sched.submit([3], p)
    assert error_response(full.value)[0] == 503
    sched.step()  # admits one: room again
    sched.submit([3], p)
    with pytest.raises(BadInputError, match="empty"):
        sched.submit([], p)
    with pytest.raises(BadInputError, match="64"):
        sched.submit([1] * 64, p)
    with pytest.raises(BadInputError, match="vocabulary"):
        sched.submit([50], p)
    with pytest.raises(BadInputError, match="top_p"):
        sched.submit([1], SamplingParams(top_p=0))


def test_seeded_sample_alone_and_in_a_crowd(model):
    p = SamplingParams(temperature=1.0, top_k=20, seed=11, max_tokens=15, ignore_eos=True)
    want = _alone(model, [1, 2, 3, 4], p).token_ids
    with Scheduler(model, max_batch=8) as sched:
        alone = sched.submit([1, 2, 3, 4], p).result(timeout=30).token_ids
        crowd = [sched.submit([i + 1] * (i + 1), SamplingParams(temperature=0.8, max_tokens=10 + i))
                 for i in range(5)]
        mine = sched.submit([1, 2, 3, 4], p)
        crowd += [sched.submit([9, i], SamplingParams(temperature=1.0, top_p=0.9, max_tokens=5)) for i in range(3)]
        got = mine.result(timeout=30).token_ids
        for h in crowd:
            h.result(timeout=30)
    assert alone == want and got == want


def test_stop_ends_outstanding_requests_and_idle_loop_sleeps():
    sched = Scheduler(_tiny_dense(), max_batch=1).start()
    assert sched.submit([1], SamplingParams(temperature=0, max_tokens=3)).result(timeout=10).token_ids
    steps = sched.stats()["steps"]
    threading.Event().wait(0.2)
    assert sched.stats()["steps"] == steps  # idle: no spinning steps
    sched.stop()
    h = sched.submit([2], SamplingParams(temperature=0, max_tokens=3))
    sched.stop()
    assert h.result(timeout=0).finish_reason == "cancelled"


@pytest.mark.parametrize("factory", list(MODELS.values()), ids=list(MODELS))
def test_rows_grow_for_long_requests_and_shrink_when_idle(factory):
    """Rows start at 256 positions, double while a longer request runs (its output unchanged), and give the
    memory back once nothing runs."""
    model = factory(context=2048)
    sched = Scheduler(model, max_batch=2, max_len=2048, prefill_chunk=128, prefix_cache_tokens=0)
    small = sched.stats()["kv_bytes"]
    assert sched.stats()["kv_positions"] == 256
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, 50, (600,), generator=g).tolist()
    params = SamplingParams(temperature=0, max_tokens=10)
    h = sched.submit(prompt, params)
    grown = 0
    while not h.done:
        sched.step()
        grown = max(grown, sched.stats()["kv_positions"])
    assert grown >= 601 and grown <= 1024
    assert h.result().token_ids == _alone(model, prompt, params).token_ids
    st = sched.stats()
    assert st["kv_positions"] == 256 and st["kv_bytes"] == small
