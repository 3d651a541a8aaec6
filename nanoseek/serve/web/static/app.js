// nanoseek chat: the page's behaviour. Plain JavaScript, no build step, no third-party code.
//
// Talks to the server's public API like any client (POST /v1/chat/completions with stream: true,
// GET /v1/models) plus the app's own endpoints under /app/api (conversations, Markdown rendering).
// Model output only ever reaches the page as text (textContent) or as HTML rendered and sanitized by
// the server (/app/api/render); nothing from the model is turned into markup here.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);

const S = {
  key: store("nanoseek.key"),
  config: null,            // /app/api/config: models with prices and reasoning flags, the key's name
  models: [],              // ids from /v1/models
  list: [],                // the sidebar's conversations
  conv: null,              // the open conversation, with messages; null: a new chat not yet saved
  draft: { system_prompt: "", temperature: null },
  streaming: null,         // {controller, done: Promise} while a reply is being generated
  keyWaiters: null,
};

function store(name, value) {
  try {
    if (value === undefined) return localStorage.getItem(name);
    if (value === null) localStorage.removeItem(name); else localStorage.setItem(name, value);
  } catch (e) { /* storage disabled: settings last for this page only */ }
  return null;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c) node.append(c);
  return node;
}

// ------------------------------------------------------------------------------------------- HTTP

class ApiFailure extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function headers(extra = {}) {
  const h = { ...extra };
  if (S.key) h.Authorization = "Bearer " + S.key;
  return h;
}

async function errorText(res) {
  try {
    const body = await res.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (e) { /* not JSON */ }
  return `HTTP ${res.status}`;
}

// fetch with the key; a 401 asks for a key and tries once more.
async function request(path, opts = {}, retried = false) {
  const res = await fetch(path, { ...opts, headers: headers(opts.headers) });
  if (res.status === 401 && !retried) {
    await askKey(await errorText(res));
    return request(path, opts, true);
  }
  if (!res.ok) throw new ApiFailure(res.status, await errorText(res));
  return res;
}

async function api(path, method = "GET", body = undefined) {
  const opts = { method };
  if (body !== undefined) {
    opts.body = JSON.stringify(body);
    opts.headers = { "Content-Type": "application/json" };
  }
  const res = await request(path, opts);
  return res.status === 204 ? null : res.json();
}

async function renderMarkdown(texts) {
  if (!texts.length) return [];
  return (await api("/app/api/render", "POST", { texts })).html;
}

function showBanner(message) {
  const b = $("#banner");
  b.textContent = message;
  b.hidden = !message;
}

// ------------------------------------------------------------------------------------------- API key

function askKey(reason) {
  const dialog = $("#key-dialog");
  $("#key-input").value = "";
  const err = $("#key-error");
  err.textContent = S.key ? reason : "";
  err.hidden = !S.key;
  if (!dialog.open) dialog.showModal();
  if (!S.keyWaiters) S.keyWaiters = [];
  return new Promise((resolve) => S.keyWaiters.push(resolve));
}

async function saveKey(ev) {
  ev.preventDefault();
  const candidate = $("#key-input").value.trim();
  if (!candidate) return;
  const res = await fetch("/app/api/config", { headers: { Authorization: "Bearer " + candidate } });
  if (!res.ok) {
    $("#key-error").textContent = await errorText(res);
    $("#key-error").hidden = false;
    return;
  }
  S.key = candidate;
  store("nanoseek.key", candidate);
  $("#key-dialog").close();
  const waiters = S.keyWaiters || [];
  S.keyWaiters = null;
  waiters.forEach((resolve) => resolve());
}

// ------------------------------------------------------------------------------------------- models

async function loadModels() {
  S.config = await api("/app/api/config");
  S.models = (await api("/v1/models")).data.map((m) => m.id);
  const picker = $("#model-picker");
  picker.replaceChildren(...S.models.map((id) => {
    const info = modelInfo(id);
    return el("option", { value: id, text: info && info.reasoning ? `${id} (reasoning)` : id });
  }));
  const keyButton = $("#key-button");
  keyButton.hidden = !S.config.key;
  if (S.config.key) keyButton.textContent = `Key: ${S.config.key.name}`;
}

function modelInfo(id) {
  return S.config ? S.config.models.find((m) => m.id === id) : null;
}

function currentModel() {
  const wanted = S.conv ? S.conv.model : store("nanoseek.model");
  return S.models.includes(wanted) ? wanted : S.models[0];
}

function currentDeepthink() {
  return S.conv ? S.conv.deepthink : store("nanoseek.deepthink") === "1";
}

function syncControls() {
  $("#model-picker").value = currentModel() || "";
  $("#deepthink").setAttribute("aria-pressed", String(currentDeepthink()));
  $("#conv-title").textContent = S.conv ? S.conv.title : "New chat";
  document.title = (S.conv ? S.conv.title + " · " : "") + "nanoseek chat";
  for (const b of [$("#export-md"), $("#export-json")]) b.disabled = !S.conv;
  const busy = !!S.streaming;
  $("#send").hidden = busy;
  $("#stop").hidden = !busy;
}

async function changeModel() {
  const model = $("#model-picker").value;
  store("nanoseek.model", model);
  if (S.conv) S.conv = { ...S.conv, ...(await api(`/app/api/conversations/${S.conv.id}`, "PATCH", { model })) };
}

async function toggleDeepthink() {
  const on = !currentDeepthink();
  store("nanoseek.deepthink", on ? "1" : "0");
  if (S.conv) {
    S.conv.deepthink = on;
    await api(`/app/api/conversations/${S.conv.id}`, "PATCH", { deepthink: on });
  }
  syncControls();
}

// ------------------------------------------------------------------------------------------- sidebar

let searchTimer = null;

async function refreshList() {
  const q = $("#search").value.trim();
  S.list = (await api("/app/api/conversations" + (q ? "?q=" + encodeURIComponent(q) : ""))).data;
  renderList();
}

function renderList() {
  const ul = $("#conv-list");
  if (!S.list.length) {
    ul.replaceChildren(el("li", { class: "none", text: $("#search").value ? "No matching chats" : "No chats yet" }));
    return;
  }
  ul.replaceChildren(...S.list.map((c) => {
    const li = el("li", { "data-id": c.id, class: S.conv && S.conv.id === c.id ? "active" : "" });
    const open = el("button", { type: "button", class: "conv-open", title: c.title, text: c.title,
                                onclick: () => openConversation(c.id) });
    const rename = el("button", { type: "button", class: "conv-action rename", "aria-label": "Rename", text: "✎",
                                  onclick: () => startRename(li, c) });
    const del = el("button", { type: "button", class: "conv-action delete", "aria-label": "Delete", text: "✕",
                               onclick: () => confirmDelete(del, c) });
    li.append(open, rename, del);
    return li;
  }));
}

function startRename(li, c) {
  const input = el("input", { class: "rename", value: c.title, "aria-label": "New name" });
  let finished = false;
  const finish = async (save) => {
    if (finished) return;
    finished = true;
    const title = input.value.trim();
    if (save && title && title !== c.title) {
      const updated = await api(`/app/api/conversations/${c.id}`, "PATCH", { title });
      if (S.conv && S.conv.id === c.id) S.conv.title = updated.title;
      syncControls();
    }
    await refreshList();
  };
  input.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter") { ev.preventDefault(); finish(true); }
    if (ev.key === "Escape") finish(false);
  });
  input.addEventListener("blur", () => finish(true));
  li.replaceChildren(input);
  input.focus();
  input.select();
}

function confirmDelete(button, c) {
  if (!button.classList.contains("confirm")) {    // two clicks: no browser confirm() pop-up
    button.classList.add("confirm");
    button.textContent = "Delete?";
    setTimeout(() => { button.classList.remove("confirm"); button.textContent = "✕"; }, 4000);
    return;
  }
  (async () => {
    if (S.conv && S.conv.id === c.id) { await stopStreaming(); }
    await api(`/app/api/conversations/${c.id}`, "DELETE");
    if (S.conv && S.conv.id === c.id) newChat();
    await refreshList();
  })().catch(fail);
}

function setSidebar(open) {
  $("#app").classList.toggle("sidebar-open", open);
}

// ------------------------------------------------------------------------------------------- conversations

async function openConversation(id) {
  await stopStreaming();
  S.conv = await api(`/app/api/conversations/${id}`);
  history.replaceState(null, "", "#c=" + id);
  setSidebar(false);
  syncControls();
  renderList();
  await renderConversation();
}

function newChat() {
  stopStreaming().then(() => {
    S.conv = null;
    S.draft = { system_prompt: "", temperature: null };
    history.replaceState(null, "", location.pathname);
    setSidebar(false);
    syncControls();
    renderList();
    renderConversation();
    $("#prompt").focus();
  });
}

async function ensureConversation() {
  if (S.conv) return S.conv;
  S.conv = await api("/app/api/conversations", "POST", {
    model: currentModel(), deepthink: currentDeepthink(),
    system_prompt: S.draft.system_prompt || null, temperature: S.draft.temperature,
  });
  S.conv.messages = [];
  history.replaceState(null, "", "#c=" + S.conv.id);
  return S.conv;
}

async function renderConversation() {
  const box = $("#messages");
  const messages = S.conv ? S.conv.messages : [];
  $("#empty-state").hidden = messages.length > 0;
  box.replaceChildren($("#empty-state"));
  const pending = [];
  messages.forEach((m) => box.append(messageView(m, pending)));
  markLast();
  const html = await renderMarkdown(pending.map((p) => p.text));
  pending.forEach((p, i) => setHtml(p.target, html[i]));
  box.scrollTop = box.scrollHeight;
}

// The DOM for one stored message. Markdown targets are queued in `pending` to render in one request.
function messageView(m, pending) {
  if (m.role === "user") {
    const node = el("div", { class: "msg user", "data-id": m.id },
      el("div", { class: "bubble", text: m.content }),
      el("div", { class: "actions" },
        el("button", { type: "button", class: "edit", text: "✎ Edit", onclick: () => startEdit(node, m) }),
        el("button", { type: "button", class: "copy", text: "Copy",
                       onclick: (ev) => copyText(m.content, ev.target) })));
    return node;
  }
  const view = assistantView(m.id);
  view.node.dataset.state = "done";
  if (m.reasoning) {
    view.reasoning.hidden = false;
    view.summary.textContent = thoughtLabel(m.stats);
    pending.push({ target: view.reasoningBody, text: m.reasoning });
  }
  pending.push({ target: view.content, text: m.content });
  view.setStats(m.stats);
  view.copy.onclick = (ev) => copyText(m.content, ev.target);
  return view.node;
}

function assistantView(id) {
  const summary = el("summary", { text: "Thinking…" });
  const reasoningBody = el("div", { class: "reasoning-body md" });
  const reasoning = el("details", { class: "reasoning", hidden: true }, summary, reasoningBody);
  const content = el("div", { class: "content md" });
  const stats = el("div", { class: "stats" });
  const copy = el("button", { type: "button", class: "copy", text: "Copy" });
  const regen = el("button", { type: "button", class: "regenerate", text: "↻ Regenerate", onclick: regenerate });
  const node = el("div", { class: "msg assistant", "data-id": id || "" }, reasoning, content,
                  el("div", { class: "actions" }, copy, regen), stats);
  return {
    node, summary, reasoning, reasoningBody, content, stats, copy,
    setStats(s) { stats.textContent = statsLine(s); },
  };
}

// Only the last user message can be edited and only the last reply regenerated (no branching).
function markLast() {
  const nodes = [...document.querySelectorAll("#messages .msg")];
  const lastUser = nodes.filter((n) => n.classList.contains("user")).pop();
  const lastReply = nodes[nodes.length - 1];
  for (const n of nodes) {
    const edit = $(".edit", n), regen = $(".regenerate", n);
    if (edit) edit.hidden = n !== lastUser || !!S.streaming;
    if (regen) regen.hidden = n !== lastReply || !!S.streaming;
  }
}

function setHtml(target, html) {
  target.classList.remove("plain");
  target.innerHTML = html;           // sanitized by the server (nh3); see /app/api/render
  for (const pre of target.querySelectorAll("pre")) {
    const code = pre.querySelector("code") || pre;
    pre.append(el("button", { type: "button", class: "copy-code", text: "Copy",
                              onclick: (ev) => copyText(code.textContent, ev.target) }));
  }
}

function setPlain(target, text) {
  target.classList.add("plain");
  target.textContent = text;
}

async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch (e) {     // plain http off localhost has no clipboard API
    const area = el("textarea");
    area.style.position = "fixed";     // CSSOM, not a style attribute: the CSP allows only this
    area.style.opacity = "0";
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  if (button) {
    const old = button.textContent;
    button.textContent = "Copied";
    setTimeout(() => { button.textContent = old; }, 1200);
  }
}

// ------------------------------------------------------------------------------------------- sending

async function send(text) {
  if (S.streaming || !text.trim()) return;
  const conv = await ensureConversation();
  const m = await api(`/app/api/conversations/${conv.id}/messages`, "POST", { role: "user", content: text });
  conv.messages.push(m);
  $("#empty-state").hidden = true;
  $("#messages").append(messageView(m, []));
  refreshTitle(conv).catch(fail);
  await generate();
}

async function refreshTitle(conv) {
  const fresh = await api(`/app/api/conversations/${conv.id}`);
  if (S.conv && S.conv.id === conv.id) { S.conv.title = fresh.title; syncControls(); }
  await refreshList();
}

function startEdit(node, m) {
  if (S.streaming) return;
  const area = el("textarea", { "aria-label": "Edit message" });
  area.value = m.content;
  const save = el("button", { type: "button", class: "primary save-edit", text: "Save & send" });
  const cancel = el("button", { type: "button", text: "Cancel", onclick: () => renderConversation() });
  save.onclick = async () => {
    const text = area.value;
    if (!text.trim()) return;
    await api(`/app/api/conversations/${S.conv.id}/messages/${m.id}`, "DELETE");
    S.conv.messages = S.conv.messages.filter((x) => x.id < m.id);
    await renderConversation();
    await send(text);
  };
  node.replaceChildren(el("div", { class: "edit-box" }, area, el("div", { class: "actions" }, cancel, save)));
  area.focus();
}

async function regenerate() {
  if (S.streaming || !S.conv) return;
  const last = S.conv.messages[S.conv.messages.length - 1];
  if (last && last.role === "assistant") {
    await api(`/app/api/conversations/${S.conv.id}/messages/${last.id}`, "DELETE");
    S.conv.messages.pop();
    await renderConversation();
  }
  await generate();
}

async function stopStreaming() {
  if (!S.streaming) return;
  S.streaming.controller.abort();
  await S.streaming.done;
}

// One reply: stream it in, then store it with its stats.
function generate() {
  const conv = S.conv;
  const controller = new AbortController();
  let finished;
  S.streaming = { controller, done: new Promise((r) => { finished = r; }) };
  syncControls();
  markLast();
  return streamReply(conv, controller).catch(fail).finally(() => {
    S.streaming = null;
    finished();
    syncControls();
    markLast();
  });
}

async function streamReply(conv, controller) {
  const model = conv.model && S.models.includes(conv.model) ? conv.model : currentModel();
  const messages = [];
  if (conv.system_prompt) messages.push({ role: "system", content: conv.system_prompt });
  for (const m of conv.messages) messages.push({ role: m.role, content: m.content });
  const body = {
    model, messages, stream: true, stream_options: { include_usage: true },
    thinking: { type: conv.deepthink ? "enabled" : "disabled" },
  };
  if (conv.temperature !== null && conv.temperature !== undefined) body.temperature = conv.temperature;

  const view = assistantView(null);
  view.node.dataset.state = "streaming";
  $("#messages").append(view.node);
  markLast();
  const box = $("#messages");
  const stickToBottom = () => {
    if (box.scrollHeight - box.scrollTop - box.clientHeight < 120) box.scrollTop = box.scrollHeight;
  };

  const t = { start: performance.now(), first: null, thinkStart: null, thinkEnd: null, end: null };
  let reasoning = "", content = "", usage = null, finish = null, error = null, stopped = false;
  const calls = [];                          // tool calls, reassembled from their deltas
  const live = { reasoning: liveRenderer(view.reasoningBody), content: liveRenderer(view.content) };

  try {
    const res = await request("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body), signal: controller.signal,
    });
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buf = "", done = false;
    while (!done) {
      const { value, done: eof } = await reader.read();
      if (eof) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
        if (!data) continue;                   // ": keep-alive" comments
        if (data === "[DONE]") { done = true; break; }
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiFailure(500, chunk.error.message || "the server failed mid-reply");
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          const d = choice.delta || {};
          const r = d.reasoning_content ?? d.reasoning;   // vLLM/Ollama call it `reasoning`
          const now = performance.now();
          if (r) {
            if (t.first === null) t.first = now;
            if (t.thinkStart === null) t.thinkStart = now;
            reasoning += r;
            view.reasoning.hidden = false;
            view.reasoning.open = true;        // open while thinking, folded once the answer is in
            live.reasoning.update(reasoning);
          }
          if (d.content) {
            if (t.first === null) t.first = now;
            if (t.thinkStart !== null && t.thinkEnd === null) t.thinkEnd = now;
            content += d.content;
            live.content.update(content);
          }
          for (const tc of d.tool_calls || []) {
            const call = calls[tc.index] ??= { name: "", arguments: "" };
            if (tc.function?.name) call.name = tc.function.name;
            call.arguments += tc.function?.arguments || "";
            live.content.update(readable(content, calls));
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
        stickToBottom();
      }
    }
  } catch (e) {
    if (e.name === "AbortError") stopped = true;
    else error = e;
  }
  t.end = performance.now();
  if (t.thinkStart !== null && t.thinkEnd === null) t.thinkEnd = t.end;

  const stats = replyStats(model, usage, t, stopped ? "stopped" : finish);
  view.node.dataset.state = error ? "error" : stopped ? "stopped" : "done";
  live.reasoning.stop();
  live.content.stop();
  if (reasoning) {
    view.summary.textContent = thoughtLabel(stats);
    view.reasoning.open = false;
  }
  const texts = reasoning ? [reasoning, readable(content, calls)] : [readable(content, calls)];
  const html = await renderMarkdown(texts).catch(() => null);
  if (html) {
    if (reasoning) setHtml(view.reasoningBody, html[0]);
    setHtml(view.content, html[html.length - 1]);
  }
  if (error) {
    view.content.append(el("p", { class: "error", text: "⚠ " + error.message }));
    view.setStats(null);
    if (!content && !reasoning) {       // nothing worth keeping: offer to try again
      view.node.querySelector(".regenerate").hidden = true;
      view.node.querySelector(".actions").append(el("button", {
        type: "button", text: "↻ Retry", onclick: () => { view.node.remove(); generate(); } }));
      return;
    }
  }
  if (!content && !reasoning && stopped) { view.node.remove(); return; }
  view.setStats(stats);
  view.copy.onclick = (ev) => copyText(content, ev.target);
  const saved = await api(`/app/api/conversations/${conv.id}/messages`, "POST",
                          { role: "assistant", content, reasoning: reasoning || null, stats });
  conv.messages.push(saved);
  view.node.dataset.id = saved.id;
  refreshList().catch(fail);
}

// A reply as Markdown to show: a reply that is one JSON value is pretty-printed in a json code block, and
// tool calls follow as code blocks naming the function (the stored reply keeps the raw text).
function readable(content, calls) {
  let text = content;
  const t = content.trim();
  if (t.startsWith("{") || t.startsWith("[")) {
    try { text = "```json\n" + JSON.stringify(JSON.parse(t), null, 2) + "\n```"; } catch (e) { /* not JSON */ }
  }
  for (const c of calls || []) {
    let args = c.arguments;
    try { args = JSON.stringify(JSON.parse(args), null, 2); } catch (e) { /* still streaming */ }
    text += `\n\n**Tool call** \`${c.name}\`\n\n\`\`\`json\n${args}\n\`\`\``;
  }
  return text;
}

// Renders streamed text as Markdown while it streams: one request in flight at most, and at most one started
// per RENDER_EVERY_MS, so a fast model doesn't turn every token into a request. Plain text until the first
// rendered HTML arrives.
const RENDER_EVERY_MS = 250;

function liveRenderer(target) {
  let latest = "", timer = null, busy = false, stopped = false, shownHtml = false, lastStart = -Infinity;
  const schedule = () => {
    if (busy || timer !== null || stopped) return;
    timer = setTimeout(run, Math.max(0, RENDER_EVERY_MS - (performance.now() - lastStart)));
  };
  const run = async () => {
    timer = null;
    busy = true;
    lastStart = performance.now();
    const text = latest;
    try {
      const [html] = await renderMarkdown([text]);
      if (!stopped) { setHtml(target, html); shownHtml = true; }
    } catch (e) { /* the final render will try again */ }
    busy = false;
    if (text !== latest) schedule();
  };
  return {
    update(text) {
      latest = text;
      if (!shownHtml) setPlain(target, text);
      schedule();
    },
    stop() { stopped = true; clearTimeout(timer); },
  };
}

function replyStats(model, usage, t, finish) {
  const s = { model, finish: finish || null, elapsed_s: round((t.end - t.start) / 1000, 2) };
  if (t.first !== null) s.ttft_s = round((t.first - t.start) / 1000, 2);
  if (t.thinkStart !== null) s.thought_s = round((t.thinkEnd - t.thinkStart) / 1000, 1);
  if (usage) {
    const details = usage.prompt_tokens_details || {};
    s.prompt_tokens = usage.prompt_tokens;
    s.completion_tokens = usage.completion_tokens;
    s.cached_tokens = details.cached_tokens ?? usage.prompt_cache_hit_tokens ?? 0;
    const reasoningDetails = usage.completion_tokens_details || {};
    if (reasoningDetails.reasoning_tokens) s.reasoning_tokens = reasoningDetails.reasoning_tokens;
    const decode_s = (t.end - (t.first ?? t.start)) / 1000;
    if (decode_s > 0 && usage.completion_tokens > 1) s.tok_per_s = round((usage.completion_tokens - 1) / decode_s, 1);
    const info = modelInfo(model);
    if (info && info.prices) {
      const p = info.prices, hit = s.cached_tokens, miss = usage.prompt_tokens - hit;
      s.cost_usd = (hit * p.input_cache_hit + miss * p.input_cache_miss + usage.completion_tokens * p.output) / 1e6;
    }
  }
  return s;
}

function round(x, digits) {
  const f = 10 ** digits;
  return Math.round(x * f) / f;
}

function thoughtLabel(stats) {
  const n = stats && stats.thought_s !== undefined ? Math.max(1, Math.round(stats.thought_s)) : null;
  return n === null ? "Thoughts" : `Thought for ${n} s`;
}

function statsLine(s) {
  if (!s) return "";
  const parts = [];
  if (s.model) parts.push(s.model);
  if (s.completion_tokens !== undefined) parts.push(`${s.completion_tokens} tokens`);
  if (s.tok_per_s !== undefined) parts.push(`${s.tok_per_s} tok/s`);
  if (s.prompt_tokens !== undefined) parts.push(`prompt ${s.prompt_tokens} (${s.cached_tokens || 0} cached)`);
  if (s.cost_usd !== undefined) {
    parts.push("$" + (s.cost_usd < 0.01 ? s.cost_usd.toPrecision(2) : s.cost_usd.toFixed(4)));
  }
  if (s.elapsed_s !== undefined) parts.push(`${s.elapsed_s} s`);
  if (s.finish === "stopped") parts.push("stopped");
  else if (s.finish === "length") parts.push("cut at max tokens");
  return parts.join(" · ");
}

// ------------------------------------------------------------------------------------------- settings, export

function openSettings() {
  const src = S.conv || S.draft;
  $("#system-prompt").value = src.system_prompt || "";
  $("#temperature").value = src.temperature === null || src.temperature === undefined ? "" : src.temperature;
  $("#settings-dialog").showModal();
}

async function closeSettings() {
  if ($("#settings-dialog").returnValue !== "save") return;
  const raw = $("#temperature").value.trim();
  const temperature = raw === "" ? null : Math.min(2, Math.max(0, Number(raw)));
  const settings = { system_prompt: $("#system-prompt").value, temperature };
  if (S.conv) Object.assign(S.conv, await api(`/app/api/conversations/${S.conv.id}`, "PATCH", settings),
                            { messages: S.conv.messages });
  else S.draft = settings;
}

async function exportConversation(format) {
  if (!S.conv) return;
  const res = await request(`/app/api/conversations/${S.conv.id}/export?format=${format}`);
  const match = /filename="([^"]+)"/.exec(res.headers.get("Content-Disposition") || "");
  const url = URL.createObjectURL(await res.blob());
  const a = el("a", { href: url, download: match ? match[1] : `conversation.${format === "json" ? "json" : "md"}` });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

function toggleTheme() {
  const dark = document.documentElement.dataset.theme !== "dark";
  document.documentElement.dataset.theme = dark ? "dark" : "light";
  store("nanoseek.theme", dark ? "dark" : "light");
}

function fail(e) {
  console.error(e);
  showBanner(e && e.message ? e.message : String(e));
}

// ------------------------------------------------------------------------------------------- start

function bind() {
  const on = (sel, ev, fn) => $(sel).addEventListener(ev, (e) => {
    showBanner("");
    Promise.resolve(fn(e)).catch(fail);
  });
  on("#new-chat", "click", newChat);
  on("#composer", "submit", (ev) => {
    ev.preventDefault();
    const text = $("#prompt").value;
    if (!text.trim() || S.streaming) return;
    $("#prompt").value = "";
    return send(text).catch((e) => {
      if (!$("#prompt").value) $("#prompt").value = text;    // don't lose what was typed
      throw e;
    });
  });
  $("#prompt").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      $("#composer").requestSubmit();
    }
  });
  on("#stop", "click", stopStreaming);
  on("#deepthink", "click", toggleDeepthink);
  on("#model-picker", "change", changeModel);
  on("#settings-button", "click", openSettings);
  on("#settings-dialog", "close", closeSettings);
  on("#export-md", "click", () => exportConversation("markdown"));
  on("#export-json", "click", () => exportConversation("json"));
  on("#theme-toggle", "click", toggleTheme);
  on("#key-button", "click", () => askKey("").then(loadModels));
  on("#key-form", "submit", saveKey);
  on("#open-sidebar", "click", () => setSidebar(true));
  on("#close-sidebar", "click", () => setSidebar(false));
  on("#backdrop", "click", () => setSidebar(false));
  $("#search").addEventListener("input", () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => refreshList().catch(fail), 200);
  });
}

async function start() {
  bind();
  syncControls();
  await loadModels();
  await refreshList();
  const id = new URLSearchParams(location.hash.slice(1)).get("c");
  if (id && S.list.some((c) => c.id === id)) await openConversation(id);
  else await renderConversation();
  document.body.dataset.ready = "1";    // for tests and scripts: the first load is done
}

start().catch(fail);
