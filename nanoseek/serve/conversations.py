"""The chat web app's conversations, stored server-side in the Store's SQLite file (`nanoseek.db`).

Owns the `web_conversations` and `web_messages` tables and every read and write of them. A conversation
belongs to the API key that created it, or to the local user (key_id NULL) of a server running without
keys; every method takes that owner and never touches another owner's rows, so a wrong owner reads as
"not found" rather than revealing that the id exists.

The tables sit beside the Store's keys and usage so one file holds everything a server knows and one
backup saves it. They are created if missing (CREATE … IF NOT EXISTS) rather than through the Store's
numbered migrations, which this module does not own; the statements are written so that moving them into
store.MIGRATIONS later changes nothing for existing files.

Each call opens its own short-lived connection: calls come from FastAPI's worker threads, are rare (a few
per chat turn) and small, and a connection per call leaves nothing to close when the server stops.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nanoseek.errors import BadInputError, NotFoundError

BUSY_TIMEOUT_MS = 5000   # as the Store: writes are single short transactions
TITLE_MAX = 200
ROLES = ("user", "assistant")

SCHEMA = (
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
)


@dataclass
class Message:
    id: int
    role: str
    content: str
    reasoning: str | None
    stats: dict | None
    created_at: float


@dataclass
class Conversation:
    id: str
    title: str
    model: str | None
    system_prompt: str
    temperature: float | None
    deepthink: bool
    created_at: float
    updated_at: float
    messages: list[Message] = field(default_factory=list)

    def to_dict(self, with_messages: bool = True) -> dict:
        d = asdict(self)
        if not with_messages:
            d.pop("messages")
        return d


_CONV_COLS = "id, title, model, system_prompt, temperature, deepthink, created_at, updated_at"
_MSG_COLS = "id, role, content, reasoning, stats, created_at"
_SETTINGS = ("title", "model", "system_prompt", "temperature", "deepthink")


def _conversation(row) -> Conversation:
    return Conversation(row[0], row[1], row[2], row[3], row[4], bool(row[5]), row[6], row[7])


def _message(row) -> Message:
    return Message(row[0], row[1], row[2], row[3], json.loads(row[4]) if row[4] else None, row[5])


def default_title(text: str) -> str:
    """A new conversation's name: the first line of its first message, cut at a word near 60 characters."""
    line = next((s.strip() for s in text.splitlines() if s.strip()), "")
    if len(line) > 60:
        line = line[:60].rsplit(" ", 1)[0].rstrip() + "…"
    return line or "New chat"


class Conversations:
    """Conversations and their messages for every owner, in the Store's database file at `path`.

    `owner` everywhere is an API key id, or None for the local user.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with self._tx() as c:
            for statement in SCHEMA:
                c.execute(statement)

    @contextmanager
    def _tx(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction on a fresh connection. Like the Store, a write takes the lock up front (BEGIN
        IMMEDIATE) so concurrent writers queue on busy_timeout instead of failing halfway."""
        try:
            c = sqlite3.connect(self.path, isolation_level=None)
        except sqlite3.Error as e:
            raise BadInputError(f"{self.path}: {e}") from None
        try:
            c.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            c.execute("PRAGMA foreign_keys = ON")   # per connection: makes ON DELETE CASCADE work
            c.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield c
                c.execute("COMMIT")
            except BaseException:
                if c.in_transaction:
                    c.execute("ROLLBACK")
                raise
        except sqlite3.DatabaseError as e:
            if type(e) in (sqlite3.DatabaseError, sqlite3.OperationalError):
                raise BadInputError(f"{self.path}: {e}") from e
            raise
        except UnicodeEncodeError:   # a lone surrogate in an id or a search: text SQLite cannot store
            raise BadInputError("text is not valid Unicode (lone surrogate)") from None
        finally:
            c.close()

    # --- conversations

    def create(self, owner: int | None, *, title: str | None = None, model: str | None = None,
               system_prompt: str = "", temperature: float | None = None, deepthink: bool = False) -> Conversation:
        now = time.time()
        conv = Conversation(f"c{secrets.token_hex(8)}", _title(title) if title else "New chat", model,
                            system_prompt or "", _temperature(temperature), bool(deepthink), now, now)
        with self._tx() as c:
            c.execute(f"INSERT INTO web_conversations (key_id, {_CONV_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                      (owner, conv.id, conv.title, conv.model, conv.system_prompt, conv.temperature,
                       int(conv.deepthink), conv.created_at, conv.updated_at))
        return conv

    def find(self, owner: int | None, query: str | None = None, limit: int = 200) -> list[Conversation]:
        """The owner's conversations, most recently changed first (without messages). `query` keeps those
        whose title or any message contains it, case-insensitively (ASCII case, as SQLite's LIKE)."""
        sql = f"SELECT {_CONV_COLS} FROM web_conversations c WHERE key_id IS ?"
        args: list = [owner]
        if query and query.strip():
            pattern = "%" + _like_escape(query.strip()) + "%"
            sql += (" AND (title LIKE ? ESCAPE '\\' OR EXISTS (SELECT 1 FROM web_messages m WHERE "
                    "m.conversation_id = c.id AND m.content LIKE ? ESCAPE '\\'))")
            args += [pattern, pattern]
        sql += " ORDER BY updated_at DESC, id LIMIT ?"
        with self._tx(write=False) as c:
            return [_conversation(r) for r in c.execute(sql, (*args, limit))]

    def get(self, owner: int | None, conv_id: str) -> Conversation:
        with self._tx(write=False) as c:
            conv = self._get(c, owner, conv_id)
            conv.messages = [_message(r) for r in c.execute(
                f"SELECT {_MSG_COLS} FROM web_messages WHERE conversation_id = ? ORDER BY id", (conv_id,))]
        return conv

    def update(self, owner: int | None, conv_id: str, **settings) -> Conversation:
        """Change any of title, model, system_prompt, temperature (None: server default), deepthink."""
        unknown = set(settings) - set(_SETTINGS)
        if unknown:
            raise BadInputError(f"conversation settings: unknown {', '.join(sorted(unknown))}")
        if "title" in settings:
            settings["title"] = _title(settings["title"])
        if "temperature" in settings:
            settings["temperature"] = _temperature(settings["temperature"])
        if "deepthink" in settings:
            settings["deepthink"] = int(bool(settings["deepthink"]))
        if "system_prompt" in settings:
            settings["system_prompt"] = settings["system_prompt"] or ""
        with self._tx() as c:
            self._get(c, owner, conv_id)
            if settings:
                cols = ", ".join(f"{k} = ?" for k in settings)
                c.execute(f"UPDATE web_conversations SET {cols}, updated_at = ? WHERE id = ?",
                          (*settings.values(), time.time(), conv_id))
        return self.get(owner, conv_id)

    def delete(self, owner: int | None, conv_id: str) -> None:
        with self._tx() as c:
            self._get(c, owner, conv_id)
            c.execute("DELETE FROM web_conversations WHERE id = ?", (conv_id,))

    # --- messages

    def append(self, owner: int | None, conv_id: str, role: str, content: str, *, reasoning: str | None = None,
               stats: dict | None = None) -> Message:
        """Add a message at the end. The first user message names a conversation still called "New chat"."""
        if role not in ROLES:
            raise BadInputError(f"message role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise BadInputError("message content must be a string")
        now = time.time()
        with self._tx() as c:
            conv = self._get(c, owner, conv_id)
            cur = c.execute(f"INSERT INTO web_messages (conversation_id, {_MSG_COLS.removeprefix('id, ')}) "
                            "VALUES (?, ?, ?, ?, ?, ?)",
                            (conv_id, role, content, reasoning, json.dumps(stats) if stats else None, now))
            title = conv.title
            if role == "user" and title == "New chat":
                title = default_title(content)
            c.execute("UPDATE web_conversations SET updated_at = ?, title = ? WHERE id = ?", (now, title, conv_id))
        return Message(cur.lastrowid, role, content, reasoning, stats, now)

    def truncate(self, owner: int | None, conv_id: str, message_id: int) -> int:
        """Delete this message and every later one (regenerate, edit-and-resend); returns how many."""
        with self._tx() as c:
            self._get(c, owner, conv_id)
            if c.execute("SELECT 1 FROM web_messages WHERE id = ? AND conversation_id = ?",
                         (message_id, conv_id)).fetchone() is None:
                raise NotFoundError(f"conversation {conv_id} has no message {message_id}")
            n = c.execute("DELETE FROM web_messages WHERE conversation_id = ? AND id >= ?",
                          (conv_id, message_id)).rowcount
            c.execute("UPDATE web_conversations SET updated_at = ? WHERE id = ?", (time.time(), conv_id))
        return n

    @staticmethod
    def _get(c: sqlite3.Connection, owner: int | None, conv_id: str) -> Conversation:
        row = c.execute(f"SELECT {_CONV_COLS} FROM web_conversations WHERE id = ? AND key_id IS ?",
                        (conv_id, owner)).fetchone()
        if row is None:
            raise NotFoundError(f"no conversation {conv_id!r}")
        return _conversation(row)


def _title(title) -> str:
    if not isinstance(title, str) or not title.strip():
        raise BadInputError("a conversation title must be a non-empty string")
    return title.strip()[:TITLE_MAX]


def _temperature(t) -> float | None:
    if t is None:
        return None
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 2:
        raise BadInputError(f"Invalid 'temperature': expected a number from 0 to 2, got {t!r}")
    return float(t)


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


# ------------------------------------------------------------------------------------------------- export

def to_markdown(conv: Conversation) -> str:
    """A readable transcript. Reasoning goes in a <details> block, the way most Markdown viewers fold it."""
    out = [f"# {conv.title}", ""]
    meta = [f"model: {conv.model or 'default'}"]
    if conv.temperature is not None:
        meta.append(f"temperature: {conv.temperature:g}")
    if conv.deepthink:
        meta.append("DeepThink")
    out += ["_" + ", ".join(meta) + "_", ""]
    if conv.system_prompt:
        out += ["## System", "", conv.system_prompt, ""]
    for m in conv.messages:
        out += [f"## {'User' if m.role == 'user' else 'Assistant'}", ""]
        if m.reasoning:
            out += ["<details><summary>Reasoning</summary>", "", m.reasoning, "", "</details>", ""]
        out += [m.content, ""]
    return "\n".join(out)
