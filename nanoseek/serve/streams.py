"""Engine output as API bodies: SSE streams with keep-alives, deltas to chunks, logprobs with their bytes.

Owns the streaming halves of chat and legacy completions (`chat_stream`, `completion_stream`), the logprob
rows both streamed and whole responses carry (`chat_logprobs`, `completion_logprobs`), and the small rules
they share (`finish`, `usage`, `hits`), and `replay_chunk`, how the translated dialects read a chat chunk.
Billing is not done here: a stream tells its `bill` (serve/routes.py over serve/auth.py's Ticket) how far it
got, and settles it before its last chunk.
"""

from __future__ import annotations

import logging
import re
import time

from fastapi.responses import StreamingResponse
from tokenizers import decoders
from transformers.convert_slow_tokenizer import bytes_to_unicode

from nanoseek.chat import Prompt, ReasoningSplitter
from nanoseek.serve.bridge import ClientGone, Job
from nanoseek.serve.errors import ApiError, error_response
from nanoseek.serve.schemas import (SSE_DONE, SSE_KEEPALIVE, ChatChunkChoice, ChatCompletionChunk, ChatDelta,
                                    ChatLogprobs, Completion, CompletionChoice, CompletionLogprobs, TokenLogprob,
                                    ToolCallDelta, ToolCallFunctionDelta, TopLogprob, Usage, new_id, sse_event)
from nanoseek.toolcall import CallStream

log = logging.getLogger(__name__)


def api_finish(reason: str | None) -> str:
    # "cancelled" happens only when the server stops under a request, or the client is gone; the client (if
    # any) sees the output so far as a normal end.
    return reason if reason in ("stop", "length") else "stop"


def dead_end(message: str | None) -> ApiError:
    """A constrained row whose grammar allowed no next token (engine finish_reason "error"). The grammar comes
    from the request (its schema or tools), which this tokenizer could not complete: a 422 the client can act
    on, not a server fault to retry."""
    return ApiError(422, f"Constrained decoding failed: {message or 'the grammar allowed no next token'}; "
                         "simplify the schema or tools", code="grammar_dead_end")


def usage(prompt_tokens: int, completion_tokens: int, reasoning_tokens: int = 0, cached_tokens: int = 0) -> Usage:
    return Usage.of(prompt_tokens, completion_tokens, cached_tokens=cached_tokens,
                    reasoning_tokens=min(reasoning_tokens, completion_tokens))


def hits(job: Job, prompt_tokens: int, choices_per_prompt: int) -> int:
    """Prompt tokens served from the prefix cache, counted like prompt_tokens: each prompt once (see
    Job.cached_tokens). Clamped so usage stays consistent whatever the engine reports."""
    return min(sum(job.cached_tokens(choices_per_prompt)), prompt_tokens)


_BYTE_OF_CHAR = {c: b for b, c in bytes_to_unicode().items()}   # byte-level BPE's printable stand-ins
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")                # SentencePiece's byte-fallback pieces


def _token_bytes(tok, token_id: int, text: str) -> bytes:
    """The bytes a token stands for. Decoding a lone token loses them when it holds part of a multi-byte
    character (it decodes to U+FFFD); OpenAI's `bytes` field exists so clients can rebuild such characters."""
    piece = tok.convert_ids_to_tokens(token_id)
    if isinstance(piece, str):
        m = _BYTE_PIECE.fullmatch(piece)
        if m:
            return bytes([int(m[1], 16)])
        decoder = getattr(getattr(tok, "backend_tokenizer", None), "decoder", None)
        if isinstance(decoder, decoders.ByteLevel) and all(c in _BYTE_OF_CHAR for c in piece):
            return bytes(_BYTE_OF_CHAR[c] for c in piece)
    return text.encode()


def _token_str(tok, token_id: int) -> tuple[str, list[int]]:
    """A token as logprobs show it, and its bytes. Part of a multi-byte character is written
    "bytes:\\xNN…", as OpenAI does: decoded alone it would be U+FFFD, and distinct tokens would collide."""
    text = tok.decode([token_id], clean_up_tokenization_spaces=False)
    raw = _token_bytes(tok, token_id, text)
    try:
        raw.decode()
    except UnicodeDecodeError:
        text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
    return text, list(raw)


def chat_logprobs(tok, pairs) -> list[TokenLogprob]:
    """OpenAI's chat logprobs.content from (token id, engine logprob row) pairs."""
    rows = []
    for token_id, lp in pairs:
        s, raw = _token_str(tok, token_id)
        top = [TopLogprob(token=t_s, logprob=v, bytes=t_raw)
               for (t_s, t_raw), v in ((_token_str(tok, t), v) for t, v in lp["top"])]
        rows.append(TokenLogprob(token=s, logprob=lp["logprob"], bytes=raw, top_logprobs=top))
    return rows


def completion_logprobs(tok, pairs, offset: int = 0, as_ids: bool = False) -> tuple[CompletionLogprobs, int]:
    """Legacy logprobs from (token id, engine logprob row) pairs; text offsets start at `offset` (a stream
    continues them chunk to chunk). Returns them and the offset after the last token. A row may be None (an
    echoed prompt's first token has no logprob). `as_ids`: tokens named 'token_id:N' (vLLM's
    return_tokens_as_token_ids)."""
    def name(t: int) -> str:
        return f"token_id:{t}" if as_ids else _token_str(tok, t)[0]

    lps = CompletionLogprobs()
    for token_id, lp in pairs:
        s, raw = _token_str(tok, token_id)
        lps.tokens.append(name(token_id) if as_ids else s)
        lps.token_logprobs.append(lp["logprob"] if lp is not None else None)
        lps.top_logprobs.append(({name(t): v for t, v in lp["top"]} or None) if lp is not None else None)
        lps.text_offset.append(offset)
        offset += len(bytes(raw).decode(errors="replace"))
    return lps, offset


class _StreamLogprobs:
    """Which logprob rows a stream still owes, per choice. Rows travel on the delta that sampled their token
    when the engine attaches them (`Delta.logprobs`); whatever is still unsent when a choice finishes comes
    from its Completion, so a stream always ends with exactly the rows a non-streamed request returns."""

    def __init__(self, job: Job, wanted: bool):
        self.job, self.wanted = job, wanted
        self.sent = [0] * len(job.handles)

    async def take(self, i: int, d) -> list[tuple[int, dict]]:
        if not self.wanted:
            return []
        if d.finish_reason is None:
            pairs = list(zip(d.token_ids, getattr(d, "logprobs", None) or []))
        else:
            out = await self.job.completion(i)
            pairs = list(zip(out.token_ids, out.logprobs or []))[self.sent[i]:] if out is not None else []
        self.sent[i] += len(pairs)
        return pairs



class _EventStream(StreamingResponse):
    """A StreamingResponse that closes its generator however the response ends. When the client hangs up,
    Starlette sees it as a failed send and leaves the generator suspended at its `yield`; its `finally`
    (cancel the engine requests, bill what they generated) would then wait for the garbage collector, while
    the engine kept generating for nobody."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def sse(gen) -> StreamingResponse:
    # no-cache / no buffering: proxies must pass each event through as it is written.
    return _EventStream(gen, media_type="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def replay_chunk(chunk: dict, sink) -> list:
    """One chat stream chunk (a decoded dict) walked through `sink`, the way the API dialects that translate
    the chat stream read it (serve/anthropic.py, serve/responses.py): per choice, its reasoning
    (`sink.reasoning(text)`), its content (`sink.text(text)`), each tool call's start (`sink.call(id, name)`)
    and argument fragments (`sink.arguments(fragment)`); a finish_reason is set as `sink.finish`. Returns the
    events those steps made, in order."""
    out: list = []
    for choice in chunk.get("choices") or []:
        d = choice.get("delta") or {}
        if d.get("reasoning_content"):
            out += sink.reasoning(d["reasoning_content"])
        if d.get("content"):
            out += sink.text(d["content"])
        for call in d.get("tool_calls") or []:
            fn = call.get("function") or {}
            if call.get("id"):
                out += sink.call(call["id"], fn.get("name", ""))
            if fn.get("arguments"):
                out += sink.arguments(fn["arguments"])
        if choice.get("finish_reason"):
            sink.finish = choice["finish_reason"]
    return out


async def _pump(job: Job, keepalive_s: float, bill):
    """job.events() plus keep-alive comments: yields (i, delta) or the string SSE_KEEPALIVE. Tells `bill` how
    many tokens were generated so far, so a server killed mid-stream still bills them."""
    quiet_since = time.monotonic()
    async for ev in job.events():
        if ev is not None:
            quiet_since = time.monotonic()
            bill.progress()
            yield ev
        elif job.queued and time.monotonic() - quiet_since >= keepalive_s:
            quiet_since = time.monotonic()
            yield SSE_KEEPALIVE


def _stream_error(exc: BaseException) -> str:
    _, _, body = error_response(exc)
    if body["error"]["type"] == "server_error":
        log.error("stream failed", exc_info=exc)
    return sse_event(body)


async def chat_stream(job: Job, tokenizer, name: str, prompt: Prompt, split: bool, mirror: bool,
                      include_usage: bool, keepalive_s: float, bill, plan=None):
    """`plan` (serve/structured.ChatPlan) with parse_tools: the content goes through a toolcall.CallStream,
    and calls leave as OpenAI tool-call deltas (index, id, type and name first, then argument fragments);
    a choice that made calls finishes with "tool_calls". Streams cannot take back what they sent: a call cut
    by max_tokens has had its fragments sent, and finish_reason "length" says it is incomplete."""
    rid, created = new_id("chatcmpl"), int(time.time())
    n = len(job.handles)
    splitters = [ReasoningSplitter(start_in_reasoning=prompt.starts_in_reasoning) if split else None
                 for _ in range(n)]
    reasoning_text = [""] * n
    calls = [CallStream() if plan is not None and plan.parse_tools else None for _ in range(n)]
    called = [0] * n                     # complete calls per choice

    def tool_delta(ev) -> ToolCallDelta:
        _, index, call_id, fn, args = ev
        return ToolCallDelta(index=index, id=call_id, type="function" if call_id else None,
                             function=ToolCallFunctionDelta(name=fn, arguments=args))

    logprobs = _StreamLogprobs(job, job.handles[0].params.logprobs is not None)

    def chunk(i: int, delta: ChatDelta, finish: str | None = None, lps=None) -> str:
        return sse_event(ChatCompletionChunk(id=rid, created=created, model=name, choices=[
            ChatChunkChoice(index=i, delta=delta, finish_reason=finish,
                            logprobs=ChatLogprobs(content=chat_logprobs(tokenizer, lps)) if lps else None)]))

    reasoning_tokens = 0
    spoke = [False] * n
    try:
        async for ev in _pump(job, keepalive_s, bill):
            if isinstance(ev, str):
                yield ev
                continue
            i, d = ev
            if not spoke[i]:
                # The role chunk goes out with the choice's first token, not on arrival: benchmark clients
                # (vllm bench serve) take the first chunk with `choices` as the first token.
                spoke[i] = True
                yield chunk(i, ChatDelta.of(role=True, content=""))
            sp = splitters[i]
            r, c = sp.feed(d.text) if sp else ("", d.text)
            if d.finish_reason is not None and sp:
                r2, c2 = sp.flush()
                r, c = r + r2, c + c2
            reasoning_text[i] += r
            lps = await logprobs.take(i, d)
            tools: list[ToolCallDelta] = []
            if calls[i] is not None:
                events = calls[i].feed(c) + (calls[i].finish() if d.finish_reason is not None else [])
                c = "".join(ev[1] for ev in events if ev[0] == "content")
                tools = [tool_delta(ev) for ev in events if ev[0] == "call"]
                called[i] = calls[i].closed
            if r or c or lps:
                # a token whose text is held back (a partial character, a possible stop string) still sends
                # its logprob, with empty content, as OpenAI does
                yield chunk(i, ChatDelta.of(reasoning=r or None, content=c if c or not r else None,
                                            mirror=mirror), lps=lps)
            if tools:
                yield chunk(i, ChatDelta(tool_calls=tools))
            if d.finish_reason == "error":
                raise dead_end((await job.completion(i)).error)
            if d.finish_reason is not None:
                finish = api_finish(d.finish_reason)
                yield chunk(i, ChatDelta(), "tool_calls" if finish == "stop" and called[i] else finish)
        reasoning_tokens = sum(len(tokenizer.encode(t, add_special_tokens=False)) for t in reasoning_text if t)
        await bill.done(reasoning_tokens)     # the ledger row is committed before the stream's last chunk
        if include_usage:
            yield sse_event(ChatCompletionChunk.usage_chunk(
                id=rid, created=created, model=name,
                usage=usage(len(prompt.ids), sum(job.generated), reasoning_tokens,
                             hits(job, len(prompt.ids), n))))
        yield SSE_DONE
    except ClientGone:
        pass
    except Exception as exc:     # mid-stream: the status line is gone, so the error travels as an event
        yield _stream_error(exc)
    finally:
        job.cancel()             # no-op when finished; frees the rows when the client dropped the stream
        bill.dropped(reasoning_tokens)   # no-op once done() ran


async def completion_stream(job: Job, tokenizer, name: str, echoes: list[str], prompt_tokens: int,
                            choices_per_prompt: int, include_usage: bool, keepalive_s: float, bill):
    rid, created = new_id("cmpl"), int(time.time())
    logprobs = _StreamLogprobs(job, job.handles[0].params.logprobs is not None)
    offsets = [0] * len(echoes)   # echo and logprobs exclude each other: offsets start at the output

    def chunk(i: int, text: str, finish: str | None = None, lps=None) -> str:
        lp = None
        if lps:
            lp, offsets[i] = completion_logprobs(tokenizer, lps, offsets[i])
        return sse_event(Completion(id=rid, created=created, model=name, choices=[
            CompletionChoice(index=i, text=text, logprobs=lp, finish_reason=finish)]))

    try:
        for i, echo in enumerate(echoes):
            if echo:
                yield chunk(i, echo)
        async for ev in _pump(job, keepalive_s, bill):
            if isinstance(ev, str):
                yield ev
                continue
            i, d = ev
            lps = await logprobs.take(i, d)
            if d.text or d.finish_reason is not None or lps:
                yield chunk(i, d.text, api_finish(d.finish_reason) if d.finish_reason is not None else None, lps)
        await bill.done()
        if include_usage:
            totals = usage(prompt_tokens, sum(job.generated), cached_tokens=hits(job, prompt_tokens, choices_per_prompt))
            yield sse_event(Completion.usage_chunk(id=rid, created=created, model=name, usage=totals))
        yield SSE_DONE
    except ClientGone:
        pass
    except Exception as exc:
        yield _stream_error(exc)
    finally:
        job.cancel()
        bill.dropped()

