"""`nanoseek tokenizer train`: byte-level BPE with DeepSeek's special tokens and an R1-style chat template."""

import json
import random

import pytest
from transformers import AutoTokenizer

from nanoseek.chat import render_prompt
from nanoseek.cli import main
from nanoseek.errors import BadInputError
from nanoseek.train.tokenizer import (ASSISTANT, BOS, EOS, SPECIAL_TOKENS, THINK_CLOSE, THINK_OPEN, USER,
                                      bos_to_prepend, load_tokenizer, train_tokenizer)

VOCAB = 380   # the corpus below supports ~400 ids; a full vocabulary checks the size is exact


def corpus(n_lines=400, seed=0):
    rng = random.Random(seed)
    words = ("the king queen speaks of war and peace while rivers run to distant seas under grey skies "
             "merchants count 12 coins 345 ducats 2024 years café naïve 東京 emoji 🙂 def return None").split()
    return ["".join(rng.choice(words) + rng.choice(" ,. \n") for _ in range(rng.randint(5, 30)))
            for _ in range(n_lines)]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tt")
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus()))
    out = root / "tok"
    assert main(["tokenizer", "train", str(root / "corpus.jsonl"), "--vocab-size", str(VOCAB), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return AutoTokenizer.from_pretrained(str(tok_dir))


def test_directory_loads_with_auto_tokenizer(tok_dir, tok):
    assert len(tok) == VOCAB
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and cfg["chat_template"] == tok.chat_template
    assert not [p for p in tok_dir.iterdir() if p.name.startswith(".")]   # no temporary directory left
    assert len(load_tokenizer(str(tok_dir))) == VOCAB


def test_special_tokens_are_single_ids(tok):
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(len(SPECIAL_TOKENS)))   # bos 0, eos 1, as in DeepSeek's vocabulary
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (BOS, EOS, EOS)
    for t, i in zip(SPECIAL_TOKENS, ids):
        inside = tok.encode(f"a{t}b", add_special_tokens=False)
        assert inside.count(i) == 1 and tok.decode(inside) == f"a{t}b"
        assert tok.encode(t, add_special_tokens=False) == [i]
    # encode prepends bos (so `data prepare` adds it to each document); decoding drops only bos/eos:
    # <think> must survive for the server's reasoning split.
    ids = tok.encode(f"{USER}hi{ASSISTANT}{THINK_OPEN}x{THINK_CLOSE}y{EOS}")
    assert ids[0] == tok.bos_token_id and bos_to_prepend(tok) == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == f"{USER}hi{ASSISTANT}{THINK_OPEN}x{THINK_CLOSE}y"


@pytest.mark.parametrize("text", [
    "the king speaks of war",
    "  leading and trailing spaces \n\n and blank lines\t\ttabs",
    "unseen: Zebra-quokka! ÄÖÜ ß ∑ 東京タワー 🙂👍🏽",
    "def f(x):\n    return x ** 2  # code",
    "",
])
def test_encode_decode_round_trip(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert all(0 <= i < VOCAB for i in ids)


def test_numbers_split_into_at_most_three_digits(tok):
    pieces = [tok.decode([i]) for i in tok.encode("1234567 and 2024 and 99999", add_special_tokens=False)]
    assert max(sum(c.isdigit() for c in p) for p in pieces) <= 3
    assert "".join(pieces) == "1234567 and 2024 and 99999"


def test_chat_template_is_r1_style(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "<think>\nscratch\n</think>\n\nhello"},
            {"role": "user", "content": "again"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == (f"{BOS}Be brief.{USER}hi{ASSISTANT}hello{EOS}{USER}again{ASSISTANT}")
    assert tok.apply_chat_template(msgs[:2], tokenize=False) == f"{BOS}Be brief.{USER}hi"
    thinking = tok.apply_chat_template(msgs[1:2], tokenize=False, add_generation_prompt=True, thinking=True)
    assert thinking == f"{BOS}{USER}hi{ASSISTANT}{THINK_OPEN}\n"
    with pytest.raises(Exception, match="unsupported role: tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_render_prompt_works_with_the_trained_tokenizer(tok):
    p = render_prompt(tok, [{"role": "user", "content": "the king"}], thinking=True)
    assert p.text == f"{BOS}{USER}the king{ASSISTANT}{THINK_OPEN}\n" and p.starts_in_reasoning
    ids = [tok.convert_tokens_to_ids(t) for t in (BOS, USER, ASSISTANT, THINK_OPEN)]
    assert p.ids[:2] == ids[:2] and p.ids.count(ids[0]) == 1   # one bos: the template's, none added
    assert p.ids[-3:-1] == ids[2:] and tok.decode(p.ids) == p.text
    plain = render_prompt(tok, [{"role": "user", "content": "the king"}])
    assert plain.text.endswith(ASSISTANT) and not plain.starts_in_reasoning


def test_training_rejects_bad_settings(tmp_path):
    with pytest.raises(BadInputError, match="at least 265"):
        train_tokenizer(corpus(10), 264, tmp_path / "t")
    with pytest.raises(BadInputError, match="empty"):
        train_tokenizer([], 300, tmp_path / "t")
