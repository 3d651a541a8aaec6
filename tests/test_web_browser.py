"""The chat web app end to end in a real headless Chromium (Debian's `chromium`, driven by Playwright).

A real server (uvicorn on a free port) serves tiny random models, so replies are noise but really
generated and streamed; the tests check the app's behaviour, never what the text says. A screenshot of
each scene goes to $NANOSEEK_ARTIFACTS (or the test's tmp dir).

Playwright is used only as a driver: it never downloads a browser here (.ci/run installs chromium).
"""

import json
import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest

from nanoseek.serve.app import create_app
from nanoseek.serve.store import Store
from test_chat import R1_LIKE
from test_serve import _Server, stopping  # uvicorn on a free loopback port, in a thread
from test_web import tiny_served

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")

CHROMIUM = os.environ.get("NANOSEEK_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 30_000

pytestmark = pytest.mark.skipif(not shutil.which(CHROMIUM),
                                reason=f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium)")


@pytest.fixture(scope="module")
def models():
    # "tiny" answers in a second or two; "slow" takes long enough to stop midway; "tiny-r1" is R1-like.
    served = {"tiny": tiny_served("tiny", slow_s=0.003), "slow": tiny_served("slow", slow_s=0.05),
              "tiny-r1": tiny_served("tiny-r1", R1_LIKE, reasoning=True, slow_s=0.003)}
    yield from stopping(served)


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    """A server without keys on loopback: the page's user is the local user."""
    with Store(tmp_path_factory.mktemp("web-data")) as store:
        s = _Server(create_app(models, store, require_auth=False, poll_s=0.05))
        yield s
        s.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def artifacts(tmp_path):
    path = Path(os.environ.get("NANOSEEK_ARTIFACTS") or tmp_path)
    path.mkdir(parents=True, exist_ok=True)
    return path


class _Page:
    """A fresh browser profile (its own localStorage) on the app, recording page errors and CSP reports."""

    def __init__(self, browser, url, **context_kw):
        self.context = browser.new_context(**context_kw)
        self.page = self.context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.errors = []
        self.requests = []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("request", lambda r: self.requests.append(r) if r.url.endswith("/v1/chat/completions") else None)
        # Runs before any page script, outside the CSP: records every policy violation, so a test can tell
        # "the sanitizer removed it" from "the CSP blocked it".
        self.context.add_init_script("window.__csp = []; document.addEventListener('securitypolicyviolation',"
                                     " e => window.__csp.push(e.violatedDirective));")
        self.url = url
        self.open()

    def open(self, hash_=""):
        self.page.goto("about:blank")     # else a change of #hash alone would not reload the app
        self.page.goto(self.url + "/" + hash_)
        self.page.wait_for_selector("body[data-ready='1']")

    def send(self, text):
        self.page.fill("#prompt", text)
        self.page.click("#send")

    def last_reply(self):
        return self.page.locator("#messages .msg.assistant").last

    def wait_reply(self, state="done"):
        self.page.wait_for_selector(f"#messages .msg.assistant[data-state='{state}'][data-id]:not([data-id=''])")

    def chat_bodies(self):
        return [r.post_data_json for r in self.requests]

    def close(self):
        assert not self.errors, self.errors
        self.context.close()


def test_chat_stream_reload_and_new_browser(server, browser, artifacts):
    p = _Page(browser, server.url)
    page = p.page
    assert page.locator("#model-picker option").all_inner_texts() == ["tiny", "slow", "tiny-r1 (reasoning)"]
    # Record how long the reply's text is at every DOM change while it is streaming.
    page.evaluate("""() => { window.__lengths = [];
        new MutationObserver(() => {
            const m = [...document.querySelectorAll('.msg.assistant')].pop();
            if (m && m.dataset.state === 'streaming')
                window.__lengths.push(m.querySelector('.content').textContent.length);
        }).observe(document.querySelector('#messages'), {subtree: true, childList: true, characterData: true}); }""")
    p.send("Hello there")
    reply = p.last_reply()
    page.wait_for_selector("#messages .msg.assistant[data-state='streaming']")
    assert page.is_visible("#stop")
    p.wait_reply()
    assert not page.is_visible("#stop") and page.is_visible("#send")
    # The reply streamed in: the page showed it at several lengths before it was complete. (Not necessarily
    # growing: Markdown rendering can hide characters of the plain text shown first.)
    lengths = [n for n in page.evaluate("window.__lengths") if n]
    assert len(set(lengths)) >= 2, lengths
    stats = reply.locator(".stats").text_content()
    assert re.search(r"\d+ tokens · [\d.]+ tok/s · prompt \d+ \(\d+ cached\) · \$[\d.e-]+", stats), stats
    body = p.chat_bodies()[-1]
    assert body["stream"] is True and body["model"] == "tiny" and body["thinking"] == {"type": "disabled"}
    assert body["messages"] == [{"role": "user", "content": "Hello there"}]
    # The sidebar names the conversation after its first message.
    page.wait_for_selector("#conv-list li .conv-open:text-is('Hello there')")
    page.screenshot(path=str(artifacts / "web-chat.png"), full_page=True)

    # Export downloads the conversation as Markdown and as JSON.
    with page.expect_download() as download:
        page.click("#export-md")
    assert download.value.suggested_filename == "Hello-there.md"
    md = Path(download.value.path()).read_text()
    assert md.startswith("# Hello there") and md.index("## User") < md.index("## Assistant")
    with page.expect_download() as download:
        page.click("#export-json")
    exported = json.loads(Path(download.value.path()).read_text())
    assert [m["role"] for m in exported["messages"]] == ["user", "assistant"]
    assert exported["messages"][1]["stats"]["completion_tokens"] > 0

    # Reload: the same conversation is listed and reopens from the address, with its reply.
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    assert page.locator("#conv-list li.active .conv-open").text_content() == "Hello there"
    assert page.locator("#messages .msg.user .bubble").all_text_contents() == ["Hello there"]
    assert page.locator("#messages .msg.assistant .stats").text_content() == stats
    p.close()

    # Another browser (no shared storage): the conversation lives on the server, so it is there too.
    other = _Page(browser, server.url)
    other.page.click("#conv-list .conv-open:text-is('Hello there')")
    other.page.wait_for_selector("#messages .msg.assistant[data-state='done']")
    assert other.page.locator("#conv-title").text_content() == "Hello there"
    other.close()


def test_deepthink_regenerate_and_edit(server, browser, artifacts):
    p = _Page(browser, server.url)
    page = p.page
    page.click("#new-chat")
    page.click("#deepthink")
    assert page.get_attribute("#deepthink", "aria-pressed") == "true"
    p.send("Think about it")
    # With DeepThink the request asks for reasoning; the random model never closes </think>, so everything
    # it writes is reasoning, shown in a block that is open while streaming and folded afterwards.
    page.wait_for_function("() => { const d = document.querySelector('.msg.assistant details.reasoning');"
                           " return d && !d.hidden && d.open"
                           " && d.querySelector('.reasoning-body').textContent.length > 0 }")
    p.wait_reply()
    details = p.last_reply().locator("details.reasoning")
    assert details.evaluate("d => d.open") is False
    assert re.fullmatch(r"Thought for \d+ s", details.locator("summary").text_content())
    assert p.chat_bodies()[-1]["thinking"] == {"type": "enabled"}
    details.locator("summary").click()
    assert details.evaluate("d => d.open") is True
    page.screenshot(path=str(artifacts / "web-deepthink.png"), full_page=True)

    # Regenerate replaces the reply (still one reply), and the request is the same conversation again.
    first_id = p.last_reply().get_attribute("data-id")
    p.last_reply().locator("button.regenerate").click()
    page.wait_for_selector(f"#messages .msg.assistant[data-state='done'][data-id]:not([data-id='{first_id}'])"
                           ":not([data-id=''])")
    assert page.locator("#messages .msg.assistant").count() == 1
    assert p.chat_bodies()[-1]["messages"] == p.chat_bodies()[-2]["messages"]

    # Edit the last user message and resend: the conversation is rewound and asked again.
    page.locator("#messages .msg.user button.edit").click()
    page.fill(".msg.user .edit-box textarea", "Think again")
    page.click(".msg.user button.save-edit")
    page.wait_for_selector("#messages .msg.user .bubble:text-is('Think again')")
    p.wait_reply()
    assert page.locator("#messages .msg.user").count() == 1 and page.locator("#messages .msg.assistant").count() == 1
    assert p.chat_bodies()[-1]["messages"] == [{"role": "user", "content": "Think again"}]

    # DeepThink is the conversation's setting: it is still on after a reload.
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    assert page.get_attribute("#deepthink", "aria-pressed") == "true"
    p.close()


def test_stop_midway_with_model_picker_and_settings(server, browser):
    p = _Page(browser, server.url)
    page = p.page
    page.click("#new-chat")
    page.select_option("#model-picker", "slow")
    page.click("#settings-button")
    page.fill("#system-prompt", "Be brief.")
    page.fill("#temperature", "0.5")
    page.click("#settings-save")
    p.send("Tell me a long story")
    page.wait_for_function("() => { const m = document.querySelector('.msg.assistant');"
                           " return m && m.querySelector('.content').textContent.length >= 3 }")
    page.click("#stop")
    p.wait_reply("stopped")
    assert "stopped" in p.last_reply().locator(".stats").text_content()
    body = p.chat_bodies()[-1]
    assert body["model"] == "slow" and body["temperature"] == 0.5
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    # The partial reply is kept, and the server stopped generating it (a full reply is ~200 tokens).
    conv_id = re.search(r"#c=(\w+)", page.url).group(1)
    stored = httpx.get(f"{server.url}/app/api/conversations/{conv_id}").json()
    (reply,) = [m for m in stored["messages"] if m["role"] == "assistant"]
    assert reply["stats"]["finish"] == "stopped" and 0 < len(reply["content"]) < 100
    assert stored["model"] == "slow" and stored["temperature"] == 0.5 and stored["system_prompt"] == "Be brief."
    time.sleep(0.5)
    assert httpx.get(f"{server.url}/health").json()["models"]["slow"] == 0   # no row left running
    p.close()


def test_injected_markup_in_model_output_does_not_execute(server, browser, artifacts):
    # The stored reply is what a model could have written; the page must show it as text.
    evil = ('Look: <img src=x onerror="window.__pwned = 1"> and <script>window.__pwned = 2</script>\n\n'
            '[link](javascript:window.__pwned=3) $x^2$\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n'
            '```python\nprint("hi")\n```')
    conv = httpx.post(f"{server.url}/app/api/conversations", json={"title": "Injected"}).json()
    for role, content in (("user", "show me"), ("assistant", evil)):
        httpx.post(f"{server.url}/app/api/conversations/{conv['id']}/messages", json={"role": role, "content": content})
    p = _Page(browser, server.url)
    page = p.page
    p.open("#c=" + conv["id"])
    content = page.locator("#messages .msg.assistant .content")
    assert "<img src=x onerror=" in content.text_content() and "<script>" in content.text_content()
    page.wait_for_timeout(300)    # an image error handler would have fired by now
    assert page.evaluate("window.__pwned") is None
    assert content.locator("img, script").count() == 0
    assert page.evaluate("window.__csp") == []     # nothing even tried: the sanitizer, not the CSP, stopped it
    # The harmless parts render: math, table, highlighted code with a copy button.
    assert content.locator("math msup").count() == 1 and content.locator("table th").count() == 2
    assert content.locator("pre code.language-python span").count() > 0
    assert content.locator("pre button.copy-code").count() == 1
    page.screenshot(path=str(artifacts / "web-injected.png"), full_page=True)
    p.close()


def test_phone_width_theme_search_rename_delete(server, browser, artifacts):
    conv = httpx.post(f"{server.url}/app/api/conversations", json={"title": "Zebra facts"}).json()
    p = _Page(browser, server.url, viewport={"width": 390, "height": 844})
    page = p.page
    # The list is tucked away on a phone and slides in on demand; nothing overflows sideways.
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    assert page.is_visible("#open-sidebar")
    assert page.locator("#sidebar").bounding_box()["x"] < 0
    page.screenshot(path=str(artifacts / "web-phone.png"))
    page.click("#open-sidebar")
    page.wait_for_function("() => document.querySelector('#sidebar').getBoundingClientRect().x >= 0")

    page.fill("#search", "zebra")
    page.wait_for_function("() => document.querySelectorAll('#conv-list li[data-id]').length === 1")
    li = page.locator(f"#conv-list li[data-id='{conv['id']}']")
    li.locator("button.rename").click()
    page.fill("#conv-list input.rename", "Zebra stripes")
    page.press("#conv-list input.rename", "Enter")
    page.wait_for_selector("#conv-list .conv-open:text-is('Zebra stripes')")
    assert httpx.get(f"{server.url}/app/api/conversations/{conv['id']}").json()["title"] == "Zebra stripes"

    theme = page.evaluate("document.documentElement.dataset.theme")
    page.click("#theme-toggle")
    flipped = "dark" if theme == "light" else "light"
    assert page.evaluate("document.documentElement.dataset.theme") == flipped
    page.screenshot(path=str(artifacts / "web-phone-list.png"))

    li.locator("button.delete").click()          # first click asks, second deletes
    assert li.locator("button.delete").text_content() == "Delete?"
    li.locator("button.delete").click()
    page.wait_for_selector(f"#conv-list li[data-id='{conv['id']}']", state="detached")
    assert httpx.get(f"{server.url}/app/api/conversations/{conv['id']}").status_code == 404
    p.open()
    assert page.evaluate("document.documentElement.dataset.theme") == flipped   # the theme is remembered
    p.close()


def test_server_with_keys_asks_for_one(models, browser, tmp_path):
    with Store(tmp_path / "keyed") as store:
        key_id, secret = store.create_key("web-user")
        server = _Server(create_app({"tiny": models["tiny"]}, store, require_auth=True, poll_s=0.05))
        try:
            ctx = browser.new_context()
            page = ctx.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(server.url + "/")
            page.wait_for_selector("#key-dialog[open]")
            page.fill("#key-input", "sk-ns-not-a-key")
            page.click("#key-save")
            page.wait_for_selector("#key-error:not([hidden])")
            assert page.is_visible("#key-dialog")
            page.fill("#key-input", secret)
            page.click("#key-save")
            page.wait_for_selector("body[data-ready='1']")
            assert page.locator("#key-button").text_content() == "Key: web-user"
            page.fill("#prompt", "Hi with a key")
            page.click("#send")
            page.wait_for_selector("#messages .msg.assistant[data-state='done'][data-id]:not([data-id=''])")
            # The key stays in this browser: a reload goes straight to the conversation.
            page.reload()
            page.wait_for_selector("body[data-ready='1']")
            assert not page.is_visible("#key-dialog")
            assert page.locator("#conv-list .conv-open").all_text_contents() == ["Hi with a key"]
            assert [r.key_id for r in store.usage_rows()] == [key_id]    # the reply was billed to the key
            ctx.close()
        finally:
            server.stop()
