"""The reasoning split with a model that really reasons: `<think>…</think>` → reasoning_content, rest → content.

A random model never closes a think block, so test_serve.py can only check the "ran out while thinking" case.
Here a tiny Llama is trained in the test (a second or two on CPU) to memorise one reasoning-shaped reply,

    <think>\\n2 plus 2 is 4\\n</think>\\n\\nThe answer is 4.<|im_end|>

and is then served three ways and driven by the official `openai` SDK, non-stream and stream:
  * a reasoning model (`ServedModel(reasoning=True)`) whose reply opens `<think>` itself;
  * an R1-Distill-style template that opens `<think>` in the prompt (Prompt.starts_in_reasoning), so the
    reply starts inside the block — the same token sequence, seen from two tokens later;
  * a plain model, where the think block must reach the client untouched in `content`, unless the request
    turns reasoning on with DeepSeek's `thinking` switch.

The tokenizer is byte-level like SmolLM2's, with `<think>` and `</think>` as added *non-special* tokens,
as in the DeepSeek-R1-Distill and Qwen3 tokenizers (decoding with skip_special_tokens keeps them).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from nanoseek.chat import render_prompt
from nanoseek.engine.generate import Engine
from nanoseek.engine.sampling import SamplingParams
from nanoseek.engine.scheduler import Scheduler
from nanoseek.models import build_model
from nanoseek.models.config import DenseConfig
from nanoseek.serve.app import ServedModel, create_app
from test_serve import _Server

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
R1_DISTILL = CHATML.replace("assistant\n{% endif %}", "assistant\n<think>\n{% endif %}")

QUESTION = [{"role": "user", "content": "What is 2 plus 2?"}]
REPLY = "<think>\n2 plus 2 is 4\n</think>\n\nThe answer is 4."
# What the split gives (chat.split_reasoning's convention, as DeepSeek's API returns R1 output): the newline
# after each tag is dropped, the one before `</think>` stays with the reasoning.
REASONING, CONTENT = "2 plus 2 is 4\n", "The answer is 4."
CONTEXT = 128
MAX_TOKENS = 64   # room to spare: the reply must end by itself (EOS), not by the limit


def _tokenizer(template: str) -> PreTrainedTokenizerFast:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")
    fast.chat_template = template
    return fast


def _train(tok) -> tuple[torch.nn.Module, list[int]]:
    """Memorise prompt → REPLY + EOS. Stops as soon as every reply token is the argmax under teacher forcing
    (then greedy decoding reproduces the reply exactly) with a margin, so the step count adapts to the
    machine's float noise instead of being a magic number. Returns the model and the prompt ids."""
    torch.manual_seed(0)
    cfg = DenseConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
                      eos_token_id=tok.eos_token_id)
    model = build_model(cfg)
    prompt = render_prompt(tok, QUESTION).ids
    reply = tok.encode(REPLY, add_special_tokens=False) + [tok.eos_token_id]
    seq = torch.tensor(prompt + reply)[None]
    inputs, targets = seq[:, :-1], seq[0, 1:].clone()
    targets[:len(prompt) - 1] = -100   # learn the reply, not the prompt
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for step in range(400):
        logits = model(inputs)[0]
        loss = F.cross_entropy(logits, targets, ignore_index=-100)
        with torch.no_grad():
            scored = logits[targets != -100]
            want = targets[targets != -100]
            top2 = scored.topk(2, dim=-1)
            margin = torch.where(top2.indices[:, 0] == want, top2.values[:, 0] - top2.values[:, 1], -1.0)
        if bool((margin > 1.0).all()):
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().requires_grad_(False)
    return model, prompt


@pytest.fixture(scope="module")
def trained():
    tok = _tokenizer(CHATML)
    model, prompt = _train(tok)
    return tok, model, prompt


def test_tokenizer_keeps_think_tags(trained):
    tok, _, _ = trained
    ids = tok.encode(REPLY, add_special_tokens=False)
    assert tok.convert_tokens_to_ids("<think>") in ids and tok.convert_tokens_to_ids("</think>") in ids
    assert tok.decode(ids, skip_special_tokens=True) == REPLY   # the engine's detokenizer skips specials


def test_model_learned_the_reply(trained):
    """Before blaming the server: the model alone, greedy, gives exactly REPLY and then stops on EOS."""
    tok, model, prompt = trained
    out = Engine(model, tok).generate([prompt], SamplingParams(temperature=0, max_tokens=MAX_TOKENS))[0]
    assert out.text == REPLY
    assert out.finish_reason == "stop"


@pytest.fixture(scope="module")
def server(trained):
    tok, model, _ = trained

    def served(name, template, reasoning):
        t = copy.deepcopy(tok)
        t.chat_template = template
        sched = Scheduler(copy.deepcopy(model), t, max_batch=4, max_len=CONTEXT).start()
        return ServedModel(name, t, sched, sched.max_len, reasoning=reasoning)

    models = {"reasoner": served("reasoner", CHATML, True),       # the reply opens <think> itself
              "r1-distill": served("r1-distill", R1_DISTILL, True),  # the template opens it
              "plain": served("plain", CHATML, False)}
    s = _Server(create_app(models, None, require_auth=False, poll_s=0.05))
    yield s
    s.stop()
    for m in models.values():
        m.scheduler.stop(timeout=5)


def _ask(client, model, **extra):
    return client.chat.completions.create(model=model, messages=QUESTION, max_tokens=MAX_TOKENS, temperature=0,
                                          **extra)


def _ask_stream(client, model, **extra):
    """(reasoning, content, finish reasons, usage) from the concatenated stream deltas."""
    chunks = list(_ask(client, model, stream=True, stream_options={"include_usage": True}, **extra))
    assert chunks[0].choices[0].delta.role == "assistant"
    reasoning = content = ""
    finishes = []
    for c in chunks:
        if not c.choices:
            continue
        d = c.choices[0].delta
        reasoning += (d.model_extra or {}).get("reasoning_content") or ""
        content += d.content or ""
        if c.choices[0].finish_reason:
            finishes.append(c.choices[0].finish_reason)
    assert chunks[-1].choices == []
    return reasoning, content, finishes, chunks[-1].usage


@pytest.mark.parametrize("model", ["reasoner", "r1-distill"])
def test_reasoning_split_non_stream(server, model):
    r = _ask(server.client(), model)
    msg = r.choices[0].message
    assert msg.model_extra["reasoning_content"] == REASONING
    assert msg.content == CONTENT
    assert r.choices[0].finish_reason == "stop"
    u = r.usage
    assert 0 < u.completion_tokens_details.reasoning_tokens < u.completion_tokens
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens


@pytest.mark.parametrize("model", ["reasoner", "r1-distill"])
def test_reasoning_split_stream(server, model):
    reasoning, content, finishes, usage = _ask_stream(server.client(), model)
    assert (reasoning, content) == (REASONING, CONTENT)
    assert finishes == ["stop"]
    assert 0 < usage.completion_tokens_details.reasoning_tokens < usage.completion_tokens


def test_stream_sends_reasoning_before_content(server):
    """Clients (DeepSeek's own example) read reasoning_content until content starts: no interleaving."""
    chunks = list(_ask(server.client(), "reasoner", stream=True))
    kinds = []
    for c in chunks:
        d = c.choices[0].delta
        if (d.model_extra or {}).get("reasoning_content"):
            kinds.append("r")
        if d.content:
            kinds.append("c")
    assert kinds and kinds == sorted(kinds, reverse=True) and {"r", "c"} == set(kinds)


def test_r1_prompt_counts_the_opened_tag_as_prompt(server):
    """The R1-Distill template's `<think>\\n` is in the prompt, so that reply is 2 tokens shorter."""
    client = server.client()
    ours, r1 = _ask(client, "reasoner").usage, _ask(client, "r1-distill").usage
    assert r1.prompt_tokens == ours.prompt_tokens + 2
    assert r1.completion_tokens == ours.completion_tokens - 2


def test_plain_model_leaves_think_in_content(server):
    client = server.client()
    msg = _ask(client, "plain").choices[0].message
    assert msg.content == REPLY and "reasoning_content" not in (msg.model_extra or {})
    reasoning, content, _, usage = _ask_stream(client, "plain")
    assert (reasoning, content) == ("", REPLY)
    assert usage.completion_tokens_details.reasoning_tokens == 0


def test_thinking_switch_turns_reasoning_on(server):
    """DeepSeek's `thinking: enabled` on a plain template appends `<think>\\n` to the prompt — the R1-Distill
    prompt exactly — so the model continues inside the block and the split applies."""
    client = server.client()
    on = {"extra_body": {"thinking": {"type": "enabled"}}}
    msg = _ask(client, "plain", **on).choices[0].message
    assert (msg.model_extra["reasoning_content"], msg.content) == (REASONING, CONTENT)
    assert _ask_stream(client, "plain", **on)[:2] == (REASONING, CONTENT)


def test_mirror_reasoning_flag(server):
    msg = _ask(server.client(), "reasoner", extra_body={"mirror_reasoning": True}).choices[0].message
    assert msg.model_extra["reasoning"] == msg.model_extra["reasoning_content"] == REASONING
    msg = _ask(server.client(), "reasoner").choices[0].message
    assert "reasoning" not in msg.model_extra



# ---------------------------------------------------------------------------------------------------------
# Thinking mode: reasoning_effort, budgets, and a grammar that starts after the reasoning block


def test_reasoning_budget_closes_the_block_and_the_answer_follows(trained):
    """A spent budget forces `</think>` through the constraint hook, in the one decode loop."""
    from nanoseek.chat import split_reasoning
    from nanoseek.engine.grammar import Grammar, GrammarCompiler
    tok, model, prompt = trained
    eng = Engine(model, tok)
    comp = GrammarCompiler(tok, eng.vocab_size, eng.eos_token_ids)
    out = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=MAX_TOKENS),
                       constraints=[comp.constraint(Grammar(None, reasoning="maybe", reasoning_budget=5))])[0]
    reasoning, content = split_reasoning(out.text)
    assert out.text.startswith("<think>\n2 p") and "</think>" in out.text
    assert len(tok.encode(reasoning, add_special_tokens=False)) < 5 and reasoning.startswith("2 p")
    assert out.text.count("</think>") == 1


@pytest.mark.parametrize("model", ["reasoner", "r1-distill"])
def test_json_mode_leaves_thinking_free(server, model):
    r = _ask(server.client(), model, response_format={"type": "json_object"})
    msg = r.choices[0].message
    assert msg.model_extra["reasoning_content"] == REASONING   # the memorised reasoning, untouched
    assert msg.content.lstrip().startswith("{")                # the answer is held to JSON


def test_reasoning_effort_none_turns_thinking_off_and_others_are_accepted(server):
    client = server.client()
    msg = _ask(client, "r1-distill", reasoning_effort="none").choices[0].message
    assert not (msg.model_extra or {}).get("reasoning_content")
    for effort in ("minimal", "low", "medium", "high", "xhigh", "max"):
        msg = _ask(client, "reasoner", reasoning_effort=effort).choices[0].message
        assert (msg.model_extra["reasoning_content"], msg.content) == (REASONING, CONTENT)
    assert _ask(client, "plain", reasoning_effort="high").choices[0].message.content == REPLY  # ignored
