import itertools

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from nanoseek.chat import Prompt, ReasoningSplitter, render_prompt, split_reasoning
from nanoseek.engine.stops import StopMatcher, first_stop
from nanoseek.errors import BadInputError


def cuts(text: str, max_cuts: int):
    """Every way to cut text into deltas with at most max_cuts cut points (empty deltas included)."""
    for n in range(max_cuts + 1):
        for points in itertools.combinations_with_replacement(range(len(text) + 1), n):
            bounds = [0, *points, len(text)]
            yield [text[a:b] for a, b in zip(bounds, bounds[1:])]


# --- stop strings -------------------------------------------------------------------------------------------

def stream_stops(stops, deltas):
    m = StopMatcher(stops)
    shown, stopped_at = [], None
    for i, d in enumerate(deltas):
        text, stopped = m.feed(d)
        shown.append(text)
        if stopped:
            stopped_at = i
            break
    if stopped_at is None:
        shown.append(m.flush())
    return "".join(shown), m


STOP_CASES = [
    (["world"], "Hello, world! And more."),
    (["world"], "Hello, wor"),                          # a prefix at the end is text after all
    (["###", "\n\n"], "line one\nline two\n\nnext"),
    (["abcd", "bc"], "xxabcdyy"),                       # a longer stop starting earlier wins
    (["abcd", "bc"], "xxabcyy"),                        # ... unless it doesn't complete
    (["aab"], "aaaab tail"),                            # repeated prefix characters
    (["<|end|>", "end"], "the <|end|> end"),
    (["ab", "abc"], "zabcz"),                           # same start: the shorter one
    (["stop"], "no stop string here"[:10]),
    (["xyz"], ""),
    (["é✓"], "caféé✓ après"),
]


@pytest.mark.parametrize("stops, text", STOP_CASES)
def test_stop_matcher_any_split_agrees_with_one_shot(stops, text):
    hit = first_stop(text, stops)
    expected = text[:hit[0]] if hit else text
    for deltas in cuts(text, 2):
        shown, m = stream_stops(stops, deltas)
        assert shown == expected, deltas
        assert m.stopped == (hit is not None)
        assert m.matched == (hit[1] if hit else None)
    shown, _ = stream_stops(stops, list(text))   # one character at a time
    assert shown == expected


def test_stop_matcher_holds_back_only_possible_starts():
    m = StopMatcher(["world"])
    assert m.feed("Hello, wor") == ("Hello, ", False)
    assert m.feed("k") == ("work", False)       # "work" can no longer become "world"
    assert m.feed(" wo") == (" ", False)
    assert m.feed("rld and beyond") == ("", True)
    assert m.feed("more") == ("", True) and m.flush() == ""
    assert m.matched == "world"


def test_stop_matcher_waits_for_earlier_longer_candidate():
    m = StopMatcher(["abcd", "bc"])
    assert m.feed("xabc") == ("x", False)       # "bc" is complete but "abcd" may still come
    assert m.feed("q") == ("a", True) and m.matched == "bc"
    m = StopMatcher(["abcd", "bc"])
    assert m.feed("xabc") == ("x", False)
    assert m.flush() == "a" and m.stopped and m.matched == "bc"


def test_stop_matcher_without_stops_passes_through():
    m = StopMatcher([])
    assert m.feed("anything") == ("anything", False) and m.flush() == ""


# --- reasoning split ----------------------------------------------------------------------------------------

def stream_reasoning(deltas, start_in_reasoning):
    s = ReasoningSplitter(start_in_reasoning)
    reasoning, content = [], []
    for d in [*deltas, None]:
        r, c = s.feed(d) if d is not None else s.flush()
        reasoning.append(r)
        content.append(c)
    return "".join(reasoning), "".join(content), s.saw_reasoning


REASONING_CASES = [
    ("<think>\nLet me add.\n2+2=4\n</think>\n\nThe answer is 4.", False, ("Let me add.\n2+2=4\n", "The answer is 4.")),
    ("\n <think>x</think>y", False, ("x", "y")),
    ("Just an answer with </think> inside.", False, (None, "Just an answer with </think> inside.")),
    ("  plain", False, (None, "  plain")),
    ("Answer <think>later</think>", False, (None, "Answer <think>later</think>")),
    ("\nThinking already.\n</think>\n\nDone", True, ("Thinking already.\n", "Done")),
    ("</think>\n\nDone", True, ("", "Done")),
    ("\n\n</think>Done", True, ("", "Done")),
    ("<think>\nredundant open\n</think>\nok", True, ("redundant open\n", "ok")),
    ("<think>\nunfinished thought </thi", False, ("unfinished thought </thi", "")),
    ("<thi", False, (None, "<thi")),
    ("<thi", True, ("<thi", "")),
    ("\n\n", False, (None, "\n\n")),
    ("<think></think>", False, ("", "")),
    ("<think>a</think>b</think>c<think>d", False, ("a", "b</think>c<think>d")),
    ("<think>\n<</<//</think>\n\n\n", False, ("<</<//", "")),
]


@pytest.mark.parametrize("text, start, expected", REASONING_CASES)
def test_split_reasoning_one_shot(text, start, expected):
    assert split_reasoning(text, start) == expected


@pytest.mark.parametrize("text, start, expected", REASONING_CASES)
def test_reasoning_splitter_any_split_agrees_with_one_shot(text, start, expected):
    reasoning, content = expected
    for deltas in cuts(text, 2):
        assert stream_reasoning(deltas, start) == (reasoning or "", content, reasoning is not None), deltas
    assert stream_reasoning(list(text), start) == (reasoning or "", content, reasoning is not None)


def test_reasoning_splitter_emits_as_soon_as_unambiguous():
    s = ReasoningSplitter()
    assert s.feed("<th") == ("", "")
    assert s.feed("ink>\n\nHmm") == ("Hmm", "")
    assert s.feed(", ok</") == (", ok", "")        # "</" might be the closing tag
    assert s.feed("b>") == ("</b>", "")
    assert s.feed("</think>\n") == ("", "")
    assert s.feed("\nYes") == ("", "Yes")
    assert s.flush() == ("", "")


# --- prompt rendering ---------------------------------------------------------------------------------------

SPECIAL = ["<s>", "<|im_end|>", "<|im_start|>", "<think>", "</think>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
R1_LIKE = CHATML.replace("assistant\n{% endif %}", "assistant\n<think>\n{% endif %}")
assert R1_LIKE != CHATML
V31_LIKE = CHATML.replace("assistant\n{% endif %}",
                          "assistant\n{% if thinking %}<think>{% else %}</think>{% endif %}{% endif %}")


def make_tokenizer(template: str | None) -> PreTrainedTokenizerFast:
    """Byte-level BPE with no merges: every byte is a token, so decode(encode(text)) == text exactly."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 256)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>")
    if template:
        fast.chat_template = template
    return fast


MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}]},
    {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4", "reasoning_content": "add them"},
    {"role": "user", "content": "And 3+3?"},
]
HISTORY = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
           "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nAnd 3+3?<|im_end|>\n")


def check_ids(tok, prompt: Prompt):
    assert tok.decode(prompt.ids) == prompt.text
    assert prompt.ids[0] != tok.bos_token_id        # the template wrote no BOS, and none was added
    assert prompt.ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == prompt.text.count("<|im_start|>")


def test_render_prompt_chatml():
    tok = make_tokenizer(CHATML)
    p = render_prompt(tok, MESSAGES)
    assert p.text == HISTORY + "<|im_start|>assistant\n" and not p.starts_in_reasoning
    check_ids(tok, p)
    p = render_prompt(tok, MESSAGES, add_generation_prompt=False)
    assert p.text == HISTORY and not p.starts_in_reasoning


def test_render_prompt_thinking_switches():
    tok = make_tokenizer(CHATML)
    p = render_prompt(tok, MESSAGES, thinking=True)        # the template won't open it: we do
    assert p.text == HISTORY + "<|im_start|>assistant\n<think>\n" and p.starts_in_reasoning
    assert p.ids[-2] == tok.convert_tokens_to_ids("<think>")
    assert render_prompt(tok, MESSAGES, thinking=False).text == HISTORY + "<|im_start|>assistant\n"

    r1 = make_tokenizer(R1_LIKE)
    p = render_prompt(r1, MESSAGES)                        # R1 forces the opening itself
    assert p.text == HISTORY + "<|im_start|>assistant\n<think>\n" and p.starts_in_reasoning
    assert render_prompt(r1, MESSAGES, thinking=True) == p  # not opened twice
    p = render_prompt(r1, MESSAGES, thinking=False)
    assert p.text == HISTORY + "<|im_start|>assistant\n<think>\n\n</think>\n\n" and not p.starts_in_reasoning

    v31 = make_tokenizer(V31_LIKE)                         # a template that reads the switch itself
    assert render_prompt(v31, MESSAGES, thinking=True).text.endswith("assistant\n<think>")
    assert render_prompt(v31, MESSAGES, thinking=True).starts_in_reasoning
    p = render_prompt(v31, MESSAGES, thinking=False)
    assert p.text.endswith("assistant\n</think>") and not p.starts_in_reasoning


def test_render_prompt_without_template_uses_transcript():
    tok = make_tokenizer(None)
    p = render_prompt(tok, MESSAGES)
    assert p.text == "system: Be brief.\n\nuser: What is 2+2?\n\nassistant: 4\n\nuser: And 3+3?\n\nassistant:"
    assert p.ids[0] == tok.bos_token_id and tok.decode(p.ids[1:]) == p.text   # the tokenizer's own BOS
    assert render_prompt(tok, MESSAGES, thinking=True).text.endswith("assistant:<think>\n")


def test_render_prompt_rejects_bad_messages():
    tok = make_tokenizer(CHATML)
    with pytest.raises(BadInputError, match="only text parts"):
        render_prompt(tok, [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    with pytest.raises(BadInputError, match="messages\\[0\\]"):
        render_prompt(tok, [{"content": "no role"}])
    with pytest.raises(BadInputError, match="content"):
        render_prompt(tok, [{"role": "user", "content": 5}])
