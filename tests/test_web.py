"""The chat web app's server side: conversation endpoints, their storage and isolation, exports, the page
and its static files, and the Markdown renderer that decides what model output may become in the page.

The browser end of the same app is tests/test_web_browser.py.
"""

import json
import time
from html.parser import HTMLParser

import pytest
import torch
from fastapi.testclient import TestClient

from nanoseek.engine.scheduler import Scheduler
from nanoseek.models import build_model
from nanoseek.models.config import DenseConfig
from nanoseek.serve.app import ServedModel, create_app
from nanoseek.serve.conversations import Conversations, default_title
from nanoseek.serve.guard import GuardConfig
from nanoseek.serve.store import PriceTable, Store
from nanoseek.serve.render import MarkdownRenderer, sanitize
from test_chat import CHATML, make_tokenizer
from test_serve import stopping

CONTEXT = 256


def tiny_served(name: str, template: str = CHATML, *, reasoning: bool = False, slow_s: float = 0.0,
                max_batch: int = 2) -> ServedModel:
    """A random 2-layer model on a byte tokenizer behind a running Scheduler. `slow_s` per forward makes a
    reply take long enough to watch it stream and to stop it."""
    tok = make_tokenizer(template)
    torch.manual_seed(0)
    cfg = DenseConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
                      eos_token_id=None)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.3)
    model.eval()
    if slow_s:
        fast = model.forward

        def forward(*args, **kw):
            time.sleep(slow_s)
            return fast(*args, **kw)
        model.forward = forward
    sched = Scheduler(model, tok, max_batch=max_batch, max_len=CONTEXT).start()
    return ServedModel(name, tok, sched, sched.max_len, reasoning=reasoning, prices=PriceTable(0.1, 0.2, 0.4))


@pytest.fixture(scope="module")
def models():
    served = {"tiny": tiny_served("tiny")}
    yield from stopping(served)


@pytest.fixture
def data_dir(tmp_path):
    return tmp_path / "data"


def _client(models, data_dir, require_auth=False):
    store = Store(data_dir)
    return TestClient(create_app(models, store, require_auth=require_auth)), store


@pytest.fixture
def client(models, data_dir):
    c, store = _client(models, data_dir)
    with c:
        yield c
    store.close()


# ---------------------------------------------------------------------------------------------------------
# conversations


def test_conversation_crud(client):
    r = client.post("/app/api/conversations", json={"model": "tiny", "system_prompt": "Be terse.",
                                                    "temperature": 0.3, "deepthink": True})
    assert r.status_code == 201
    conv = r.json()
    assert conv["title"] == "New chat" and conv["messages"] == [] and conv["deepthink"] is True
    cid = conv["id"]

    # The first user message names the conversation; messages keep order, reasoning and stats.
    u = client.post(f"/app/api/conversations/{cid}/messages", json={"role": "user", "content": "What is 2+2?\nthanks"})
    assert u.status_code == 201
    a = client.post(f"/app/api/conversations/{cid}/messages",
                    json={"role": "assistant", "content": "4", "reasoning": "add them",
                          "stats": {"completion_tokens": 3, "tok_per_s": 12.5, "finish": "stop"}}).json()
    got = client.get(f"/app/api/conversations/{cid}").json()
    assert got["title"] == "What is 2+2?"
    assert [(m["role"], m["content"]) for m in got["messages"]] == [("user", "What is 2+2?\nthanks"),
                                                                    ("assistant", "4")]
    assert got["messages"][1]["reasoning"] == "add them" and got["messages"][1]["stats"]["tok_per_s"] == 12.5

    # Rename; null temperature goes back to the server default; fields not sent stay as they were.
    r = client.patch(f"/app/api/conversations/{cid}", json={"title": "Sums", "temperature": None})
    assert r.status_code == 200
    assert (r.json()["title"], r.json()["temperature"], r.json()["system_prompt"]) == ("Sums", None, "Be terse.")

    # Regenerate: rewinding from the reply removes it and everything after.
    assert client.delete(f"/app/api/conversations/{cid}/messages/{a['id']}").json() == {"deleted": 1}
    assert [m["role"] for m in client.get(f"/app/api/conversations/{cid}").json()["messages"]] == ["user"]
    assert client.delete(f"/app/api/conversations/{cid}/messages/{a['id']}").status_code == 404

    assert client.delete(f"/app/api/conversations/{cid}").status_code == 204
    assert client.get(f"/app/api/conversations/{cid}").status_code == 404
    assert client.get("/app/api/conversations").json()["data"] == []


def test_bad_bodies_are_4xx(client):
    cid = client.post("/app/api/conversations", json={}).json()["id"]
    for body in ({"temperature": 3}, {"title": ""}, {"colour": "red"}):
        r = client.patch(f"/app/api/conversations/{cid}", json=body)
        assert 400 <= r.status_code < 500 and "error" in r.json(), (body, r.text)
    r = client.post(f"/app/api/conversations/{cid}/messages", json={"role": "system", "content": "x"})
    assert 400 <= r.status_code < 500
    r = client.post(f"/app/api/conversations/{cid}/messages", json={"role": "user", "content": "x",
                                                                    "stats": {"k": {"nested": 1}}})
    assert 400 <= r.status_code < 500
    assert client.get("/app/api/conversations/nope").status_code == 404
    # Things JSON and URLs can carry that SQLite, JSON output or the sanitizer could not: 4xx, never 500.
    messages = f"/app/api/conversations/{cid}/messages"
    for raw in (b'{"role": "user", "content": "\\ud800"}',
                b'{"role": "assistant", "content": "x", "stats": {"tok_per_s": NaN}}'):
        r = client.post(messages, content=raw, headers={"Content-Type": "application/json"})
        assert 400 <= r.status_code < 500, (raw, r.status_code, r.text)
    r = client.post("/app/api/render", content=b'{"texts": ["ok", "\\udfff"]}',
                    headers={"Content-Type": "application/json"})
    assert 400 <= r.status_code < 500
    assert client.delete(f"{messages}/{2**70}").status_code in (400, 422)


def test_list_order_and_search(client):
    ids = {}
    for title, text in (("Cooking", "how long to boil an egg"), ("Maths", "what is 100% of 5_000"),
                        ("Travel", "trains to Lyon")):
        ids[title] = client.post("/app/api/conversations", json={"title": title}).json()["id"]
        client.post(f"/app/api/conversations/{ids[title]}/messages", json={"role": "user", "content": text})
    # Most recently changed first: touching Cooking moves it to the top.
    client.post(f"/app/api/conversations/{ids['Cooking']}/messages", json={"role": "assistant", "content": "9 minutes"})
    assert [c["title"] for c in client.get("/app/api/conversations").json()["data"]] == ["Cooking", "Travel", "Maths"]

    def search(q):
        return {c["title"] for c in client.get("/app/api/conversations", params={"q": q}).json()["data"]}
    assert search("LYON") == {"Travel"}            # message text, case-insensitive
    assert search("math") == {"Maths"}             # title
    assert search("minutes") == {"Cooking"}        # assistant replies count too
    assert search("100%") == {"Maths"} and search("%") == {"Maths"}   # LIKE wildcards are literal
    assert search("5_0") == {"Maths"} and search("_") == {"Maths"}
    assert search("zebra") == set()


def test_conversations_survive_a_restart(models, data_dir):
    c1, s1 = _client(models, data_dir)
    with c1:
        cid = c1.post("/app/api/conversations", json={"model": "tiny", "deepthink": True}).json()["id"]
        c1.post(f"/app/api/conversations/{cid}/messages", json={"role": "user", "content": "remember me"})
    s1.close()
    # A new Store and app on the same data directory: the server after a restart.
    c2, s2 = _client(models, data_dir)
    with c2:
        (listed,) = c2.get("/app/api/conversations").json()["data"]
        assert listed["id"] == cid and listed["title"] == "remember me" and listed["deepthink"] is True
        assert c2.get(f"/app/api/conversations/{cid}").json()["messages"][0]["content"] == "remember me"
    # The tables live in the Store's own file, beside keys and usage.
    assert {"web_conversations", "web_messages", "api_keys", "usage"} <= _tables(s2)
    s2.close()


def _tables(store):
    import sqlite3
    with sqlite3.connect(store.path) as c:
        return {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def test_per_key_isolation(models, data_dir):
    store = Store(data_dir)
    _, alice = store.create_key("alice")
    _, bob = store.create_key("bob")
    client = TestClient(create_app(models, store, require_auth=True))

    def h(secret):
        return {"Authorization": f"Bearer {secret}"}
    with client:
        assert client.get("/app/api/conversations").status_code == 401
        assert client.post("/app/api/render", json={"texts": ["x"]}).status_code == 401
        # authentication comes before the body is read: a bad key and a bad body is a 401, not a 400
        r = client.post("/app/api/render", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert client.get("/app/api/conversations", headers=h("sk-ns-wrong")).status_code == 401
        assert client.get("/").status_code == 200          # the page itself asks for the key
        cid = client.post("/app/api/conversations", json={"title": "alice's"}, headers=h(alice)).json()["id"]
        client.post(f"/app/api/conversations/{cid}/messages", json={"role": "user", "content": "secret plan"},
                    headers=h(alice))
        assert client.get("/app/api/config", headers=h(alice)).json()["key"]["name"] == "alice"
        # Bob sees nothing of Alice's, and can't read, change, rewind or delete it by id.
        assert client.get("/app/api/conversations", headers=h(bob)).json()["data"] == []
        assert client.get("/app/api/conversations", params={"q": "secret"}, headers=h(bob)).json()["data"] == []
        for method, path, body in (("GET", "", None), ("PATCH", "", {"title": "mine"}), ("DELETE", "", None),
                                   ("POST", "/messages", {"role": "user", "content": "hi"}),
                                   ("GET", "/export", None)):
            r = client.request(method, f"/app/api/conversations/{cid}{path}", json=body, headers=h(bob))
            assert r.status_code == 404, (method, path, r.status_code)
        (mine,) = client.get("/app/api/conversations", headers=h(alice)).json()["data"]
        assert mine["title"] == "alice's"
        assert len(client.get(f"/app/api/conversations/{cid}", headers=h(alice)).json()["messages"]) == 1
    store.close()


def test_local_user_is_separate_from_keys(tmp_path):
    """The local user's conversations (made while the server had no keys) are not handed to a key later."""
    conv = Conversations(Store(tmp_path))
    local = conv.create(None, title="local")
    assert [c.id for c in conv.find(None)] == [local.id]
    assert conv.find(1) == []


def test_default_title():
    assert default_title("\n  Hello there  \nsecond line") == "Hello there"
    long = "word " * 30
    t = default_title(long)
    assert t.endswith("…") and len(t) <= 61 and not t[:-1].endswith(" ")
    assert default_title("   ") == "New chat"


def test_export_markdown_and_json(client):
    cid = client.post("/app/api/conversations", json={"title": "Export me!", "system_prompt": "Be kind."}).json()["id"]
    client.post(f"/app/api/conversations/{cid}/messages", json={"role": "user", "content": "Hi"})
    client.post(f"/app/api/conversations/{cid}/messages",
                json={"role": "assistant", "content": "Hello **you**", "reasoning": "greet back"})
    r = client.get(f"/app/api/conversations/{cid}/export")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/markdown")
    assert 'filename="Export-me.md"' in r.headers["content-disposition"]
    md = r.text
    assert md.startswith("# Export me!")
    assert md.index("Be kind.") < md.index("## User") < md.index("Hi") < md.index("## Assistant")
    assert "<details><summary>Reasoning</summary>" in md and md.index("greet back") < md.index("Hello **you**")
    r = client.get(f"/app/api/conversations/{cid}/export", params={"format": "json"})
    assert 'filename="Export-me.json"' in r.headers["content-disposition"]
    body = json.loads(r.content)
    assert body["system_prompt"] == "Be kind."
    assert [(m["role"], m["content"], m["reasoning"]) for m in body["messages"]] == [
        ("user", "Hi", None), ("assistant", "Hello **you**", "greet back")]
    assert client.get(f"/app/api/conversations/{cid}/export", params={"format": "pdf"}).status_code in (400, 422)


def test_config_lists_models_with_prices(client):
    cfg = client.get("/app/api/config").json()
    assert cfg["key"] is None and cfg["conversations"] is True
    (m,) = cfg["models"]
    assert m["id"] == "tiny" and m["reasoning"] is False and m["context"] == CONTEXT
    assert m["prices"] == {"input_cache_hit": 0.1, "input_cache_miss": 0.2, "output": 0.4}
    # the page samples with the model's recommendation (here none is known: nanoseek's fallback)
    assert m["sampling"] == {"temperature": 0.6, "top_p": 0.95, "top_k": 0, "source": "nanoseek"}


# ---------------------------------------------------------------------------------------------------------
# the page and its files


def test_page_and_static_files(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    # Offline: nothing is loaded from another origin.
    assert "http://" not in r.text and "https://" not in r.text and "//cdn" not in r.text
    for src in ("/app/static/app.js", "/app/static/app.css", "/app/static/theme.js", "/app/static/pygments.css"):
        assert src in r.text
        f = client.get(src)
        assert f.status_code == 200 and f.text.strip(), src
        assert "https://" not in f.text and "@import" not in f.text, src
    assert ".md pre .k" in client.get("/app/static/pygments.css").text                  # light code colours
    assert ':root[data-theme="dark"] .md pre .k' in client.get("/app/static/pygments.css").text   # dark
    assert client.get("/app/static/nope.js").status_code == 404
    assert client.get("/app/static/..%2Fweb.py").status_code == 404
    assert client.get("/app/static/%2E%2E%2F%2E%2E%2Fweb.py").status_code == 404


# ---------------------------------------------------------------------------------------------------------
# rendering and sanitizing


class _Tags(HTMLParser):
    """Every start tag with its attributes, as a browser's parser would see them."""

    def __init__(self, html):
        super().__init__()
        self.tags = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def names(self):
        return [t for t, _ in self.tags]


def _render(client, *texts):
    r = client.post("/app/api/render", json={"texts": list(texts)})
    assert r.status_code == 200, r.text
    return r.json()["html"]


def _assert_inert(html):
    for tag, attrs in _Tags(html).tags:
        assert tag not in ("script", "img", "iframe", "object", "embed", "style", "svg"), html
        for name, value in attrs.items():
            assert not name.startswith("on") and name != "style", html
            assert not (value or "").strip().lower().startswith(("javascript:", "data:", "vbscript:")), html


ATTACKS = [
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(1)>",
    'Before <img src="x" onerror="alert(document.cookie)"> after',
    "<svg onload=alert(1)><circle/></svg>",
    "[click](javascript:alert(1)) [data](data:text/html;base64,PHNjcmlwdD4=)",
    "![x](javascript:alert(1)) ![tracker](https://example.com/pixel.png)",
    "<a href=\"javascript:alert(1)\">link</a>",
    "<iframe src=//evil></iframe><style>body{display:none}</style>",
    "$x$ <math><mi onclick=alert(1)>y</mi></math>",
    "```html\n<script>alert(1)</script>\n```",
    "| a |\n|---|\n| <img src=x onerror=alert(1)> |",
    r"\(\text{<img src=x onerror=alert(1)>}\)",
]


def test_render_escapes_html_in_model_output(client):
    html = _render(client, *ATTACKS)
    for text, out in zip(ATTACKS, html):
        _assert_inert(out)
    # Raw HTML is shown as text, not dropped: the reader sees what the model wrote.
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html[0]
    assert "&lt;img src=x onerror=alert(1)&gt;" in html[1]
    assert "<a" not in html[4]            # markdown-it refuses javascript: and data: links
    assert '<a href="https://example.com/pixel.png"' in html[5]   # images become links, never fetched
    assert html[9].startswith('<pre><code class="language-html">') and '<span class="nt">script</span>' in html[9]


def test_sanitize_is_an_allowlist():
    """The last line of defence, fed raw HTML as if a renderer bug had let it through."""
    dirty = ('<p onclick="x()">hi</p><img src=x onerror=alert(1)><script>alert(1)</script>'
             '<a href="javascript:alert(1)" onmouseover="x()">a</a><a href="https://ok.example/">b</a>'
             '<math xmlns="http://www.w3.org/1998/Math/MathML"><mi mathvariant="bold" onclick="x">y</mi></math>'
             '<span class="k" style="position:fixed">k</span><form action="/x"><input name=q></form>')
    clean = sanitize(dirty)
    _assert_inert(clean)
    tags = _Tags(clean)
    assert "form" not in tags.names() and "input" not in tags.names()
    assert ("mi", {"mathvariant": "bold"}) in tags.tags                       # MathML survives, handlers don't
    link = {"href": "https://ok.example/", "target": "_blank", "rel": "noopener noreferrer nofollow"}
    assert ("a", link) in tags.tags
    assert ("span", {"class": "k"}) in tags.tags
    assert "alert" not in clean                # script bodies go with their tags


def test_render_markdown_features(client):
    math, table, code, dollars, brackets, broken = _render(
        client, "Euler: $e^{i\\pi}+1=0$ and\n\n$$\\frac{a}{b}$$",
        "| name | n |\n|:-----|--:|\n| x | 1 |",
        "```python\ndef f(x):\n    return x\n```",
        "costs $5 and $6 here",
        "inline \\(x_i\\) and display\n\\[\\sqrt{2}\\]",
        "oops $\\frac{1$")
    t = _Tags(math)
    assert t.names().count("math") == 2 and "msup" in t.names() and "mfrac" in t.names()
    assert ("math", {"xmlns": "http://www.w3.org/1998/Math/MathML", "display": "block"}) in t.tags
    t = _Tags(table)
    assert ["table", "thead", "tr", "th", "th"] == t.names()[:5]
    assert ("th", {"class": "align-right"}) in t.tags and ("td", {"class": "align-left"}) in t.tags
    t = _Tags(code)
    assert ("code", {"class": "language-python"}) in t.tags
    assert ("span", {"class": "k"}) in t.tags and ("span", {"class": "nf"}) in t.tags   # Pygments: keyword, function
    assert "<math" not in dollars and "$5 and $6" in dollars     # prices are not math
    t = _Tags(brackets)
    assert "msub" in t.names() and "msqrt" in t.names()
    assert "math-error" in broken or "<math" in broken            # bad TeX still renders, as source or MathML


def test_render_size_limit(client):
    r = client.post("/app/api/render", json={"texts": ["x" * 300_001, "y" * 300_000]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "texts"
    r = client.post("/app/api/render", content=b"x" * (16 * 2**20 + 1), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_unclosed_math_openers_render_as_text():
    """Regression: texmath's lazy regexes rescanned the text for every unclosed \\( or \\[ (quadratic: 8k
    openers took seconds). Many openers now render as plain text, closed ones as math."""
    r = MarkdownRenderer()
    for opener in ("\\(", "\\["):
        html_out = r.render(opener * 20000)
        assert "<math" not in html_out and html_out.count(opener[1]) == 20000   # Markdown unescapes "\\(" to "("
    assert "<math" in r.render("\\(" * 5000 + " \\(x\\)")


def test_renderer_is_deterministic():
    r = MarkdownRenderer()
    text = "# Title\n\n- a\n- **b**\n\n> quote\n\n`code`"
    assert r.render(text) == r.render(text)
    names = _Tags(r.render(text)).names()
    assert names == ["h1", "ul", "li", "li", "strong", "blockquote", "p", "p", "code"]


def test_open_loopback_server_checks_the_host_header(models, data_dir):
    """With no keys the server trusts its caller; `nanoseek serve` on loopback passes trusted hosts so a page
    elsewhere cannot reach it through DNS rebinding and read the local user's conversations."""
    store = Store(data_dir)
    app = create_app(models, store, require_auth=False, guard=GuardConfig(loopback_only=True))
    with TestClient(app, base_url="http://127.0.0.1:8000") as ok:
        assert ok.get("/app/api/conversations").status_code == 200
    with TestClient(app, base_url="http://attacker.example:8000") as evil:
        assert evil.get("/app/api/conversations").status_code == 400
    store.close()
