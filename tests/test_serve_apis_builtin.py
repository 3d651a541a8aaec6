"""The three API formats on the built-in SmolLM2: the official `anthropic` and `openai` SDKs against one server,
one conversation, thinking pinned off, greedy: the same tokens whichever API asks."""

import anthropic
import pytest

from nanoseek.engine.scheduler import Scheduler
from nanoseek.serve.app import ServedModel, create_app
from nanoseek.weights.registry import load_model
from test_serve import _Server

SYSTEM = "You are a concise assistant."
CONVERSATION = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "Paris."},
                {"role": "user", "content": "And of Italy? Answer in one sentence."}]
MAX = 16


@pytest.fixture(scope="module")
def server():
    loaded = load_model("smollm2-135m")
    sched = Scheduler(loaded.model, loaded.tokenizer, max_batch=2, max_len=512).start()
    models = {"smollm2-135m": ServedModel("smollm2-135m", loaded.tokenizer, sched, sched.max_len)}
    s = _Server(create_app(models, None, require_auth=False, poll_s=0.05))
    yield s
    s.stop()
    sched.stop(timeout=5)


def test_same_greedy_tokens_through_three_apis(server):
    oai = server.client()
    chat = oai.chat.completions.create(model="smollm2-135m", max_tokens=MAX, temperature=0,
                                       messages=[{"role": "system", "content": SYSTEM}, *CONVERSATION],
                                       extra_body={"thinking": {"type": "disabled"}})
    claude = anthropic.Anthropic(base_url=server.url + "/anthropic", api_key="none", max_retries=0)
    msg = claude.messages.create(model="smollm2-135m", max_tokens=MAX, system=SYSTEM, messages=CONVERSATION,
                                 thinking={"type": "disabled"}, extra_body={"temperature": 0})
    with claude.messages.stream(model="smollm2-135m", max_tokens=MAX, system=SYSTEM, messages=CONVERSATION,
                                thinking={"type": "disabled"}, extra_body={"temperature": 0}) as s:
        streamed = "".join(s.text_stream)
    resp = oai.responses.create(model="smollm2-135m", max_output_tokens=MAX, temperature=0, instructions=SYSTEM,
                                input=CONVERSATION, reasoning={"effort": "none"})
    text = chat.choices[0].message.content
    assert len(text.split()) > 3     # the model's own words (SmolLM2-135M: fluent, not always right)
    assert msg.content[0].text == streamed == resp.output_text == text
    assert chat.usage.completion_tokens == msg.usage.output_tokens == resp.usage.output_tokens
    assert (chat.usage.prompt_tokens == resp.usage.input_tokens
            == msg.usage.input_tokens + msg.usage.cache_read_input_tokens)
    assert msg.stop_reason == ("end_turn" if chat.choices[0].finish_reason == "stop" else "max_tokens")
    assert claude.messages.count_tokens(model="smollm2-135m", system=SYSTEM,
                                        messages=CONVERSATION).input_tokens == chat.usage.prompt_tokens


def test_anthropic_prefill_continues_the_reply(server):
    """A final assistant message is the start of the reply (Anthropic's prefill, chat's prefix completion):
    only the continuation comes back, and together they are the free reply."""
    claude = anthropic.Anthropic(base_url=server.url + "/anthropic", api_key="none", max_retries=0)
    kw = dict(model="smollm2-135m", system=SYSTEM, extra_body={"temperature": 0})
    free = claude.messages.create(max_tokens=MAX, messages=CONVERSATION, **kw).content[0].text
    start = " ".join(free.split()[:3])
    rest = claude.messages.create(max_tokens=MAX - 3, messages=CONVERSATION + [{"role": "assistant", "content": start}],
                                  **kw).content[0].text
    assert free.startswith(start + rest) and len(rest) > 0
