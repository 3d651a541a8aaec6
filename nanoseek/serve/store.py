"""The server's embedded store: API keys, the usage ledger and prices, in one SQLite file.

Owns the data directory (`data_dir`), the schema and its migrations, and every read and write of
`nanoseek.db`. The HTTP server and the `nanoseek keys` / `nanoseek usage` commands both go through
`Store`; nothing else opens the file. Rate limiting is in-memory and lives in `limits.py`.

SQLite because the server is one machine and one process: no daemon to run, one file to back up,
and WAL mode lets readers (balance, usage) proceed while a writer records a request.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import sqlite3
import threading
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from datetime import datetime
from decimal import ROUND_FLOOR, Decimal
from pathlib import Path

from nanoseek.errors import BadInputError, NotFoundError, UnsupportedError

DB_FILENAME = "nanoseek.db"
SECRET_PREFIX = "sk-ns-"
DISPLAY_PREFIX_LEN = len(SECRET_PREFIX) + 8  # "sk-ns-AbCd1234": enough to tell keys apart, 48 of 256 bits
BUSY_TIMEOUT_MS = 5000  # writes are single short transactions; 5 s of contention means something is stuck


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """Where nanoseek keeps its state: `explicit`, else $NANOSEEK_HOME, else ~/.nanoseek. Not created here."""
    if explicit:
        return Path(explicit).expanduser()
    if env := os.environ.get("NANOSEEK_HOME"):
        return Path(env).expanduser()
    return Path.home() / ".nanoseek"


# ---------------------------------------------------------------------------------------------- prices

@dataclass(frozen=True)
class PriceTable:
    """USD per 1M tokens, in DeepSeek's three columns. Defaults: deepseek-chat from Feb 8 2025."""

    input_cache_hit: float = 0.07
    input_cache_miss: float = 0.27
    output: float = 1.10

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise BadInputError(f"price {f.name} must be a non-negative number of USD per 1M tokens, "
                                    f"got {v!r}")

    def cost(self, cache_hit_tokens: int, cache_miss_tokens: int, output_tokens: int) -> float:
        """USD for one request. Output includes reasoning tokens: DeepSeek bills the CoT as output."""
        return (cache_hit_tokens * self.input_cache_hit + cache_miss_tokens * self.input_cache_miss
                + output_tokens * self.output) / 1_000_000


# DeepSeek's published prices (R1 launch). Off-peak discounts are not modelled: a local server
# charges the same around the clock.
DEEPSEEK_PRICES = {
    "deepseek-chat": PriceTable(0.07, 0.27, 1.10),
    "deepseek-reasoner": PriceTable(0.14, 0.55, 2.19),
}


@dataclass
class Prices:
    """Model name → PriceTable, with a fallback for models not listed."""

    models: dict[str, PriceTable] = field(default_factory=lambda: dict(DEEPSEEK_PRICES))
    default: PriceTable = field(default_factory=PriceTable)

    def for_model(self, model: str) -> PriceTable:
        return self.models.get(model, self.default)

    def cost(self, model: str, cache_hit_tokens: int, cache_miss_tokens: int, output_tokens: int) -> float:
        return self.for_model(model).cost(cache_hit_tokens, cache_miss_tokens, output_tokens)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Prices:
        """Read a .toml or .json file of tables keyed by model name; a table named "default" is the fallback.

            [default]
            input_cache_hit = 0.07
            input_cache_miss = 0.27
            output = 1.10
            ["deepseek-reasoner"]
            input_cache_hit = 0.14  # ...

        Models in the file replace or add to DeepSeek's built-in prices.
        """
        path = Path(path)
        try:
            text = path.read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"{path}: price file not found") from None
        try:
            data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text.decode())
        except (ValueError, UnicodeDecodeError) as e:  # both JSON and TOML decode errors are ValueErrors
            raise BadInputError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {e}") from None
        if not isinstance(data, dict):
            raise BadInputError(f"{path}: expected a table of models")
        prices = cls()
        known = {f.name for f in fields(PriceTable)}
        for model, table in data.items():
            if not isinstance(table, dict) or set(table) - known:
                raise BadInputError(f"{path}: [{model}] must hold only {', '.join(sorted(known))}")
            try:
                pt = PriceTable(**table)
            except BadInputError as e:
                raise BadInputError(f"{path}: [{model}] {e}") from None
            if model == "default":
                prices.default = pt
            else:
                prices.models[model] = pt
        return prices


# --------------------------------------------------------------------------------------------- records

@dataclass(frozen=True)
class KeyRecord:
    """An API key as stored: everything but the secret, which is never kept."""

    id: int
    name: str
    prefix: str  # the secret's first characters, safe to display
    rpm: int | None
    tpm: int | None
    budget_usd: float | None  # None: unlimited
    created_at: float  # unix seconds
    revoked_at: float | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


@dataclass(frozen=True)
class UsageRow:
    """One served request. Token fields follow DeepSeek's usage object; reasoning ⊆ completion."""

    id: int
    key_id: int | None  # None: served while the server ran without keys
    ts: float
    model: str
    prompt_cache_hit_tokens: int
    prompt_cache_miss_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    latency_s: float
    finish_reason: str | None
    cost_usd: float

    @property
    def prompt_tokens(self) -> int:
        return self.prompt_cache_hit_tokens + self.prompt_cache_miss_tokens


@dataclass(frozen=True)
class UsageSummary:
    """Usage totals for one (key, model) pair."""

    key_id: int | None
    key_name: str | None
    key_prefix: str | None
    model: str
    requests: int
    prompt_cache_hit_tokens: int
    prompt_cache_miss_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cost_usd: float
    mean_latency_s: float


_KEY_COLS = "id, name, prefix, rpm, tpm, budget_usd, created_at, revoked_at"
_USAGE_COLS = ("id, key_id, ts, model, prompt_cache_hit_tokens, prompt_cache_miss_tokens, completion_tokens, "
               "reasoning_tokens, latency_s, finish_reason, cost_usd")


# ---------------------------------------------------------------------------------------------- schema

# MIGRATIONS[i] takes a database from schema version i to i + 1 (kept in `PRAGMA user_version`,
# which lives in the file header, so reading it needs no table). Append, never edit a shipped entry:
# files in the wild have already run it.
MIGRATIONS: list[tuple[str, ...]] = [
    (  # 0 → 1: keys and the usage ledger
        """CREATE TABLE api_keys (
            id          INTEGER PRIMARY KEY,
            name        TEXT NOT NULL,
            prefix      TEXT NOT NULL,
            secret_hash BLOB NOT NULL UNIQUE,   -- sha256(secret); see Store.create_key
            rpm         INTEGER,
            tpm         INTEGER,
            budget_usd  REAL,
            created_at  REAL NOT NULL,
            revoked_at  REAL
        )""",
        # Keys are revoked, never deleted, so the ledger's foreign key keeps every row attributable.
        """CREATE TABLE usage (
            id                       INTEGER PRIMARY KEY,
            key_id                   INTEGER REFERENCES api_keys(id),
            ts                       REAL NOT NULL,
            model                    TEXT NOT NULL,
            prompt_cache_hit_tokens  INTEGER NOT NULL,
            prompt_cache_miss_tokens INTEGER NOT NULL,
            completion_tokens        INTEGER NOT NULL,
            reasoning_tokens         INTEGER NOT NULL,
            latency_s                REAL NOT NULL,
            finish_reason            TEXT,
            cost_usd                 REAL NOT NULL
        )""",
        "CREATE INDEX usage_by_key_ts ON usage(key_id, ts)",
        "CREATE INDEX usage_by_ts ON usage(ts)",
    ),
    # 1 → 2 will be the chat web app's conversations and messages tables; add them as a new entry here.
]
SCHEMA_VERSION = len(MIGRATIONS)


def migrate(conn: sqlite3.Connection, path: Path) -> int:
    """Bring the open database up to SCHEMA_VERSION; returns the version it found.

    Runs in one IMMEDIATE transaction and re-reads the version inside it, so two processes opening a
    new file at once apply each migration exactly once (the loser waits, then finds nothing to do).
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        found = conn.execute("PRAGMA user_version").fetchone()[0]
        if found > SCHEMA_VERSION:
            raise UnsupportedError(f"{path}: schema version {found} is newer than this nanoseek understands "
                                   f"({SCHEMA_VERSION}); upgrade nanoseek")
        for version in range(found, SCHEMA_VERSION):
            for statement in MIGRATIONS[version]:
                conn.execute(statement)  # not executescript: it would COMMIT our transaction midway
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")  # in the header page: rolls back with the rest
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise
    return found


def _rollback(conn: sqlite3.Connection) -> None:
    """Leave no transaction open behind a failure, or the connection's next BEGIN would fail too."""
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # the error being raised says more than this one


def _db_error(path: Path, e: sqlite3.Error) -> BadInputError:
    msg = str(e)
    if "not a database" in msg or "malformed" in msg:
        return BadInputError(f"{path}: not a readable nanoseek database ({msg}); move it aside to start afresh")
    return BadInputError(f"{path}: {msg}")


# ----------------------------------------------------------------------------------------------- store

class Store:
    """Keys, usage and balances in `<data dir>/nanoseek.db`. Safe to share across threads.

    Each thread gets its own connection (sqlite3 connections must not be used concurrently), all in
    autocommit mode; every write is one explicit BEGIN IMMEDIATE … COMMIT, which takes the write
    lock up front so concurrent writers queue on busy_timeout instead of failing on lock upgrade.
    """

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        self.dir = data_dir(directory)
        self.path = self.dir / DB_FILENAME
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []  # every thread's connection, so close() reaches them all
        self._conns_lock = threading.Lock()
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not self.path.exists():
                # Create it ourselves so it starts owner-only: it holds key hashes and everyone's usage.
                # SQLite gives the -wal and -shm files the same permissions.
                os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        except OSError as e:
            raise BadInputError(f"{e.filename or self.dir}: cannot create the data directory "
                                f"({e.strerror})") from None
        # Open and migrate now, so a bad file fails at startup rather than on the first request.
        with self._tx(write=False) as c:
            migrate(c, self.path)

    # --- connections and transactions

    def _conn(self) -> sqlite3.Connection:
        c = getattr(self._local, "conn", None)
        if c is None:
            # isolation_level=None: no implicit BEGINs, we issue our own. check_same_thread=False only so
            # close() may close other threads' connections; each is still used by its own thread alone.
            c = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            try:
                c.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                c.execute("PRAGMA journal_mode = WAL")  # persistent in the file; cheap to repeat
                c.execute("PRAGMA foreign_keys = ON")  # per connection, off by default
                # WAL + NORMAL: never corrupt, no fsync per commit; an OS crash may drop the last few commits.
                c.execute("PRAGMA synchronous = NORMAL")
            except BaseException:
                c.close()
                raise
            self._local.conn = c
            with self._conns_lock:
                self._conns.append(c)
        return c

    @contextmanager
    def _tx(self, write: bool) -> Iterator[sqlite3.Connection]:
        """A connection for this thread; `write` wraps the block in one transaction. Maps SQLite failures."""
        try:
            c = self._conn()
            if write:
                c.execute("BEGIN IMMEDIATE")
            try:
                yield c
                if write:
                    c.execute("COMMIT")
            except BaseException:
                _rollback(c)
                raise
        except sqlite3.DatabaseError as e:
            # Corruption, locks and I/O are the user's to fix and get one line naming the file;
            # integrity and programming errors are our bugs and keep their traceback.
            if type(e) in (sqlite3.DatabaseError, sqlite3.OperationalError):
                raise _db_error(self.path, e) from e
            raise

    def close(self) -> None:
        """Close every thread's connection (call when no thread is mid-call). Later calls reopen lazily."""
        with self._conns_lock:
            for c in self._conns:
                c.close()
            self._conns.clear()
        self._local = threading.local()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def schema_version(self) -> int:
        with self._tx(write=False) as c:
            return c.execute("PRAGMA user_version").fetchone()[0]

    def journal_mode(self) -> str:
        with self._tx(write=False) as c:
            return c.execute("PRAGMA journal_mode").fetchone()[0]

    # --- keys

    @staticmethod
    def _hash(secret: str) -> bytes:
        # Plain sha256, no salt or slow KDF: those exist to make guessing low-entropy passwords
        # expensive. Our secrets are 256 random bits, beyond brute force with any hash, and an
        # unsalted digest can be looked up by index instead of trying every key on every request.
        return hashlib.sha256(secret.encode()).digest()

    def create_key(self, name: str, rpm: int | None = None, tpm: int | None = None,
                   budget_usd: float | None = None) -> tuple[int, str]:
        """Returns (key id, secret). The secret exists only in this return value: show it once."""
        name = (name or "").strip()
        if not name:
            raise BadInputError("a key needs a non-empty name")
        for label, v in (("rpm", rpm), ("tpm", tpm)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise BadInputError(f"{label} must be a whole number ≥ 1 (leave it out for no limit), got {v!r}")
        if budget_usd is not None and (isinstance(budget_usd, bool) or not isinstance(budget_usd, (int, float))
                                       or not math.isfinite(budget_usd) or budget_usd < 0):
            raise BadInputError(f"budget must be a non-negative amount of USD, got {budget_usd!r}")
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)  # 32 random bytes → 43 url-safe characters
        with self._tx(write=True) as c:
            cur = c.execute("INSERT INTO api_keys (name, prefix, secret_hash, rpm, tpm, budget_usd, created_at) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (name, secret[:DISPLAY_PREFIX_LEN], self._hash(secret), rpm, tpm,
                             None if budget_usd is None else float(budget_usd), time.time()))
        return cur.lastrowid, secret

    def authenticate(self, secret: str) -> KeyRecord | None:
        """The live key whose secret this is, or None (unknown, revoked, or not a string).

        Timing-safe without compare_digest: the lookup compares sha256 digests, and an attacker who
        learned how many leading digest bytes matched learns nothing usable about any secret.
        """
        if not isinstance(secret, str) or not secret:
            return None
        with self._tx(write=False) as c:
            row = c.execute(f"SELECT {_KEY_COLS} FROM api_keys WHERE secret_hash = ? AND revoked_at IS NULL",
                            (self._hash(secret),)).fetchone()
        return KeyRecord(*row) if row else None

    def get_key(self, key_id: int) -> KeyRecord | None:
        with self._tx(write=False) as c:
            row = c.execute(f"SELECT {_KEY_COLS} FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        return KeyRecord(*row) if row else None

    def find_key(self, id_or_prefix: int | str) -> KeyRecord:
        """A key by id ("3"), displayed prefix ("sk-ns-AbCd1234") or whole secret. NotFoundError otherwise."""
        ref = str(id_or_prefix).strip().rstrip("…")  # `keys list` shows prefixes with an ellipsis
        with self._tx(write=False) as c:
            if ref.isdigit():
                rows = c.execute(f"SELECT {_KEY_COLS} FROM api_keys WHERE id = ?", (int(ref),)).fetchall()
            else:
                rows = c.execute(f"SELECT {_KEY_COLS} FROM api_keys WHERE secret_hash = ?",
                                 (self._hash(ref),)).fetchall()
                rows = rows or c.execute(f"SELECT {_KEY_COLS} FROM api_keys WHERE prefix = ? ORDER BY id",
                                         (ref,)).fetchall()
        if not rows:
            raise NotFoundError(f"no API key {ref!r} (give an id or prefix from `nanoseek keys list`)")
        if len(rows) > 1:  # two keys sharing 48 random bits: possible in principle, so say so
            raise BadInputError(f"prefix {ref!r} matches keys {', '.join(str(r[0]) for r in rows)}; give the id")
        return KeyRecord(*rows[0])

    def list_keys(self) -> list[KeyRecord]:
        """All keys, revoked ones included, oldest first."""
        with self._tx(write=False) as c:
            return [KeyRecord(*r) for r in c.execute(f"SELECT {_KEY_COLS} FROM api_keys ORDER BY id")]

    def revoke_key(self, id_or_prefix: int | str) -> KeyRecord:
        """Revoke a key (idempotent: a revoked key keeps its first revocation time); returns it as now stored."""
        key = self.find_key(id_or_prefix)
        with self._tx(write=True) as c:
            c.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                      (time.time(), key.id))
        return self.get_key(key.id)

    def any_keys(self) -> bool:
        """Whether the server must demand a key. Revoked keys count: revoking the last key must not
        quietly turn an authenticated server into an open one."""
        with self._tx(write=False) as c:
            return c.execute("SELECT EXISTS (SELECT 1 FROM api_keys)").fetchone()[0] == 1

    # --- usage ledger

    def record_usage(self, key_id: int | None, model: str, prompt_cache_hit_tokens: int,
                     prompt_cache_miss_tokens: int, completion_tokens: int, reasoning_tokens: int,
                     latency_s: float, finish_reason: str | None, cost_usd: float, *,
                     ts: float | None = None) -> int:
        """Append one served request to the ledger; returns its row id. `ts` defaults to now."""
        counts = (prompt_cache_hit_tokens, prompt_cache_miss_tokens, completion_tokens, reasoning_tokens)
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in counts):
            raise ValueError(f"token counts must be non-negative ints, got {counts}")
        try:
            with self._tx(write=True) as c:
                cur = c.execute(f"INSERT INTO usage ({_USAGE_COLS.removeprefix('id, ')}) "
                                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                (key_id, time.time() if ts is None else ts, model, *counts, float(latency_s),
                                 finish_reason, float(cost_usd)))
        except sqlite3.IntegrityError:  # the foreign key: no such key id
            raise NotFoundError(f"no API key with id {key_id}") from None
        return cur.lastrowid

    def spent_usd(self, key_id: int | None) -> float:
        with self._tx(write=False) as c:
            return c.execute("SELECT COALESCE(SUM(cost_usd), 0.0) FROM usage WHERE key_id IS ?",
                             (key_id,)).fetchone()[0]

    def remaining_usd(self, key_id: int) -> float | None:
        """Budget minus spend (negative once a final request overshoots), or None for an unlimited key."""
        key = self.get_key(key_id)
        if key is None:
            raise NotFoundError(f"no API key with id {key_id}")
        return None if key.budget_usd is None else key.budget_usd - self.spent_usd(key_id)

    def balance(self, key_id: int) -> dict | None:
        """The key's remaining budget as DeepSeek's GET /user/balance body, or None for an unlimited key.

        The budget is reported as granted balance (DeepSeek spends grants first and we have no
        top-ups). Amounts are strings with two decimals, rounded down so they never overstate.
        """
        remaining = self.remaining_usd(key_id)
        if remaining is None:
            return None
        # Round to micro-dollars first so float noise (0.30000000004) can't floor a cent away.
        amount = str(Decimal(f"{remaining:.6f}").quantize(Decimal("0.01"), rounding=ROUND_FLOOR))
        return {"is_available": remaining > 0 and not self.get_key(key_id).revoked,
                "balance_infos": [{"currency": "USD", "total_balance": amount, "granted_balance": amount,
                                   "topped_up_balance": "0.00"}]}

    def _usage_filter(self, key: int | str | None, since: float | str | datetime | None) -> tuple[str, list]:
        where, args = [], []
        if key is not None:
            where.append("u.key_id = ?")
            args.append(self.find_key(key).id)
        if since is not None:
            where.append("u.ts >= ?")
            args.append(since_timestamp(since))
        return (" WHERE " + " AND ".join(where)) if where else "", args

    def usage_rows(self, key: int | str | None = None,
                   since: float | str | datetime | None = None) -> list[UsageRow]:
        """Ledger rows, oldest first. `key`: id or prefix; `since`: unix time, datetime or parse_since text."""
        where, args = self._usage_filter(key, since)
        cols = ", ".join("u." + col for col in _USAGE_COLS.split(", "))
        with self._tx(write=False) as c:
            rows = c.execute(f"SELECT {cols} FROM usage u{where} ORDER BY u.ts, u.id", args).fetchall()
        return [UsageRow(*r) for r in rows]

    def usage_summary(self, key: int | str | None = None,
                      since: float | str | datetime | None = None) -> list[UsageSummary]:
        """Totals per (key, model), requests without a key first; same filters as usage_rows."""
        where, args = self._usage_filter(key, since)
        with self._tx(write=False) as c:
            rows = c.execute(
                "SELECT u.key_id, k.name, k.prefix, u.model, COUNT(*), SUM(u.prompt_cache_hit_tokens), "
                "SUM(u.prompt_cache_miss_tokens), SUM(u.completion_tokens), SUM(u.reasoning_tokens), "
                "SUM(u.cost_usd), AVG(u.latency_s) "
                f"FROM usage u LEFT JOIN api_keys k ON k.id = u.key_id{where} "
                "GROUP BY u.key_id, u.model ORDER BY u.key_id, u.model", args).fetchall()
        return [UsageSummary(*r) for r in rows]


# ------------------------------------------------------------------------------------------------ time

_AGE = re.compile(r"(\d+(?:\.\d+)?)\s*([mhdw])")
_AGE_UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, now: float | None = None) -> float:
    """'7d' / '12h' / '30m' / '2w' ago, or an ISO date/time ('2026-11-01', naive = local time) → unix time."""
    text = text.strip()
    if m := _AGE.fullmatch(text):
        return (time.time() if now is None else now) - float(m[1]) * _AGE_UNITS[m[2]]
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise BadInputError(f"since {text!r}: expected a date (2026-11-01), a time (2026-11-01T09:30) "
                            "or an age (30m, 12h, 7d, 2w)") from None


def since_timestamp(since: float | str | datetime) -> float:
    if isinstance(since, datetime):
        return since.timestamp()
    if isinstance(since, str):
        return parse_since(since)
    return float(since)
