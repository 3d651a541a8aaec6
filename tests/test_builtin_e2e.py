"""End to end on the built-in SmolLM2 GGUF: stop strings, chat rendering, CLI commands."""

import pytest
import torch

from nanoseek.cli import main
from nanoseek.engine.generate import Engine
from nanoseek.engine.sampling import SamplingParams
from nanoseek.weights.registry import load_model


@pytest.fixture(scope="module")
def smol():
    loaded = load_model("smollm2-135m")
    return loaded, Engine(loaded.model, loaded.tokenizer)


def _prompt(tok, text):
    from nanoseek.chat import render_prompt

    return render_prompt(tok, [{"role": "user", "content": text}]).ids


def test_stop_strings_stop_and_are_not_returned(smol):
    loaded, eng = smol
    ids = _prompt(loaded.tokenizer, "List the numbers from one to ten, in words, separated by commas.")
    free = eng.generate([ids], SamplingParams(temperature=0, max_tokens=40))[0]
    assert len(free.text) > 10
    # pick a stop string from the middle of the free output, spanning a token boundary where possible
    stop = free.text[len(free.text) // 2: len(free.text) // 2 + 3]
    cut = eng.generate([ids], SamplingParams(temperature=0, max_tokens=40, stop=[stop]))[0]
    assert cut.finish_reason == "stop"
    assert stop not in cut.text
    assert cut.text == free.text[:free.text.index(stop)]


def test_streamed_deltas_concatenate_to_the_final_text(smol):
    loaded, eng = smol
    ids = _prompt(loaded.tokenizer, "Write a haiku about the sea. Use an emoji 🌊 too.")
    pieces = []
    out = eng.generate([ids], SamplingParams(temperature=0.7, seed=3, max_tokens=48),
                       on_delta=lambda d: pieces.append(d.text))[0]
    assert "".join(pieces) == out.text
    assert out.text == loaded.tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_batch_of_different_prompts_equals_each_alone(smol):
    loaded, eng = smol
    prompts = [_prompt(loaded.tokenizer, q) for q in ("Hi!", "What is 2+2? Explain in one sentence.",
                                                      "Name three colors of the rainbow and nothing else.")]
    p = SamplingParams(temperature=0, max_tokens=16)
    together = eng.generate(prompts, p)
    for ids, out in zip(prompts, together):
        assert eng.generate([ids], p)[0].token_ids == out.token_ids


def test_cli_generate_and_models(capsys):
    assert main(["models"]) == 0
    assert "smollm2-135m" in capsys.readouterr().out
    rc = main(["generate", "What is the capital of France?", "--max-tokens", "12", "--quant", "none"])
    assert rc == 0
    assert "Paris" in capsys.readouterr().out


def test_cli_convert_round_trip(tmp_path, capsys, smol):
    loaded, _ = smol
    assert main(["convert", str(loaded.path), str(tmp_path / "hf")]) == 0
    back = load_model(str(tmp_path / "hf"))
    ids = torch.tensor([_prompt(loaded.tokenizer, "Hello")])
    with torch.no_grad():
        assert (back.model(ids) - loaded.model(ids)).abs().max() < 1e-5
    assert back.tokenizer.encode("Hello world") == loaded.tokenizer.encode("Hello world")
