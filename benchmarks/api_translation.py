"""CPU cost of the API dialects' stream translation, per streamed token (issue 17).

    python benchmarks/api_translation.py [--chunks 20000]

One chat chunk carrying one token's text, as serve/streams.py writes it, is translated N times by
serve/anthropic.py (AnthropicStream) and serve/responses.py (Output + its SSE line), and compared with what
the chat stream itself spends building and serializing that chunk. A decode step of a 135M model on CPU takes
tens of milliseconds, so microseconds here are the whole story.
"""

import argparse
import json
import time

from nanoseek.serve.anthropic import AnthropicStream, Signer
from nanoseek.serve.responses import Output, _sse
from nanoseek.serve.routes import ChatRun
from nanoseek.serve.schemas import ChatChunkChoice, ChatCompletionChunk, ChatDelta, sse_event


def chunk() -> str:
    return sse_event(ChatCompletionChunk(id="chatcmpl-x", created=1, model="m", choices=[
        ChatChunkChoice(index=0, delta=ChatDelta.of(content=" word"))]))


def per_chunk_us(n: int, step) -> float:
    t = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=20000)
    n = ap.parse_args().chunks
    raw = chunk()
    anthropic = AnthropicStream(ChatRun(), Signer(None), "m")
    responses = Output()
    chat_us = per_chunk_us(n, chunk)
    anthropic_us = per_chunk_us(n, lambda: anthropic.feed(json.loads(raw.removeprefix("data: "))))
    responses_us = per_chunk_us(n, lambda: [_sse(e) for e in responses.feed_chunk(json.loads(raw[6:]))])
    print(f"per streamed token: chat chunk {chat_us:.1f} us; + Anthropic translation {anthropic_us:.1f} us; "
          f"+ Responses translation {responses_us:.1f} us")


if __name__ == "__main__":
    main()
