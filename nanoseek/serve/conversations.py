"""The chat web app's conversations: their queries, titles, quota accounting and export.

Owns the logic of the `web_conversations` and `web_messages` tables; the Store owns the file, the
connections and the schema (store.MIGRATIONS 1 → 2 and 2 → 3). A conversation belongs to the API key
that created it, or to the local user (key_id NULL) of a server running without keys; every method takes
that owner and never touches another owner's rows, so a wrong owner reads as "not found" rather than
revealing that the id exists.

Storage is metered per owner (finding 10 of issue 13: a key with no budget left wrote 57 MiB in 0.8 s):
each row keeps its `size` (store.stored_size of its text), and every write charges or refunds the
difference through `Store.charge_storage` inside the same transaction, so a write past the owner's cap
fails whole, with QuotaExceededError (413).
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from nanoseek.errors import BadInputError, NotFoundError
from nanoseek.serve.store import stored_size

if TYPE_CHECKING:
    from nanoseek.serve.store import Store

TITLE_MAX = 200
ROLES = ("user", "assistant")


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
    """Conversations and their messages for every owner, kept in `store`'s database.

    `owner` everywhere is an API key id, or None for the local user.
    """

    def __init__(self, store: Store) -> None:
        self.store = store

    @contextmanager
    def _tx(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        """One Store transaction (a write takes the lock up front), with text SQLite cannot store reported
        as bad input."""
        try:
            with self.store.write() if write else self.store.read() as c:
                yield c
        except UnicodeEncodeError:   # a lone surrogate in an id or a search: text SQLite cannot store
            raise BadInputError("text is not valid Unicode (lone surrogate)") from None

    # --- conversations

    def create(self, owner: int | None, *, title: str | None = None, model: str | None = None,
               system_prompt: str = "", temperature: float | None = None, deepthink: bool = False) -> Conversation:
        now = time.time()
        conv = Conversation(f"c{secrets.token_hex(8)}", _title(title) if title else "New chat", model,
                            system_prompt or "", _temperature(temperature), bool(deepthink), now, now)
        size = _conv_size(conv.title, conv.model, conv.system_prompt)
        with self._tx() as c:
            self.store.charge_storage(c, owner, size)
            c.execute(f"INSERT INTO web_conversations (key_id, size, {_CONV_COLS}) "
                      "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                      (owner, size, conv.id, conv.title, conv.model, conv.system_prompt, conv.temperature,
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
            conv = self._get(c, owner, conv_id)
            if settings:
                new = {"title": conv.title, "model": conv.model, "system_prompt": conv.system_prompt, **settings}
                size = _conv_size(new["title"], new["model"], new["system_prompt"])
                self.store.charge_storage(c, owner, size - self._size(c, conv_id))
                cols = ", ".join(f"{k} = ?" for k in settings)
                c.execute(f"UPDATE web_conversations SET {cols}, size = ?, updated_at = ? WHERE id = ?",
                          (*settings.values(), size, time.time(), conv_id))
        return self.get(owner, conv_id)

    def delete(self, owner: int | None, conv_id: str) -> None:
        with self._tx() as c:
            self._get(c, owner, conv_id)
            freed = self._size(c, conv_id) + c.execute(
                "SELECT COALESCE(SUM(size), 0) FROM web_messages WHERE conversation_id = ?", (conv_id,)).fetchone()[0]
            c.execute("DELETE FROM web_conversations WHERE id = ?", (conv_id,))   # messages: ON DELETE CASCADE
            self.store.charge_storage(c, owner, -freed)

    # --- messages

    def append(self, owner: int | None, conv_id: str, role: str, content: str, *, reasoning: str | None = None,
               stats: dict | None = None) -> Message:
        """Add a message at the end. The first user message names a conversation still called "New chat"."""
        if role not in ROLES:
            raise BadInputError(f"message role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise BadInputError("message content must be a string")
        now = time.time()
        stats_json = json.dumps(stats) if stats else None
        size = stored_size(content, reasoning, stats_json)
        with self._tx() as c:
            conv = self._get(c, owner, conv_id)
            title, grown = conv.title, size
            if role == "user" and title == "New chat":
                title = default_title(content)
                conv_size = _conv_size(title, conv.model, conv.system_prompt)
                grown += conv_size - self._size(c, conv_id)
                c.execute("UPDATE web_conversations SET size = ? WHERE id = ?", (conv_size, conv_id))
            self.store.charge_storage(c, owner, grown)   # before the insert: an over-quota text is never written
            cur = c.execute(f"INSERT INTO web_messages (conversation_id, size, {_MSG_COLS.removeprefix('id, ')}) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?)", (conv_id, size, role, content, reasoning, stats_json, now))
            c.execute("UPDATE web_conversations SET updated_at = ?, title = ? WHERE id = ?", (now, title, conv_id))
        return Message(cur.lastrowid, role, content, reasoning, stats, now)

    def truncate(self, owner: int | None, conv_id: str, message_id: int) -> int:
        """Delete this message and every later one (regenerate, edit-and-resend); returns how many."""
        with self._tx() as c:
            self._get(c, owner, conv_id)
            if c.execute("SELECT 1 FROM web_messages WHERE id = ? AND conversation_id = ?",
                         (message_id, conv_id)).fetchone() is None:
                raise NotFoundError(f"conversation {conv_id} has no message {message_id}")
            freed = c.execute("SELECT COALESCE(SUM(size), 0) FROM web_messages WHERE conversation_id = ? AND id >= ?",
                              (conv_id, message_id)).fetchone()[0]
            n = c.execute("DELETE FROM web_messages WHERE conversation_id = ? AND id >= ?",
                          (conv_id, message_id)).rowcount
            self.store.charge_storage(c, owner, -freed)
            c.execute("UPDATE web_conversations SET updated_at = ? WHERE id = ?", (time.time(), conv_id))
        return n

    @staticmethod
    def _get(c: sqlite3.Connection, owner: int | None, conv_id: str) -> Conversation:
        row = c.execute(f"SELECT {_CONV_COLS} FROM web_conversations WHERE id = ? AND key_id IS ?",
                        (conv_id, owner)).fetchone()
        if row is None:
            raise NotFoundError(f"no conversation {conv_id!r}")
        return _conversation(row)

    @staticmethod
    def _size(c: sqlite3.Connection, conv_id: str) -> int:
        return c.execute("SELECT size FROM web_conversations WHERE id = ?", (conv_id,)).fetchone()[0]


def _conv_size(title: str, model: str | None, system_prompt: str) -> int:
    return stored_size(title, model, system_prompt)


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
