"""The serving store: keys kept only as hashes, the usage ledger and balances, prices, rate limits, CLI."""

import re
import sqlite3
import threading
from datetime import datetime
from pathlib import Path

import pytest

from nanoseek.cli import main
from nanoseek.errors import BadInputError, NotFoundError, UnsupportedError
from nanoseek.serve.limits import Hold, RateLimiter, RequestTooLarge
from nanoseek.serve.store import (DB_FILENAME, SCHEMA_VERSION, PriceTable, Prices, Store, data_dir,
                                  parse_since)


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path) as st:
        yield st


def _use(st, key_id, cost=0.0, model="deepseek-chat", hit=0, miss=0, out=0, reasoning=0, ts=None):
    return st.record_usage(key_id, model, hit, miss, out, reasoning, latency_s=0.5, finish_reason="stop",
                           cost_usd=cost, ts=ts)


def test_data_dir_explicit_then_env_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("NANOSEEK_HOME", raising=False)
    assert data_dir() == tmp_path / "home" / ".nanoseek"
    monkeypatch.setenv("NANOSEEK_HOME", str(tmp_path / "env"))
    assert data_dir() == tmp_path / "env"
    assert data_dir(tmp_path / "arg") == tmp_path / "arg"


def test_secret_is_stored_only_as_a_hash(tmp_path):
    st = Store(tmp_path)
    key_id, secret = st.create_key("alice", rpm=10, tpm=1000, budget_usd=2.5)
    assert re.fullmatch(r"sk-ns-[A-Za-z0-9_-]{32,}", secret)
    rec = st.get_key(key_id)
    assert secret.startswith(rec.prefix) and len(rec.prefix) < len(secret) // 2
    assert (rec.name, rec.rpm, rec.tpm, rec.budget_usd, rec.revoked) == ("alice", 10, 1000, 2.5, False)

    def on_disk() -> bytes:  # the database and its WAL/shm side files, wherever the row landed
        return b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith(DB_FILENAME))

    for _ in range(2):  # before and after close (which checkpoints the WAL into the main file)
        blob = on_disk()
        assert rec.prefix.encode() in blob  # we are reading the right bytes
        assert secret.encode() not in blob
        assert secret[len(rec.prefix):].encode() not in blob  # not even the part never displayed
        st.close()
    assert (tmp_path / DB_FILENAME).stat().st_mode & 0o077 == 0  # owner-only


def test_authenticate_revoke_and_any_keys(store):
    assert not store.any_keys()
    a_id, a = store.create_key("a")
    b_id, b = store.create_key("b", budget_usd=1)
    assert store.any_keys()
    assert store.authenticate(a).id == a_id and store.authenticate(b).id == b_id
    for bad in ("", None, a[:-1], a + "x", "sk-ns-" + "A" * 43, store.get_key(a_id).prefix):
        assert store.authenticate(bad) is None

    rec = store.revoke_key(store.get_key(a_id).prefix + "…")  # as `keys list` displays it
    assert rec.id == a_id and rec.revoked
    assert store.authenticate(a) is None and store.authenticate(b).id == b_id
    assert store.revoke_key(str(a_id)).revoked_at == rec.revoked_at  # idempotent, first time kept
    store.revoke_key(b)  # the whole secret also identifies a key
    assert store.authenticate(b) is None
    assert [k.revoked for k in store.list_keys()] == [True, True]
    assert store.any_keys()  # revoking every key must not open the server
    with pytest.raises(NotFoundError):
        store.revoke_key("sk-ns-nope")
    with pytest.raises(NotFoundError):
        store.revoke_key(99)


@pytest.mark.parametrize("kwargs", [dict(name=" "), dict(name="x", rpm=0), dict(name="x", tpm=1.5),
                                    dict(name="x", budget_usd=-1), dict(name="x", budget_usd=float("nan"))])
def test_create_key_rejects_bad_limits(store, kwargs):
    with pytest.raises(BadInputError):
        store.create_key(**kwargs)


def test_wal_foreign_keys_and_schema_version(tmp_path, store):
    assert store.journal_mode() == "wal"
    assert store.schema_version() == SCHEMA_VERSION
    with pytest.raises(NotFoundError):  # foreign keys are enforced: usage must name a real key
        _use(store, key_id=42)
    store.close()
    with Store(tmp_path) as again:  # reopening migrates nothing and keeps the version
        assert again.schema_version() == SCHEMA_VERSION
    raw = sqlite3.connect(tmp_path / DB_FILENAME)
    raw.execute("PRAGMA user_version = 99")
    raw.close()
    with pytest.raises(UnsupportedError, match=re.escape(str(tmp_path / DB_FILENAME))):
        Store(tmp_path)


def test_migrations_are_atomic_and_append_only(tmp_path, monkeypatch):
    import nanoseek.serve.store as store_mod

    Store(tmp_path).close()  # a version-1 file
    add_table = "CREATE TABLE conversations (id INTEGER PRIMARY KEY)"
    monkeypatch.setattr(store_mod, "MIGRATIONS", [*store_mod.MIGRATIONS, (add_table, "NOT SQL")])
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with pytest.raises(BadInputError, match="syntax error"):
        Store(tmp_path)

    def version_and_tables():
        raw = sqlite3.connect(tmp_path / DB_FILENAME)
        try:
            return (raw.execute("PRAGMA user_version").fetchone()[0],
                    {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")})
        finally:
            raw.close()

    version, tables = version_and_tables()  # the failed migration left nothing behind
    assert version == SCHEMA_VERSION and "conversations" not in tables and "usage" in tables
    monkeypatch.setattr(store_mod, "MIGRATIONS", [*store_mod.MIGRATIONS[:-1], (add_table,)])
    Store(tmp_path).close()
    version, tables = version_and_tables()
    assert version == SCHEMA_VERSION + 1 and "conversations" in tables


def test_concurrent_writers_lose_no_rows(tmp_path):
    shared = Store(tmp_path)
    key_id, _ = shared.create_key("busy")
    threads, per_thread = 8, 40
    start = threading.Barrier(threads)
    errors = []

    def work(i: int) -> None:
        # Half the threads share one Store (one connection each), half open their own as separate
        # server processes would: both must queue on the write lock, not fail or drop rows.
        st = shared if i % 2 else Store(tmp_path)
        try:
            start.wait()
            for _ in range(per_thread):
                _use(st, key_id, cost=0.001, out=1)
                st.spent_usd(key_id)  # readers interleaved with writers
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    rows = shared.usage_rows(key=key_id)
    assert len(rows) == threads * per_thread and len({r.id for r in rows}) == len(rows)
    assert shared.spent_usd(key_id) == pytest.approx(threads * per_thread * 0.001)
    shared.close()


def test_budget_to_balance(store):
    key_id, _ = store.create_key("capped", budget_usd=1.0)
    assert store.balance(key_id) == {"is_available": True, "balance_infos": [
        {"currency": "USD", "total_balance": "1.00", "granted_balance": "1.00", "topped_up_balance": "0.00",
         "budget": "1.00", "spent": "0.00", "reserved": "0.00"}]}
    _use(store, key_id, cost=0.7)
    bal = store.balance(key_id)  # 1.0 - 0.7 is 0.30000000000000004 in floats; must not floor to 0.29
    assert bal["is_available"] and bal["balance_infos"][0]["total_balance"] == "0.30"
    _use(store, key_id, cost=0.295)
    info = store.balance(key_id)["balance_infos"][0]
    assert (info["total_balance"], info["spent"]) == ("0.00", "1.00")  # $0.005 left: balance down, spend up
    assert store.balance(key_id)["is_available"]
    _use(store, key_id, cost=0.105)  # the last request overshoots: no longer available, but never below 0
    bal = store.balance(key_id)
    assert not bal["is_available"] and bal["balance_infos"][0]["total_balance"] == "0.00"
    assert bal["balance_infos"][0]["spent"] == "1.10"
    assert store.remaining_usd(key_id) == pytest.approx(-0.1)
    assert store.spent_usd(key_id) == pytest.approx(1.1)

    free_id, _ = store.create_key("free")
    _use(store, free_id, cost=100.0)
    assert store.remaining_usd(free_id) is None
    zero_id, _ = store.create_key("zero", budget_usd=0)
    assert not store.balance(zero_id)["is_available"]
    rich_id, _ = store.create_key("revoked", budget_usd=50)
    store.revoke_key(rich_id)
    assert not store.balance(rich_id)["is_available"]
    with pytest.raises(NotFoundError):
        store.balance(12345)


def test_cost_by_hand(tmp_path):
    chat = PriceTable()  # deepseek-chat: $0.07 hit, $0.27 miss, $1.10 output per 1M tokens
    assert chat.cost(1_000_000, 0, 0) == pytest.approx(0.07)
    # 2000 × 0.07 + 3000 × 0.27 + 500 × 1.10 = 140 + 810 + 550 = 1500 micro-dollars
    assert chat.cost(2000, 3000, 500) == pytest.approx(0.0015)
    prices = Prices()
    # reasoner: 2000 × 0.14 + 3000 × 0.55 + 500 × 2.19 = 280 + 1650 + 1095 = 3025 micro-dollars
    assert prices.cost("deepseek-reasoner", 2000, 3000, 500) == pytest.approx(0.003025)
    assert prices.for_model("smollm2-135m") == chat  # unknown models fall back to the default

    (tmp_path / "p.toml").write_text('[default]\ninput_cache_hit = 0\ninput_cache_miss = 0.5\noutput = 2\n'
                                     '["my-model"]\ninput_cache_hit = 0.01\ninput_cache_miss = 0.1\noutput = 1\n')
    p = Prices.load(tmp_path / "p.toml")
    assert p.cost("anything", 1000, 1000, 1000) == pytest.approx((0 + 500 + 2000) / 1e6)
    assert p.cost("my-model", 1000, 1000, 1000) == pytest.approx((10 + 100 + 1000) / 1e6)
    assert p.for_model("deepseek-chat") == chat  # built-ins stay unless the file overrides them
    (tmp_path / "p.json").write_text('{"deepseek-chat": {"input_cache_hit": 1, "input_cache_miss": 2, '
                                     '"output": 3}}')
    assert Prices.load(tmp_path / "p.json").cost("deepseek-chat", 1, 1, 1) == pytest.approx(6e-6)

    for text in ('[m]\noutput = -1\n', '[m]\nouput = 1\n', 'not toml ['):
        (tmp_path / "bad.toml").write_text(text)
        with pytest.raises(BadInputError, match="bad.toml"):
            Prices.load(tmp_path / "bad.toml")
    with pytest.raises(NotFoundError):
        Prices.load(tmp_path / "missing.toml")


def test_usage_rows_and_summary(store):
    a, _ = store.create_key("a")
    b, _ = store.create_key("b")
    _use(store, a, cost=1.0, hit=10, miss=20, out=30, reasoning=5, ts=1000.0)
    _use(store, a, cost=2.0, hit=1, miss=2, out=3, ts=2000.0)
    _use(store, a, cost=4.0, model="deepseek-reasoner", out=7, ts=3000.0)
    _use(store, b, cost=8.0, out=1, ts=4000.0)
    _use(store, None, cost=0.5, out=2, ts=5000.0)  # served while the server had no keys

    assert [r.cost_usd for r in store.usage_rows()] == [1.0, 2.0, 4.0, 8.0, 0.5]
    assert [r.ts for r in store.usage_rows(key=a, since=2000.0)] == [2000.0, 3000.0]
    assert store.usage_rows(key=store.get_key(b).prefix)[0].prompt_tokens == 0
    assert store.usage_rows()[0].prompt_tokens == 30

    summary = {(s.key_id, s.model): s for s in store.usage_summary()}
    assert list(summary) == [(None, "deepseek-chat"), (a, "deepseek-chat"), (a, "deepseek-reasoner"),
                             (b, "deepseek-chat")]
    s = summary[(a, "deepseek-chat")]
    assert (s.key_name, s.requests, s.prompt_cache_hit_tokens, s.prompt_cache_miss_tokens, s.completion_tokens,
            s.reasoning_tokens, s.cost_usd, s.mean_latency_s) == ("a", 2, 11, 22, 33, 5, 3.0, 0.5)
    assert summary[(None, "deepseek-chat")].key_name is None
    assert [s.cost_usd for s in store.usage_summary(since=3500.0)] == [0.5, 8.0]
    assert store.spent_usd(None) == 0.5


def test_parse_since():
    assert parse_since("7d", now=1_000_000.0) == 1_000_000.0 - 7 * 86400
    assert parse_since("90m", now=10_000.0) == 10_000.0 - 5400
    assert parse_since("2026-11-01") == datetime(2026, 11, 1).timestamp()  # naive dates are local time
    assert parse_since("2026-11-01T00:00:00+00:00") == datetime.fromisoformat("2026-11-01T00:00+00:00").timestamp()
    with pytest.raises(BadInputError, match="yesterday"):
        parse_since("yesterday")


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_rate_limiter_requests_per_minute():
    clock = FakeClock()
    rl = RateLimiter(clock=clock)
    assert rl.check("k", rpm=2) is None
    clock.t = 10
    assert rl.check("k", rpm=2) is None
    clock.t = 20
    assert rl.check("k", rpm=2) == pytest.approx(40)  # the t=0 request leaves the window at t=60
    assert rl.check("k", rpm=2) == pytest.approx(40)  # rejections are not counted
    assert rl.check("other", rpm=2) is None  # keys are independent
    clock.t = 60
    assert rl.check("k", rpm=2) is None
    assert rl.check("k", rpm=2) == pytest.approx(10)  # now the t=10 one must leave
    assert all(rl.check("k") is None for _ in range(100))  # no limits, no waiting
    assert rl.check("k", rpm=1000) is None


def test_rate_limiter_tokens_per_minute():
    clock = FakeClock()
    rl = RateLimiter(clock=clock)
    assert rl.check(1, 60, tpm=100) is None
    clock.t = 30
    assert rl.check(1, 50, tpm=100) == pytest.approx(30)  # needs the t=0 tokens gone
    assert rl.check(1, 40, tpm=100) is None  # exactly fills the window
    clock.t = 31
    rl.settle(rl.reserve(1, 0, 0, tpm=100), 50)  # a request that used more than it held: window now holds 150
    clock.t = 59
    # 150 + 10 - 100 = 60 must leave: the t=0 event (60 tokens) is enough → at t=60
    assert rl.check(1, 10, tpm=100) == pytest.approx(1)
    clock.t = 60
    assert rl.check(1, 10, tpm=100) is None  # 40 + 50 + 10 = 100
    clock.t = 89
    # 100 + 20 - 100 = 20: the t=30 event (40) expires at t=90
    assert rl.check(1, 20, tpm=100) == pytest.approx(1)
    # both limits: the longer wait wins
    assert rl.check(1, 20, rpm=2, tpm=100) == pytest.approx(2)  # rpm: the t=31 request leaves at t=91
    assert rl.check(1, 0, rpm=1, tpm=100) == pytest.approx(31)  # the t=60 request holds the only slot
    with pytest.raises(RequestTooLarge, match="101 tokens"):
        rl.check(2, 101, tpm=100)
    with pytest.raises(ValueError):
        rl.check(2, 1, rpm=0)


def test_rate_limiter_holds_max_tokens_until_settled():
    """Finding 10: charging completions after the fact let parallel requests put 828 tokens through tpm=300.
    Holding prompt + max_tokens at admission keeps parallel admissions within the limit."""
    clock = FakeClock()
    rl = RateLimiter(clock=clock)
    holds = [rl.reserve("k", 20, 50, tpm=300) for _ in range(10)]   # 10 parallel requests of at most 70
    admitted = [h for h in holds if isinstance(h, Hold)]
    assert len(admitted) == 4 and all(h == pytest.approx(60) for h in holds[4:])   # 4 × 70 = 280
    clock.t = 5
    rl.settle(admitted[0], 30)   # it stopped early: 40 of its tokens come back at once
    assert rl.reserve("k", 20, 50, tpm=300) == pytest.approx(55)   # 240 + 70 > 300 still
    rl.settle(admitted[1], 30)
    late = rl.reserve("k", 20, 50, tpm=300)   # 200 + 70 = 270
    assert isinstance(late, Hold)
    for h in (*admitted[2:], late):
        rl.settle(h, 70)
    assert rl.check("k", 30, tpm=300) is None   # settled: 30 + 30 + 70 × 3 = 270 in the window, room for 30
    assert rl.check("k", 1, tpm=300) > 0
    # More than the whole tpm asked for: it holds the whole tpm, so it runs alone, and is not refused.
    clock.t = 100
    big = rl.reserve("k", 100, 8192, tpm=300)
    assert isinstance(big, Hold) and big.held == 300 and rl.reserve("k", 1, 1, tpm=300) > 0
    clock.t = 170   # a hold that outlived the window has counted a whole window: settling changes nothing
    rl.settle(big, 250)
    assert rl.check("k", 300, tpm=300) is None
    with pytest.raises(RequestTooLarge):
        rl.reserve("k", 301, 0, tpm=300)


def _run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_keys_and_usage_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps cells to the terminal; keep rows on one line
    d = str(tmp_path)
    rc, out, err = _run(capsys, "keys", "create", "--name", "alice", "--rpm", "60", "--budget", "5",
                        "--data-dir", d)
    assert rc == 0
    secret = out.strip()
    assert re.fullmatch(r"sk-ns-[A-Za-z0-9_-]{32,}", secret)  # stdout is the secret alone, for scripts
    assert "won't be shown again" in err and "alice" in err
    rc, out, _ = _run(capsys, "keys", "create", "--name", "[bold]bob", "--data-dir", d)  # markup stays literal
    bob = out.strip()

    with Store(tmp_path) as st:
        alice_id = st.authenticate(secret).id
        prefix = st.get_key(alice_id).prefix
        _use(st, alice_id, cost=0.0015, hit=2000, miss=3000, out=500, reasoning=100)
        _use(st, st.authenticate(bob).id, cost=0.25, model="deepseek-reasoner", out=7, ts=1_000_000.0)  # 1970-01-12

    rc, out, _ = _run(capsys, "keys", "list", "--data-dir", d)
    assert rc == 0 and "alice" in out and "[bold]bob" in out and prefix in out and "active" in out
    assert secret not in out and bob not in out

    rc, out, _ = _run(capsys, "usage", "--data-dir", d)
    assert rc == 0
    assert "alice" in out and "deepseek-chat" in out and "2,000" in out and "3,000" in out and "0.0015" in out
    assert "deepseek-reasoner" in out and "0.2515" in out  # the total row
    rc, out, _ = _run(capsys, "usage", "--since", "7d", "--data-dir", d)
    assert "deepseek-chat" in out and "deepseek-reasoner" not in out
    rc, out, _ = _run(capsys, "usage", "--key", "2", "--since", "1970-02-01", "--data-dir", d)
    assert "no usage recorded since 1970-02-01" in out
    rc, out, _ = _run(capsys, "usage", "--key", prefix, "--data-dir", d)
    assert "alice" in out and "bob" not in out

    rc, out, _ = _run(capsys, "keys", "revoke", prefix, "--data-dir", d)
    assert rc == 0 and out.startswith(f"revoked key {alice_id} (alice")
    rc, out, _ = _run(capsys, "keys", "revoke", str(alice_id), "--data-dir", d)
    assert out.startswith("already revoked")
    rc, out, _ = _run(capsys, "keys", "list", "--data-dir", d)
    assert "revoked" in out
    with Store(tmp_path) as st:
        assert st.authenticate(secret) is None and st.authenticate(bob) is not None

    rc, _, err = _run(capsys, "keys", "revoke", "sk-ns-nothere", "--data-dir", d)
    assert rc == NotFoundError.exit_code and err.startswith("nanoseek: error: no API key 'sk-ns-nothere'")
    rc, _, err = _run(capsys, "usage", "--since", "last week", "--data-dir", d)
    assert rc == BadInputError.exit_code and "30m, 12h, 7d, 2w" in err
    rc, _, err = _run(capsys, "keys", "create", "--name", "x", "--rpm", "0", "--data-dir", d)
    assert rc == BadInputError.exit_code and "rpm" in err


def test_cli_uses_nanoseek_home(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NANOSEEK_HOME", str(tmp_path / "home"))
    rc, out, _ = _run(capsys, "keys", "list")
    assert rc == 0 and out.startswith("no API keys")
    assert (tmp_path / "home" / DB_FILENAME).exists()
    rc, out, _ = _run(capsys, "usage")
    assert rc == 0 and out.startswith("no usage recorded")


def test_corrupt_database_names_the_file(tmp_path, capsys):
    path: Path = tmp_path / DB_FILENAME
    path.write_bytes(b"this is not an sqlite database\n" * 200)
    with pytest.raises(BadInputError, match=re.escape(str(path))) as e:
        Store(tmp_path)
    assert "not a readable nanoseek database" in str(e.value)
    rc, _, err = _run(capsys, "keys", "list", "--data-dir", str(tmp_path))
    assert rc == BadInputError.exit_code
    assert err.startswith(f"nanoseek: error: {path}: not a readable nanoseek database") and "Traceback" not in err
