"""The one decode loop: its pure policy and row bookkeeping (no model), and the per-row extension points
(logit constraints, routing records) every caller reaches through `Engine.generate` and `Scheduler`."""

import pytest
import torch

from nanoseek.engine.generate import Engine
from nanoseek.engine.policy import CopyTwin, Prefill, RowView, admit_count, plan_prefill
from nanoseek.engine.rows import RowTable, Slot
from nanoseek.engine.sampling import SamplingParams
from nanoseek.engine.scheduler import Scheduler
from test_engine import PROMPTS, _tiny_deepseek, _tiny_dense

# -- policy: pure --------------------------------------------------------------------------------------------


def test_admission_fills_free_rows_only():
    assert admit_count(waiting=5, used=2, max_batch=4) == 2
    assert admit_count(waiting=1, used=0, max_batch=4) == 1
    assert admit_count(waiting=3, used=4, max_batch=4) == 0


def test_prefill_budget_goes_oldest_first_and_splits_long_prompts():
    rows = [RowView(7, "c", 50), RowView(3, "a", 10), RowView(5, "b", 30)]
    assert plan_prefill(rows, 32) == [Prefill(3, 10), Prefill(5, 22)]
    assert plan_prefill(rows, 0) == []


def test_twins_copy_a_finished_prompt_and_wait_for_an_unfinished_one():
    decoding = RowView(1, "p", 0)
    # a twin of a decoding row copies it and spends no budget; another prompt still gets the budget
    assert plan_prefill([decoding, RowView(4, "p", 12), RowView(6, "q", 5)], 5) == [CopyTwin(4, 1), Prefill(6, 5)]
    # twins of a prompt finished within this plan copy it after it is computed
    assert plan_prefill([RowView(2, "p", 8), RowView(3, "p", 8)], 8) == [Prefill(2, 8), CopyTwin(3, 2)]
    # a prompt still being prefilled (too long for this step) holds its twin back, spending nothing on it
    assert plan_prefill([RowView(2, "p", 20), RowView(3, "p", 20), RowView(4, "r", 3)], 8) == [Prefill(2, 8)]
    assert plan_prefill([RowView(2, "p", 20), RowView(3, "p", 20), RowView(4, "r", 3)], 25) == \
        [Prefill(2, 20), CopyTwin(3, 2), Prefill(4, 3)]


# -- rows: bookkeeping against a recording stand-in for the cache --------------------------------------------


class RecordingCache:
    """Rows × positions, with each row's content as a label list, so layout operations can be checked."""

    def __init__(self, batch, max_len):
        self.data = [[None] * max_len for _ in range(batch)]
        self.max_len, self.device, self.ops = max_len, torch.device("cpu"), []

    @property
    def batch(self):
        return len(self.data)

    def copy_row(self, src, dst, length):
        self.ops.append(("copy", src, dst, length))
        self.data[dst][:length] = self.data[src][:length]

    def swap_rows(self, a, b, la, lb):
        self.ops.append(("swap", a, b))
        self.data[a], self.data[b] = self.data[b], self.data[a]

    def select(self, keep):
        out = RecordingCache(0, self.max_len)
        out.data, out.ops = [list(self.data[i]) for i in keep.tolist()], self.ops
        return out

    def resized(self, length):
        out = RecordingCache(0, length)
        out.data = [(row + [None] * length)[:length] for row in self.data]
        out.ops = self.ops
        return out


class FakeState:
    def __init__(self, prompt):
        self.prompt, self.pos = prompt, len(prompt)


class FakeHandle:
    def __init__(self, rid):
        self.id = rid


def _slot(rid, prompt_len, filled):
    s = Slot(FakeHandle(rid), FakeState([0] * prompt_len), rid)
    s.filled = filled
    return s


def test_rows_grow_by_doubling_keep_decoding_first_and_shrink_when_idle():
    table = RowTable(RecordingCache(1, 4), max_batch=8, max_len=64)
    slots = [_slot(i, 3, 1) for i in range(5)]  # one prompt token in each row so far
    for s in slots:
        table.add(s)
        table.cache.data[s.row][0] = f"r{s.rid}"
    assert table.cache.batch == 8 and [s.row for s in slots] == [0, 1, 2, 3, 4]
    assert [table.cache.data[i][0] for i in range(5)] == ["r0", "r1", "r2", "r3", "r4"]  # growth kept content
    for rid in (3, 1):  # prompts complete out of order: each joins the end of the decoding block
        slots[rid].filled = 3
        table.promote(slots[rid])
    assert table.decoding == 2 and [s.rid for s in table.slots[:2]] == [3, 1]
    assert all(table.cache.data[s.row][0] == f"r{s.rid}" for s in table.slots)
    table.free(0)  # decoding hole: last decoding row moves in, last prefilling row fills the block's end
    assert table.decoding == 1 and [s.rid for s in table.slots] == [1, 4, 2, 0]
    assert all(table.cache.data[s.row][0] == f"r{s.rid}" for s in table.slots)
    table.reserve(20)
    assert table.cache.max_len == 32  # doubling from 4
    for i in reversed(range(len(table))):
        table.free(i)
    table.reserve(0)
    assert (table.cache.batch, table.cache.max_len) == (1, 4)


# -- the loop's per-row hooks ------------------------------------------------------------------------------


class OnlyTokens:
    """A constraint allowing a fixed token set until `steps` tokens are out, then only `end`."""

    def __init__(self, vocab, allowed, end, steps):
        self.vocab, self.allowed_ids, self.end, self.steps = vocab, allowed, end, steps
        self.seen = []

    def allowed(self):
        m = torch.zeros(self.vocab, dtype=torch.bool)
        m[self.allowed_ids if len(self.seen) < self.steps else [self.end]] = True
        return m

    def advance(self, token):
        self.seen.append(token)

    def rollback(self, n):
        del self.seen[len(self.seen) - n:]


class Nothing(OnlyTokens):
    def allowed(self):
        return torch.zeros(self.vocab, dtype=torch.bool) if len(self.seen) >= self.steps else None


def test_constraints_restrict_their_row_only_and_logprobs_stay_unmasked():
    model = _tiny_dense()
    eng = Engine(model)
    p = SamplingParams(temperature=1.0, seed=1, max_tokens=12, logprobs=1, stop_token_ids=[49])
    free = eng.generate([PROMPTS[0]], p)[0]
    c = OnlyTokens(50, [5, 6, 7], end=49, steps=8)
    got = eng.generate([PROMPTS[0], PROMPTS[1]], [p, p], constraints=[c, None])
    assert set(got[0].token_ids) <= {5, 6, 7} and len(got[0].token_ids) == 8 and got[0].finish_reason == "stop"
    assert got[1].token_ids == eng.generate([PROMPTS[1]], p)[0].token_ids  # the free row is untouched
    assert c.seen == got[0].token_ids
    assert free.token_ids != got[0].token_ids
    # logprobs describe the model, not the mask: the top token is often outside {5, 6, 7}
    tops = [lp["top"][0][0] for lp in got[0].logprobs]
    assert any(t not in {5, 6, 7} for t in tops)


def test_a_dead_end_ends_the_request_with_an_error_not_a_hang():
    eng = Engine(_tiny_dense())
    out = eng.generate([PROMPTS[0], PROMPTS[1]], SamplingParams(temperature=0, max_tokens=20),
                       constraints=[Nothing(50, [], 0, steps=3), None])
    assert out[0].finish_reason == "error" and "allows no token" in out[0].error and len(out[0].token_ids) == 3
    assert out[1].finish_reason == "length" and len(out[1].token_ids) == 20


def test_routing_is_recorded_per_position_and_matches_a_plain_forward():
    model = _tiny_deepseek()
    eng = Engine(model)
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[2]]  # a twin: its prompt routing comes from the copied row
    outs = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=5), record_routing=True)
    seen = []
    hooks = [r.register_forward_hook(lambda m, a, o: seen.append(o[1])) for r in eng.runner.recorder.routers]
    for prompt, out in zip(prompts, outs):
        # positions fed to the model: the prompt, then every generated token but the last
        ids = torch.tensor(prompt + out.token_ids[:-1])[None]
        seen.clear()
        with torch.no_grad():
            model(ids)
        want = torch.stack([s.reshape(ids.shape[1], -1) for s in seen], dim=1)  # [T, layers, k]
        got = torch.stack(out.routing)
        assert got.shape == want.shape
        assert torch.equal(got.sort(-1).values, want.sort(-1).values)
    for h in hooks:
        h.remove()
    assert not eng.runner.recorder.on and not any(r._forward_hooks for r in eng.runner.recorder.routers)
    assert eng.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=2))[0].routing is None


def test_offline_callers_skip_the_servers_queue_bound_and_context_cap():
    model = _tiny_dense(context=6000)
    eng = Engine(model, max_batch=2)
    outs = eng.generate([[1 + i % 40] for i in range(300)], SamplingParams(temperature=0, max_tokens=1))
    assert len(outs) == 300 and all(o.finish_reason == "length" for o in outs)
    long = list(range(1, 40)) * 120  # 4,680 tokens: past the server's default 4,096
    assert eng.generate([long], SamplingParams(temperature=0, max_tokens=2))[0].finish_reason == "length"
    sched = Scheduler(model, max_queue=4)
    assert sched.max_len == 4096


def test_cancel_and_failure_leave_the_loop_reusable():
    eng = Engine(_tiny_dense())
    calls = {"n": 0}
    real = eng.runner.decode

    def boom(*a):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("device lost")
        return real(*a)

    eng.runner.decode = boom
    with pytest.raises(RuntimeError, match="device lost"):
        eng.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=8))
    eng.runner.decode = real
    assert eng.loop.idle
    again = eng.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=8))
    assert [o.token_ids for o in again] == [Engine(eng.model).generate([p], SamplingParams(temperature=0,
                                            max_tokens=8))[0].token_ids for p in PROMPTS]
