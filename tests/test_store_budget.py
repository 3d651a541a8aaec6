"""Budgets under concurrency and crashes (issue 13, findings 1 and 9): reservations at admission, clamped
grants, settle/release, balances that are never empty or negative, and billing a killed server's requests."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from nanoseek.errors import InsufficientBalanceError
from nanoseek.serve.errors import error_response
from nanoseek.serve.store import INTERRUPTED, PriceTable, Store

# $1 per 1M prompt tokens, $10 per 1M output tokens: a 100-token prompt with max_tokens 90 costs at worst
# 100 × 1e-6 + 90 × 1e-5 = $0.001 exactly.
PRICES = PriceTable(input_cache_hit=0.5, input_cache_miss=1.0, output=10.0)
WORST = 0.001


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path) as st:
        yield st


def test_balance_is_never_empty_nor_negative(store):
    # The open server (no key) and an unlimited key report their spend, not an empty balance_infos.
    store.record_usage(None, "m", 0, 10, 5, 0, 0.1, "stop", 0.004)
    open_server = store.balance(None)
    assert open_server["is_available"]
    (info,) = open_server["balance_infos"]
    assert (info["total_balance"], info["budget"], info["spent"]) == ("0.00", None, "0.01")
    free, _ = store.create_key("free")
    store.record_usage(free, "m", 0, 10, 5, 0, 0.1, "stop", 12.345)
    (info,) = store.balance(free)["balance_infos"]
    assert store.balance(free)["is_available"] and (info["budget"], info["spent"]) == (None, "12.35")
    # A request overshooting by a millionth of a dollar showed "-0.01" before balances were clamped.
    tight, _ = store.create_key("tight", budget_usd=0.01)
    store.record_usage(tight, "m", 0, 10, 5, 0, 0.1, "stop", 0.010001)
    bal = store.balance(tight)
    assert bal["balance_infos"][0]["total_balance"] == "0.00" and not bal["is_available"]


def test_reserve_clamps_to_the_budget_then_refuses(store):
    key, _ = store.create_key("k", budget_usd=0.0025)
    full = store.reserve(key, "m", PRICES, prompt_tokens=100, max_tokens=90)
    assert (full.max_tokens, full.clamped, full.reserved_usd) == (90, False, pytest.approx(WORST))
    two = store.reserve(key, "m", PRICES, prompt_tokens=100, max_tokens=90, choices=2)
    # $0.0015 left: after the $0.0001 prompt, 2 choices × $1e-5 per token → 70 tokens each.
    assert (two.max_tokens, two.clamped) == (70, True)
    assert store.balance(key)["balance_infos"][0]["reserved"] == "0.01"   # $0.0024 held, rounded up
    assert not store.balance(key)["is_available"] and store.balance(key)["balance_infos"][0]["total_balance"] == "0.00"
    with pytest.raises(InsufficientBalanceError, match="held by its requests in progress") as e:
        store.reserve(key, "m", PRICES, prompt_tokens=100, max_tokens=90)
    assert error_response(e.value)[0] == 402
    assert store.release(two) and not store.release(two)
    # Settling bills what ran, at the admission prices, and frees the rest of the hold.
    row = store.settle(full, cache_hit_tokens=40, completion_tokens=30, finish_reason="stop")
    assert store.settle(full, cache_hit_tokens=40, completion_tokens=30, finish_reason="stop") is None  # once
    (usage,) = store.usage_rows(key=key)
    assert usage.id == row and (usage.prompt_cache_hit_tokens, usage.prompt_cache_miss_tokens) == (40, 60)
    assert usage.cost_usd == pytest.approx((40 * 0.5 + 60 * 1.0 + 30 * 10.0) / 1e6)
    assert store.reserve(key, "m", PRICES, prompt_tokens=100, max_tokens=90).max_tokens == 90
    # Unlimited keys and the open server always get the whole request.
    free, _ = store.create_key("free")
    assert store.reserve(free, "m", PRICES, 10**6, 10**6).max_tokens == 10**6
    assert store.reserve(None, "m", PRICES, 10**6, 10**6, choices=4).max_tokens == 10**6


@pytest.mark.parametrize("budget, grants", [(5 * WORST, [90] * 5), (5.5 * WORST, [90] * 5 + [40])])
def test_parallel_reservations_never_overspend(tmp_path, budget, grants):
    """Finding 1: 50 parallel requests against a budget for 5 were all served. Half the threads share one
    Store, half open their own, as separate server processes would."""
    shared = Store(tmp_path)
    key, _ = shared.create_key("five", budget_usd=budget)
    start, results, lock = threading.Barrier(50), [], threading.Lock()

    def admit(i: int) -> None:
        st = shared if i % 2 else Store(tmp_path)
        start.wait()
        try:
            got = st.reserve(key, "m", PRICES, prompt_tokens=100, max_tokens=90).max_tokens
        except InsufficientBalanceError:
            got = None
        with lock:
            results.append(got)

    threads = [threading.Thread(target=admit, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted((g for g in results if g is not None), reverse=True) == grants
    assert results.count(None) == 50 - len(grants)
    assert shared.balance(key)["is_available"] is False
    shared.close()


CHILD = textwrap.dedent("""
    import sys, time
    from nanoseek.serve.store import PriceTable, Store
    st = Store(sys.argv[1])
    r = st.reserve(int(sys.argv[2]), "m", PriceTable(0.5, 1.0, 10.0), prompt_tokens=100, max_tokens=90)
    st.progress(r, 7)
    st.progress(r, 12, reasoning_tokens=3)
    done = st.reserve(int(sys.argv[2]), "m", PriceTable(0.5, 1.0, 10.0), prompt_tokens=5, max_tokens=5)
    st.settle(done, cache_hit_tokens=0, completion_tokens=5, finish_reason="stop")
    print("ready", flush=True)
    time.sleep(60)
""")


def test_a_killed_server_s_requests_are_billed_once_at_restart(tmp_path):
    """Finding 9: streams running at a kill -9 were never billed, and settled ones must stay settled."""
    with Store(tmp_path) as st:
        key, _ = st.create_key("k", budget_usd=1.0)
    root = Path(__file__).resolve().parents[1]
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), str(key)], stdout=subprocess.PIPE,
                             text=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    try:
        assert child.stdout.readline().strip() == "ready"
        # A Store opened beside the live server (as `nanoseek usage` is) bills nothing of its running work.
        with Store(tmp_path) as cli:
            assert [r.finish_reason for r in cli.usage_rows()] == ["stop"]
            assert cli.balance(key)["balance_infos"][0]["reserved"] == "0.01"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        child.kill()
        child.stdout.close()
    with Store(tmp_path) as st:
        rows = st.usage_rows()   # the interrupted row is dated at its last progress, before the settled one
        assert sorted(r.finish_reason for r in rows) == [INTERRUPTED, "stop"]
        (cut,) = [r for r in rows if r.finish_reason == INTERRUPTED]
        assert (cut.prompt_cache_hit_tokens, cut.prompt_cache_miss_tokens, cut.completion_tokens,
                cut.reasoning_tokens) == (0, 100, 12, 3)
        assert cut.cost_usd == pytest.approx((100 * 1.0 + 12 * 10.0) / 1e6)
        assert st.balance(key)["balance_infos"][0]["reserved"] == "0.00"
        assert st.spent_usd(key) == pytest.approx(sum(r.cost_usd for r in rows))
    with Store(tmp_path) as again:   # a second restart bills nothing more
        assert len(again.usage_rows()) == 2 and again.recover_interrupted() == 0
    assert list((tmp_path / "live").iterdir()) == []   # and no lock files are left behind
