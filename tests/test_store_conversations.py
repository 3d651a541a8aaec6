"""Conversations in the Store's file (issue 13: one owner of nanoseek.db, the conversation tables as a
migration) and the per-key storage quota (finding 10: a key wrote 57 MiB of conversations in 0.8 s)."""

import sqlite3

import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient

from nanoseek.errors import NanoseekError, QuotaExceededError
from nanoseek.serve import store as store_mod
from nanoseek.serve.conversations import Conversations
from nanoseek.serve.errors import error_response
from nanoseek.serve.store import DB_FILENAME, SCHEMA_VERSION, Store, StoreLimits, stored_size
from nanoseek.serve.auth import Gate
from nanoseek.serve.web import web_router

CAP = 4000


def _recount(store: Store) -> dict[int, int]:
    """Each owner's stored bytes, summed from the rows themselves, to check the running counters against."""
    with store.read() as c:
        rows = c.execute("SELECT IFNULL(key_id, 0), SUM(size) FROM (SELECT key_id, size FROM web_conversations "
                         "UNION ALL SELECT c.key_id, m.size FROM web_messages m "
                         "JOIN web_conversations c ON c.id = m.conversation_id) GROUP BY 1").fetchall()
    return dict(rows)


def test_conversations_written_before_the_migration_keep_their_data(tmp_path):
    """A version-1 file in which the old conversations.py created its tables itself, holding a chat."""
    raw = sqlite3.connect(tmp_path / DB_FILENAME)
    for statement in (*store_mod.MIGRATIONS[0], *store_mod.MIGRATIONS[1]):  # 1 → 2 is the old DDL verbatim
        raw.execute(statement)
    raw.execute("INSERT INTO api_keys (name, prefix, secret_hash, created_at) VALUES ('a', 'sk-ns-a', x'00', 0)")
    raw.execute("INSERT INTO usage (key_id, ts, model, prompt_cache_hit_tokens, prompt_cache_miss_tokens, "
                "completion_tokens, reasoning_tokens, latency_s, cost_usd) VALUES (1, 0, 'm', 0, 1, 1, 0, 0, 0.25)")
    raw.execute("INSERT INTO web_conversations (id, key_id, title, model, system_prompt, created_at, updated_at) "
                "VALUES ('c1', 1, 'Café', NULL, 'Sois bref.', 1, 1)")
    raw.execute("INSERT INTO web_messages (conversation_id, role, content, reasoning, stats, created_at) "
                "VALUES ('c1', 'user', 'naïve €', NULL, '{\"t\": 1}', 1)")
    raw.execute("PRAGMA user_version = 1")
    raw.commit()
    raw.close()

    with Store(tmp_path) as st:
        assert st.schema_version() == SCHEMA_VERSION
        conv = Conversations(st).get(1, "c1")
        assert (conv.title, conv.system_prompt, [m.content for m in conv.messages]) == ("Café", "Sois bref.",
                                                                                        ["naïve €"])
        # Sizes backfilled by the migration's SQL agree with the rule new writes use (bytes, not characters).
        assert st.stored_bytes(1) == stored_size("Café", None, "Sois bref.") + stored_size("naïve €", '{"t": 1}')
        assert st.spent_usd(1) == 0.25
        Conversations(st).delete(1, "c1")
        assert st.stored_bytes(1) == 0


def test_storage_is_capped_per_owner_inside_the_write(tmp_path):
    with Store(tmp_path, limits=StoreLimits(stored_bytes_per_owner=CAP)) as st:
        key, _ = st.create_key("k")
        convs = Conversations(st)
        local = convs.create(None)
        convs.append(None, local.id, "user", "é" * 900)           # 1800 bytes, not 900 characters
        with pytest.raises(QuotaExceededError, match="Delete conversations"):
            convs.append(None, local.id, "assistant", "x" * 1000, reasoning="y" * 1000)
        assert len(convs.get(None, local.id).messages) == 1          # the refused write left nothing behind
        with pytest.raises(QuotaExceededError):
            convs.update(None, local.id, system_prompt="z" * 3000)
        assert convs.get(None, local.id).system_prompt == ""
        # The key's quota is its own: the local user's use does not count against it.
        mine = convs.create(key, title="mine")
        first = convs.append(key, mine.id, "user", "a" * 1000)
        convs.append(key, mine.id, "assistant", "b" * 1000)
        with pytest.raises(QuotaExceededError):
            convs.create(key, system_prompt="c" * 2000)
        # Rewinding and deleting give the room back, to the byte.
        convs.truncate(key, mine.id, first.id)
        assert st.stored_bytes(key) == stored_size("mine")
        convs.append(key, mine.id, "user", "d" * 3000)
        assert _recount(st) == {0: st.stored_bytes(None), key: st.stored_bytes(key)}
        convs.delete(key, mine.id)
        convs.delete(None, local.id)
        assert (st.stored_bytes(key), st.stored_bytes(None)) == (0, 0)


def test_quota_is_a_413_from_the_web_app(tmp_path):
    st = Store(tmp_path, limits=StoreLimits(stored_bytes_per_owner=CAP))
    app = FastAPI()

    @app.exception_handler(NanoseekError)
    async def handle(request, exc):   # as serve/errors.py says the server wires every error kind
        status, headers, body = error_response(exc)
        return JSONResponse(body, status_code=status, headers=headers)

    app.include_router(web_router({}, Gate(st, require_auth=False)))
    with TestClient(app) as client:
        cid = client.post("/app/api/conversations", json={}).json()["id"]
        ok = client.post(f"/app/api/conversations/{cid}/messages", json={"role": "user", "content": "x" * 3000})
        assert ok.status_code == 201
        r = client.post(f"/app/api/conversations/{cid}/messages", json={"role": "assistant", "content": "y" * 3000})
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "storage_quota_exceeded"
        assert "quota" in r.json()["error"]["message"]
    st.close()
