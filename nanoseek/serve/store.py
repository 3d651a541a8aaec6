"""The server's embedded store: API keys, the usage ledger, budgets and their reservations, per-key
quotas, and the tables of the chat web app, in one SQLite file.

Owns the data directory (`data_dir`), the schema and its migrations, every connection to `nanoseek.db`
and the money arithmetic. The HTTP server, `conversations.py` (through `Store.read`/`Store.write`) and
the `nanoseek keys` / `nanoseek usage` commands all go through `Store`; nothing else opens the file.
Rate limiting is in-memory and lives in `limits.py`.

SQLite because the server is one machine and one process: no daemon to run, one file to back up,
and WAL mode lets readers (balance, usage) proceed while a writer records a request.

Budgets, in one paragraph (finding 1 of issue 13: 50 parallel requests all passed a check that read the
spend before any of them was billed). A generating request *reserves* its worst-case cost at admission
(`reserve`): in one BEGIN IMMEDIATE transaction the store reads budget − spent − every outstanding
reservation and inserts a reservation row, so parallel admissions queue on the write lock and cannot
all see the same remaining money. When the remainder is below the worst case, the grant is *clamped*:
`max_tokens` shrinks to what the budget covers (the response then ends with finish_reason "length"),
and only a request that cannot afford its prompt plus one output token per choice is refused
(InsufficientBalanceError → 402). Clamping rather than refusing lets a key spend its last cents, and a
client asking for max_tokens=8192 out of habit is not refused while it could still get an answer.
The request ends with `settle` (usage row written and reservation deleted in one transaction) or
`release` (it never ran). Money is compared in integer nano-dollars, so float noise cannot let a sixth
request through a budget of exactly five, and a balance is clamped at 0 and floored to cents.

Crashes (finding 9). A reservation row carries a progress count (`progress`), and it belongs to the
*session* of the Store that made it. A live session holds an exclusive flock on
`<data dir>/live/<session>.lock`; the kernel drops it when the process dies, kill -9 included. Every
Store open (server start, `nanoseek usage`) bills the reservations of dead sessions as usage rows with
finish_reason "interrupted" and deletes them in the same transaction, so each is billed exactly once,
and a CLI run beside a live server leaves the server's reservations alone.
"""

from __future__ import annotations

import fcntl
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
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, fields
from datetime import datetime
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_EVEN, Decimal
from pathlib import Path

from nanoseek.errors import (BadInputError, InsufficientBalanceError, NotFoundError, QuotaExceededError,
                             UnsupportedError)

DB_FILENAME = "nanoseek.db"
SECRET_PREFIX = "sk-ns-"
DISPLAY_PREFIX_LEN = len(SECRET_PREFIX) + 8  # "sk-ns-AbCd1234": enough to tell keys apart, 48 of 256 bits
BUSY_TIMEOUT_MS = 5000  # writes are single short transactions; 5 s of contention means something is stuck
LIVE_DIR = "live"  # <data dir>/live/<session>.lock: one per Store that holds reservations (see the docstring)
INTERRUPTED = "interrupted"  # finish_reason of a request billed at restart because its server died under it
ROW_OVERHEAD_BYTES = 64  # charged per stored row on top of its text, so a flood of empty rows is metered too
NANO_PER_USD = 10**9
_NANO, _CENT = Decimal("1e-9"), Decimal("0.01")


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
        return float(self.exact_cost(cache_hit_tokens, cache_miss_tokens, output_tokens))

    def exact_cost(self, cache_hit_tokens: int, cache_miss_tokens: int, output_tokens: int) -> Decimal:
        """The same cost as an exact Decimal: each price is read as the decimal it was written as (0.27,
        not 0.2700000000000000177…), so budget arithmetic has no float noise."""
        return (cache_hit_tokens * _dec(self.input_cache_hit) + cache_miss_tokens * _dec(self.input_cache_miss)
                + output_tokens * _dec(self.output)) / 1_000_000


def _dec(x: float) -> Decimal:
    return Decimal(repr(float(x)))


def to_nano(usd: float | Decimal, rounding: str = ROUND_HALF_EVEN) -> int:
    """USD → integer nano-dollars, the unit budgets are compared in (DeepSeek prices are whole multiples of
    1e-8 USD per token, so their costs convert exactly)."""
    return int((usd if isinstance(usd, Decimal) else _dec(usd)).quantize(_NANO, rounding=rounding) * NANO_PER_USD)


def cents(nano: int, rounding: str = ROUND_FLOOR) -> str:
    """Nano-dollars → DeepSeek's money string ("0.30"). Balances round down (never overstate what is left),
    spend rounds up (never understate it), so balance + spend = budget for a budget in whole cents."""
    return str((Decimal(nano) / NANO_PER_USD).quantize(_CENT, rounding=rounding))


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


@dataclass(frozen=True)
class Reservation:
    """Money held for one generating request, from `Store.reserve` until `settle` or `release`."""

    id: int
    key_id: int | None
    model: str
    prompt_tokens: int
    choices: int  # sequences generated (n, or prompts × n): each may run to max_tokens
    requested_max_tokens: int
    max_tokens: int  # granted, per choice: the request's, or fewer when the budget covers fewer
    reserved_usd: float  # the grant's worst case: every prompt token a cache miss, every choice at max_tokens
    prices: PriceTable  # fixed at admission: settle and a restart bill at these
    created_at: float  # unix seconds

    @property
    def clamped(self) -> bool:
        return self.max_tokens < self.requested_max_tokens


@dataclass(frozen=True)
class StoreLimits:
    """Quotas the store enforces inside its own write transactions."""

    # Conversations (and whatever else is stored for a caller, e.g. stored responses) per API key, and
    # for the open server's local user. None: no cap.
    stored_bytes_per_owner: int | None = 64 * 2**20
    # How long a stored Responses-API response (POST /v1/responses with store: true) is kept; OpenAI keeps
    # them 30 days. Expired ones are deleted, and their bytes freed, on the owner's next store or read.
    response_retention_s: float = 30 * 86400

    def __post_init__(self) -> None:
        v = self.stored_bytes_per_owner
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise BadInputError(f"stored_bytes_per_owner must be a whole number of bytes ≥ 0, got {v!r}")
        r = self.response_retention_s
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not r > 0 or math.isinf(r):
            raise BadInputError(f"response retention must be a positive number of seconds, got {r!r}")


def stored_size(*texts: str | None) -> int:
    """What one stored row counts against its owner's quota: its UTF-8 text plus ROW_OVERHEAD_BYTES.
    (Migration 2 → 3 computes the same rule in SQL for rows written before quotas existed.)"""
    return ROW_OVERHEAD_BYTES + sum(len(t.encode("utf-8")) for t in texts if t)


def _owner(key_id: int | None) -> int:
    """owner_totals' key: the key id, or 0 for the open server's local user (key ids start at 1).
    A plain integer rather than NULL so the row is unique and upsertable."""
    return 0 if key_id is None else key_id


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
    (  # 1 → 2: the chat web app's conversations (serve/conversations.py holds their logic). IF NOT EXISTS:
        # before this entry, conversations.py created these same tables itself, so files at version 1 may
        # already hold them, with data, and must keep both.
        """CREATE TABLE IF NOT EXISTS web_conversations (
            id            TEXT PRIMARY KEY,                 -- random, so ids say nothing about other users' chats
            key_id        INTEGER REFERENCES api_keys(id),  -- NULL: the local user of a server without keys
            title         TEXT NOT NULL,
            model         TEXT,                             -- NULL: the server's default model
            system_prompt TEXT NOT NULL DEFAULT '',
            temperature   REAL,                             -- NULL: the server's default
            deepthink     INTEGER NOT NULL DEFAULT 0,
            created_at    REAL NOT NULL,
            updated_at    REAL NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS web_conversations_by_owner ON web_conversations(key_id, updated_at)",
        # AUTOINCREMENT: ids are never reused after a regenerate deletes the tail, so a stale client id can
        # only miss, never hit a newer message.
        """CREATE TABLE IF NOT EXISTS web_messages (
            id              INTEGER PRIMARY KEY AUTOINCREMENT,
            conversation_id TEXT NOT NULL REFERENCES web_conversations(id) ON DELETE CASCADE,
            role            TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
            content         TEXT NOT NULL,
            reasoning       TEXT,                           -- the reply's reasoning_content, if any
            stats           TEXT,                           -- JSON: usage, timings, model, finish reason
            created_at      REAL NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS web_messages_by_conversation ON web_messages(conversation_id, id)",
    ),
    (  # 2 → 3: budget reservations, per-owner running totals, and stored sizes for the storage quota
        """CREATE TABLE reservations (
            id               INTEGER PRIMARY KEY,
            key_id           INTEGER REFERENCES api_keys(id),  -- NULL: the open server's local user
            session          TEXT NOT NULL,     -- the Store holding it; dead sessions are billed at open
            model            TEXT NOT NULL,
            prompt_tokens    INTEGER NOT NULL,
            choices          INTEGER NOT NULL,
            max_tokens       INTEGER NOT NULL,  -- granted, per choice
            price_hit        REAL NOT NULL,     -- USD per 1M tokens at admission: what settle/restart bill at
            price_miss       REAL NOT NULL,
            price_output     REAL NOT NULL,
            reserved_nano    INTEGER NOT NULL,  -- worst-case cost in 1e-9 USD, held against the budget
            generated_tokens INTEGER NOT NULL DEFAULT 0,  -- progress, for billing a request its server died under
            reasoning_tokens INTEGER NOT NULL DEFAULT 0,
            created_at       REAL NOT NULL,
            updated_at       REAL NOT NULL
        )""",
        "CREATE INDEX reservations_by_key ON reservations(key_id)",
        "CREATE INDEX reservations_by_session ON reservations(session)",
        # One row per owner (0: the local user), kept in step by every write that changes them, in the same
        # transaction. Counters, not SUMs: at 100k usage rows SUM(cost_usd) took 24 ms and at a 64 MiB owner
        # SUM(size) 15 ms, both held under the write lock on every admission or append.
        """CREATE TABLE owner_totals (
            owner        INTEGER PRIMARY KEY,       -- api_keys.id, or 0 for the local user
            spent_nano   INTEGER NOT NULL DEFAULT 0,  -- SUM(usage.cost_usd) in 1e-9 USD
            stored_bytes INTEGER NOT NULL DEFAULT 0   -- SUM(size) of everything stored for the owner
        )""",
        "ALTER TABLE web_conversations ADD COLUMN size INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE web_messages ADD COLUMN size INTEGER NOT NULL DEFAULT 0",
        # stored_size() for the rows already there (CAST AS BLOB: length in UTF-8 bytes, not characters).
        """UPDATE web_conversations SET size = 64 + length(CAST(title AS BLOB))
            + IFNULL(length(CAST(model AS BLOB)), 0) + length(CAST(system_prompt AS BLOB))""",
        """UPDATE web_messages SET size = 64 + length(CAST(content AS BLOB))
            + IFNULL(length(CAST(reasoning AS BLOB)), 0) + IFNULL(length(CAST(stats AS BLOB)), 0)""",
        """INSERT INTO owner_totals (owner, spent_nano, stored_bytes)
            SELECT owner, SUM(spent), SUM(stored) FROM (
                SELECT IFNULL(key_id, 0) AS owner, CAST(ROUND(SUM(cost_usd) * 1e9) AS INTEGER) AS spent,
                       0 AS stored FROM usage GROUP BY 1
                UNION ALL
                SELECT IFNULL(key_id, 0), 0, SUM(size) FROM web_conversations GROUP BY 1
                UNION ALL
                SELECT IFNULL(c.key_id, 0), 0, SUM(m.size) FROM web_messages m
                    JOIN web_conversations c ON c.id = m.conversation_id GROUP BY 1
            ) GROUP BY owner""",
    ),
    (  # 3 → 4: stored Responses-API responses (serve/responses.py), and secrets the server keeps
        """CREATE TABLE responses (
            id         TEXT PRIMARY KEY,                 -- resp_… (random)
            key_id     INTEGER REFERENCES api_keys(id),  -- NULL: the open server's local user
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            size       INTEGER NOT NULL,                 -- stored_size(body, history): counted in owner_totals
            body       TEXT NOT NULL,                    -- JSON: the response object as it was returned
            history    TEXT NOT NULL                     -- JSON: the chat messages it answered, then its reply
        )""",
        "CREATE INDEX responses_by_owner_expiry ON responses(key_id, expires_at)",
        # name → random bytes made on first use, e.g. the HMAC key that signs Anthropic thinking blocks, so
        # that a signature stays valid across restarts of the server that made it.
        "CREATE TABLE server_secrets (name TEXT PRIMARY KEY, value BLOB NOT NULL)",
    ),
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


def _insert_usage(c: sqlite3.Connection, key_id: int | None, model: str, hit: int, miss: int, completion: int,
                  reasoning: int, latency_s: float, finish_reason: str | None, cost_nano: int, ts: float) -> int:
    """The one way a usage row is written: the row and the owner's running spend, in the caller's transaction."""
    counts = (hit, miss, completion, reasoning)
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in counts):
        raise ValueError(f"token counts must be non-negative ints, got {counts}")
    cur = c.execute(f"INSERT INTO usage ({_USAGE_COLS.removeprefix('id, ')}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (key_id, ts, model, *counts, float(latency_s), finish_reason, cost_nano / NANO_PER_USD))
    c.execute("INSERT INTO owner_totals (owner, spent_nano) VALUES (?, ?) ON CONFLICT (owner) "
              "DO UPDATE SET spent_nano = spent_nano + excluded.spent_nano", (_owner(key_id), cost_nano))
    return cur.lastrowid


def _spent_nano(c: sqlite3.Connection, key_id: int | None) -> int:
    row = c.execute("SELECT spent_nano FROM owner_totals WHERE owner = ?", (_owner(key_id),)).fetchone()
    return row[0] if row else 0


def _held_nano(c: sqlite3.Connection, key_id: int | None) -> int:
    """Money held by the key's reservations in flight (a handful of rows: only running requests)."""
    return c.execute("SELECT COALESCE(SUM(reserved_nano), 0) FROM reservations WHERE key_id IS ?",
                     (key_id,)).fetchone()[0]


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


_SESSION = re.compile(r"[0-9a-f]{32}")


@contextmanager
def _lock_if_dead(live: Path, session: str) -> Iterator[bool]:
    """Yields whether `session`'s owner is dead, holding its lock file (then removed) while the caller
    bills it. A live owner holds an exclusive flock on it, which the kernel drops at its death; a missing
    file means the owner is long gone. Locks, not pids: a container restarts its server as pid 1 again."""
    if not _SESSION.fullmatch(session):  # not one of ours (a hand-edited file): nothing can be holding it
        yield True
        return
    path = live / f"{session}.lock"
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        yield True
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
        path.unlink(missing_ok=True)  # under the lock: a later open finds nothing, so never bills twice
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------- store

class Store:
    """Keys, usage, budgets, quotas and the web app's tables in `<data dir>/nanoseek.db`. Safe to share
    across threads.

    Each thread gets its own connection (sqlite3 connections must not be used concurrently), all in
    autocommit mode; every write is one explicit BEGIN IMMEDIATE … COMMIT, which takes the write
    lock up front so concurrent writers queue on busy_timeout instead of failing on lock upgrade.
    Other modules that keep tables here (conversations.py) use `read()` and `write()`.

    Durability: WAL with synchronous=NORMAL. A COMMIT has reached the WAL file through write(2) when it
    returns, so it is in the kernel's page cache and survives the process being killed (kill -9, OOM):
    what finding 9 needs. Only an OS crash or power loss can drop the last few commits (no fsync per
    commit); those drops are atomic, and a lost settle takes its reservation's deletion with it, so
    that request is billed at restart from its last progress instead. FULL would add an fsync to
    every request for that case alone.
    """

    def __init__(self, directory: str | os.PathLike | None = None, *, limits: StoreLimits | None = None) -> None:
        self.dir = data_dir(directory)
        self.path = self.dir / DB_FILENAME
        self.limits = limits or StoreLimits()
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []  # every thread's connection, so close() reaches them all
        self._conns_lock = threading.Lock()
        self._session: str | None = None  # made on the first reserve(); see _own_session
        self._session_fd: int | None = None
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not self.path.exists():
                # Create it ourselves so it starts owner-only: it holds key hashes and everyone's usage.
                # SQLite gives the -wal and -shm files the same permissions.
                os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        except OSError as e:
            raise BadInputError(f"{e.filename or self.dir}: cannot create the data directory "
                                f"({e.strerror})") from None
        # Open and migrate now, so a bad file fails at startup rather than on the first request; then bill
        # what a killed server left in flight, before anyone reads a balance.
        with self._connection() as c:
            migrate(c, self.path)
        self.recover_interrupted()

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
                c.execute("PRAGMA foreign_keys = ON")  # per connection, off by default; makes ON DELETE CASCADE work
                # WAL + NORMAL: never corrupt, no fsync per commit; see the class docstring for what that risks.
                c.execute("PRAGMA synchronous = NORMAL")
            except BaseException:
                c.close()
                raise
            self._local.conn = c
            with self._conns_lock:
                self._conns.append(c)
        return c

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection, in autocommit, with SQLite failures mapped to one-line errors."""
        try:
            yield self._conn()
        except sqlite3.DatabaseError as e:
            # Corruption, locks and I/O are the user's to fix and get one line naming the file;
            # integrity and programming errors are our bugs and keep their traceback.
            if type(e) in (sqlite3.DatabaseError, sqlite3.OperationalError):
                raise _db_error(self.path, e) from e
            raise

    @contextmanager
    def _tx(self, begin: str) -> Iterator[sqlite3.Connection]:
        with self._connection() as c:
            c.execute(begin)
            try:
                yield c
                c.execute("COMMIT")
            except BaseException:
                _rollback(c)
                raise

    def write(self) -> AbstractContextManager[sqlite3.Connection]:
        """`with store.write() as c:` one write transaction (BEGIN IMMEDIATE … COMMIT, ROLLBACK on any
        exception) on this thread's connection. Keep it short: every writer in every process waits on it.
        Do not nest it, or read(), inside another transaction."""
        return self._tx("BEGIN IMMEDIATE")

    def read(self) -> AbstractContextManager[sqlite3.Connection]:
        """`with store.read() as c:` one read transaction: every SELECT inside sees the same snapshot."""
        return self._tx("BEGIN")

    def close(self) -> None:
        """Close every thread's connection (call when no thread is mid-call). Later calls reopen lazily.

        Reservations still open stay in the file and are billed as interrupted by the next Store to open
        it: a server closing its store under running requests has cut them off."""
        fd, session = self._session_fd, self._session
        if fd is not None:
            try:
                with self.read() as c:
                    left = c.execute("SELECT EXISTS (SELECT 1 FROM reservations WHERE session = ?)",
                                     (session,)).fetchone()[0]
                if not left:  # nothing for a later Store to bill: leave no lock file behind
                    (self.dir / LIVE_DIR / f"{session}.lock").unlink(missing_ok=True)
            except (BadInputError, OSError):
                pass  # the file stays; the next open finds it unlocked and cleans it up
            os.close(fd)  # releases the lock
            self._session = self._session_fd = None
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
        with self._connection() as c:
            return c.execute("PRAGMA user_version").fetchone()[0]

    def journal_mode(self) -> str:
        with self._connection() as c:
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
        with self.write() as c:
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
        with self._connection() as c:
            row = c.execute(f"SELECT {_KEY_COLS} FROM api_keys WHERE secret_hash = ? AND revoked_at IS NULL",
                            (self._hash(secret),)).fetchone()
        return KeyRecord(*row) if row else None

    def get_key(self, key_id: int) -> KeyRecord | None:
        with self._connection() as c:
            row = c.execute(f"SELECT {_KEY_COLS} FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        return KeyRecord(*row) if row else None

    def find_key(self, id_or_prefix: int | str) -> KeyRecord:
        """A key by id ("3"), displayed prefix ("sk-ns-AbCd1234") or whole secret. NotFoundError otherwise."""
        ref = str(id_or_prefix).strip().rstrip("…")  # `keys list` shows prefixes with an ellipsis
        with self._connection() as c:
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
        with self._connection() as c:
            return [KeyRecord(*r) for r in c.execute(f"SELECT {_KEY_COLS} FROM api_keys ORDER BY id")]

    def revoke_key(self, id_or_prefix: int | str) -> KeyRecord:
        """Revoke a key (idempotent: a revoked key keeps its first revocation time); returns it as now stored."""
        key = self.find_key(id_or_prefix)
        with self.write() as c:
            c.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                      (time.time(), key.id))
        return self.get_key(key.id)

    def any_keys(self) -> bool:
        """Whether the server must demand a key. Revoked keys count: revoking the last key must not
        quietly turn an authenticated server into an open one."""
        with self._connection() as c:
            return c.execute("SELECT EXISTS (SELECT 1 FROM api_keys)").fetchone()[0] == 1

    # --- usage ledger

    def record_usage(self, key_id: int | None, model: str, prompt_cache_hit_tokens: int,
                     prompt_cache_miss_tokens: int, completion_tokens: int, reasoning_tokens: int,
                     latency_s: float, finish_reason: str | None, cost_usd: float, *,
                     ts: float | None = None) -> int:
        """Append one served request to the ledger; returns its row id. `ts` defaults to now.
        A request admitted with `reserve` ends with `settle` instead, which calls this rule."""
        try:
            with self.write() as c:
                return _insert_usage(c, key_id, model, prompt_cache_hit_tokens, prompt_cache_miss_tokens,
                                     completion_tokens, reasoning_tokens, latency_s, finish_reason,
                                     to_nano(cost_usd), time.time() if ts is None else ts)
        except sqlite3.IntegrityError:  # the foreign key: no such key id
            raise NotFoundError(f"no API key with id {key_id}") from None

    def spent_usd(self, key_id: int | None) -> float:
        """Everything the key (None: the open server's local user) has been billed, in USD."""
        with self._connection() as c:
            return _spent_nano(c, key_id) / NANO_PER_USD

    def remaining_usd(self, key_id: int) -> float | None:
        """Budget minus spend (negative once a request overshoots), or None for an unlimited key.
        Ignores reservations in flight: `reserve` is the admission check, this is for reports."""
        key = self.get_key(key_id)
        if key is None:
            raise NotFoundError(f"no API key with id {key_id}")
        return None if key.budget_usd is None else key.budget_usd - self.spent_usd(key_id)

    def balance(self, key_id: int | None) -> dict:
        """The caller's GET /user/balance body, in DeepSeek's shape, for a key or (None) the open server.

        DeepSeek: {"is_available", "balance_infos": [{"currency", "total_balance", "granted_balance",
        "topped_up_balance"}]}, amounts as strings. The budget is reported as granted balance (DeepSeek
        spends grants first and we have no top-ups): what is left, clamped at 0 and rounded down to the
        cent. `balance_infos` is never empty: an unlimited key and the open server report "0.00" with
        is_available true. Extra fields in the entry, which DeepSeek clients ignore: "budget" (null:
        unlimited), "spent" (rounded up), and "reserved" (held by requests in flight). is_available:
        a live key with money left beyond what its requests in flight hold.
        """
        with self.read() as c:
            budget, revoked = None, False
            if key_id is not None:
                row = c.execute("SELECT budget_usd, revoked_at FROM api_keys WHERE id = ?", (key_id,)).fetchone()
                if row is None:
                    raise NotFoundError(f"no API key with id {key_id}")
                budget, revoked = row[0], row[1] is not None
            spent, held = _spent_nano(c, key_id), _held_nano(c, key_id)
        info = {"currency": "USD", "total_balance": "0.00", "granted_balance": "0.00", "topped_up_balance": "0.00",
                "budget": None, "spent": cents(spent, ROUND_CEILING), "reserved": cents(held, ROUND_CEILING)}
        available = not revoked
        if budget is not None:
            left = max(0, to_nano(budget) - spent)
            info.update(total_balance=cents(left), granted_balance=cents(left), budget=cents(to_nano(budget)))
            available = available and left - held > 0
        return {"is_available": available, "balance_infos": [info]}

    # --- budget reservations (see the module docstring)

    def reserve(self, key_id: int | None, model: str, prices: PriceTable, prompt_tokens: int, max_tokens: int,
                *, choices: int = 1) -> Reservation:
        """Hold the worst-case cost of a request before it runs; returns the Reservation to settle or release.

        Worst case: every prompt token a cache miss, each of `choices` sequences running to `max_tokens`.
        If the key's budget (minus its spend and its other reservations) covers less, the grant is
        clamped: `Reservation.max_tokens` is the most output tokens per choice it does cover, and the
        caller must generate no more. Raises InsufficientBalanceError (402) when it cannot cover the
        prompt plus one output token per choice, NotFoundError for an unknown key. A key without a
        budget, and the open server (key_id None), always get the full grant; their reservation still
        bills them if the server dies under the request.
        """
        for label, v, low in (("prompt_tokens", prompt_tokens, 0), ("max_tokens", max_tokens, 1),
                              ("choices", choices, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{label} must be an int ≥ {low}, got {v!r}")
        session = self._own_session()
        prompt_cost = prices.exact_cost(0, prompt_tokens, 0)
        per_token = prices.exact_cost(0, 0, choices)  # one more output token in every choice
        now = time.time()
        with self.write() as c:
            granted = max_tokens
            if key_id is not None:
                row = c.execute("SELECT budget_usd, prefix FROM api_keys WHERE id = ?", (key_id,)).fetchone()
                if row is None:
                    raise NotFoundError(f"no API key with id {key_id}")
                budget, prefix = row
                if budget is not None:
                    spent, held = _spent_nano(c, key_id), _held_nano(c, key_id)
                    left = Decimal(to_nano(budget) - spent - held) / NANO_PER_USD
                    affordable = left - prompt_cost
                    if per_token > 0 and affordable >= 0:
                        granted = min(max_tokens, int(affordable // per_token))
                    elif affordable < 0:
                        granted = 0
                    if granted < 1:
                        need = prompt_cost + per_token
                        raise InsufficientBalanceError(
                            f"Insufficient balance: key {prefix}… has ${max(left, Decimal(0)):.6f} left of its "
                            f"${budget:.2f} budget" + (f" (${Decimal(held) / NANO_PER_USD:.6f} is held by "
                                                       "its requests in progress)" if held else "")
                            + f"; this request needs at least ${need:.6f}: {prompt_tokens} prompt tokens and "
                            f"one output token{' per choice' if choices > 1 else ''}.")
            # Rounded up: with the floor above, the held amount never exceeds what was left.
            worst = to_nano(prompt_cost + per_token * granted, ROUND_CEILING)
            cur = c.execute(
                "INSERT INTO reservations (key_id, session, model, prompt_tokens, choices, max_tokens, price_hit, "
                "price_miss, price_output, reserved_nano, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key_id, session, model, prompt_tokens, choices, granted, prices.input_cache_hit,
                 prices.input_cache_miss, prices.output, worst, now, now))
        return Reservation(cur.lastrowid, key_id, model, prompt_tokens, choices, max_tokens, granted,
                           worst / NANO_PER_USD, prices, now)

    def progress(self, reservation: Reservation, generated_tokens: int, reasoning_tokens: int = 0) -> None:
        """Record how many tokens the request has generated so far (all choices), so a server killed under
        it bills them at restart. One small write transaction (~0.1 ms, no fsync under WAL + NORMAL);
        calling it once a second per running request costs nothing noticeable. Never lowers the count."""
        with self.write() as c:
            c.execute("UPDATE reservations SET generated_tokens = MAX(generated_tokens, ?), "
                      "reasoning_tokens = MAX(reasoning_tokens, ?), updated_at = ? WHERE id = ?",
                      (int(generated_tokens), int(reasoning_tokens), time.time(), reservation.id))

    def settle(self, reservation: Reservation, *, cache_hit_tokens: int, completion_tokens: int,
               reasoning_tokens: int = 0, finish_reason: str | None, latency_s: float | None = None) -> int | None:
        """The request is over: write its usage row and drop its reservation, in one transaction, at the
        prices it was admitted with. Durable against a process kill when it returns (see the class
        docstring), so call it before sending the final chunk. Prompt tokens are the reserved ones:
        `cache_hit_tokens` of them hit the prefix cache, the rest are billed as misses. `latency_s`
        defaults to the time since `reserve`.

        Returns the usage row id, or None (writing nothing) when the reservation is already gone: settled,
        released, or billed as interrupted. So a second settle of the same request never bills twice.
        """
        if isinstance(cache_hit_tokens, bool) or not isinstance(cache_hit_tokens, int) \
                or not 0 <= cache_hit_tokens <= reservation.prompt_tokens:
            raise ValueError(f"cache_hit_tokens must be an int in [0, {reservation.prompt_tokens}], "
                             f"got {cache_hit_tokens!r}")
        miss = reservation.prompt_tokens - cache_hit_tokens
        cost = to_nano(reservation.prices.exact_cost(cache_hit_tokens, miss, completion_tokens))
        now = time.time()
        with self.write() as c:
            if c.execute("DELETE FROM reservations WHERE id = ?", (reservation.id,)).rowcount == 0:
                return None
            return _insert_usage(c, reservation.key_id, reservation.model, cache_hit_tokens, miss,
                                 completion_tokens, min(reasoning_tokens, completion_tokens),
                                 now - reservation.created_at if latency_s is None else latency_s,
                                 finish_reason, cost, now)

    def release(self, reservation: Reservation) -> bool:
        """Drop a reservation without billing: for a request that never reached the engine (a later check
        refused it). Returns whether it was still there."""
        with self.write() as c:
            return c.execute("DELETE FROM reservations WHERE id = ?", (reservation.id,)).rowcount == 1

    def recover_interrupted(self) -> int:
        """Bill the reservations of dead sessions (a server killed under running requests) and delete them;
        returns how many usage rows that wrote. Runs at every open; cheap when there is nothing to do.

        Each becomes a usage row with finish_reason "interrupted": its prompt billed as cache misses
        (which hits it had was never recorded), its last recorded progress as output, at its admission
        prices, dated at its last progress. Rows and their deletion share one transaction, and a
        session is billed only while this Store holds its lock, so each is billed exactly once.
        """
        live = self.dir / LIVE_DIR
        with self._connection() as c:
            sessions = {r[0] for r in c.execute("SELECT DISTINCT session FROM reservations")}
        try:
            sessions |= {p.stem for p in live.glob("*.lock")}
        except OSError:
            pass
        sessions.discard(self._session)
        billed = 0
        for session in sorted(sessions):
            with _lock_if_dead(live, session) as dead:
                if dead:
                    billed += self._bill_session(session)
        return billed

    def _bill_session(self, session: str) -> int:
        with self.write() as c:
            rows = c.execute("SELECT id, key_id, model, prompt_tokens, price_hit, price_miss, price_output, "
                             "generated_tokens, reasoning_tokens, created_at, updated_at "
                             "FROM reservations WHERE session = ? ORDER BY id", (session,)).fetchall()
            for (_, key_id, model, prompt, hit_p, miss_p, out_p, generated, reasoning, created, updated) in rows:
                cost = to_nano(PriceTable(hit_p, miss_p, out_p).exact_cost(0, prompt, generated))
                _insert_usage(c, key_id, model, 0, prompt, generated, min(reasoning, generated), updated - created,
                              INTERRUPTED, cost, updated)
            c.execute("DELETE FROM reservations WHERE session = ?", (session,))
        return len(rows)

    def _own_session(self) -> str:
        """This Store's session id, holding its lock file; made on first use, so processes that never
        reserve (the CLI) leave no lock behind. The lock is taken before any row names the session."""
        with self._conns_lock:
            if self._session is None:
                live = self.dir / LIVE_DIR
                session = secrets.token_hex(16)
                try:
                    live.mkdir(mode=0o700, exist_ok=True)
                    fd = os.open(live / f"{session}.lock", os.O_CREAT | os.O_RDWR, 0o600)
                except OSError as e:
                    raise BadInputError(f"{e.filename or live}: cannot create a lock file ({e.strerror})") from None
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh random name: nobody else holds it
                self._session, self._session_fd = session, fd
            return self._session

    # --- per-owner storage quota (conversations and stored responses)

    def charge_storage(self, conn: sqlite3.Connection, key_id: int | None, delta_bytes: int) -> int:
        """Inside a `write()` transaction (`conn` is its connection): add `delta_bytes` (negative frees) to
        what the owner stores, and return the new total. Growth past `limits.stored_bytes_per_owner`
        raises QuotaExceededError (413), which rolls back the caller's whole transaction, so check-and-
        write is atomic. Shrinking is always allowed, even above a lowered cap."""
        if not conn.in_transaction:
            raise RuntimeError("charge_storage must run inside Store.write()")
        owner = _owner(key_id)
        row = conn.execute("SELECT stored_bytes FROM owner_totals WHERE owner = ?", (owner,)).fetchone()
        total = (row[0] if row else 0) + delta_bytes
        cap = self.limits.stored_bytes_per_owner
        if delta_bytes > 0 and cap is not None and total > cap:
            raise QuotaExceededError(
                f"Storage quota exceeded: this {'key' if key_id is not None else 'server'} stores "
                f"{_mib(total - delta_bytes)} of its {_mib(cap)}, and this change needs {_mib(delta_bytes)} more. "
                "Delete conversations or stored responses to make room.")
        conn.execute("INSERT INTO owner_totals (owner, stored_bytes) VALUES (?, ?) ON CONFLICT (owner) "
                     "DO UPDATE SET stored_bytes = stored_bytes + excluded.stored_bytes", (owner, delta_bytes))
        return max(0, total)

    def stored_bytes(self, key_id: int | None) -> int:
        """What the owner (a key id, or None for the local user) stores, as counted against its quota."""
        with self._connection() as c:
            row = c.execute("SELECT stored_bytes FROM owner_totals WHERE owner = ?", (_owner(key_id),)).fetchone()
        return row[0] if row else 0

    # --- server secrets

    def secret(self, name: str, nbytes: int = 32) -> bytes:
        """The persistent random secret called `name`, made on first use (two processes racing to make it
        agree on one: INSERT OR IGNORE, then read back)."""
        with self.write() as c:
            c.execute("INSERT OR IGNORE INTO server_secrets (name, value) VALUES (?, ?)",
                      (name, secrets.token_bytes(nbytes)))
            return bytes(c.execute("SELECT value FROM server_secrets WHERE name = ?", (name,)).fetchone()[0])

    # --- stored responses (the Responses API; serve/responses.py owns their shape)

    def _purge_responses(self, c: sqlite3.Connection, key_id: int | None, now: float) -> None:
        freed = c.execute("SELECT COALESCE(SUM(size), 0) FROM responses WHERE key_id IS ? AND expires_at <= ?",
                          (key_id, now)).fetchone()[0]
        if freed:
            c.execute("DELETE FROM responses WHERE key_id IS ? AND expires_at <= ?", (key_id, now))
            self.charge_storage(c, key_id, -freed)

    def put_response(self, key_id: int | None, response_id: str, body: str, history: str) -> None:
        """Keep a response for `limits.response_retention_s`, counted against the owner's storage quota
        (QuotaExceededError, 413, when it does not fit: the caller's response is then not stored)."""
        now = time.time()
        size = stored_size(body, history)
        with self.write() as c:
            self._purge_responses(c, key_id, now)
            self.charge_storage(c, key_id, size)
            c.execute("INSERT INTO responses (id, key_id, created_at, expires_at, size, body, history) "
                      "VALUES (?, ?, ?, ?, ?, ?, ?)",
                      (response_id, key_id, now, now + self.limits.response_retention_s, size, body, history))

    def get_response(self, key_id: int | None, response_id: str) -> tuple[str, str]:
        """(body, history) of the owner's live response `response_id`; NotFoundError (404) for another
        owner's, an expired or an unknown one alike, so ids say nothing about other keys."""
        with self.write() as c:   # a write: expired rows of this owner go now
            self._purge_responses(c, key_id, time.time())
            row = c.execute("SELECT body, history FROM responses WHERE id = ? AND key_id IS ?",
                            (response_id, key_id)).fetchone()
        if row is None:
            raise NotFoundError(f"No response found with id '{response_id}'.")
        return row[0], row[1]

    def delete_response(self, key_id: int | None, response_id: str) -> None:
        with self.write() as c:
            row = c.execute("SELECT size FROM responses WHERE id = ? AND key_id IS ? AND expires_at > ?",
                            (response_id, key_id, time.time())).fetchone()
            if row is None:
                raise NotFoundError(f"No response found with id '{response_id}'.")
            c.execute("DELETE FROM responses WHERE id = ?", (response_id,))
            self.charge_storage(c, key_id, -row[0])

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
        with self._connection() as c:
            rows = c.execute(f"SELECT {cols} FROM usage u{where} ORDER BY u.ts, u.id", args).fetchall()
        return [UsageRow(*r) for r in rows]

    def usage_summary(self, key: int | str | None = None,
                      since: float | str | datetime | None = None) -> list[UsageSummary]:
        """Totals per (key, model), requests without a key first; same filters as usage_rows."""
        where, args = self._usage_filter(key, since)
        with self._connection() as c:
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
