"""Sampling defaults per model (issue 18): the chat CLI and the web app sample with the model's
generation_config.json, else the registry's recommendation (SmolLM2: 0.2 / 0.9), shown by `nanoseek models`
and overridable; `generate` stays greedy."""

import json

import pytest

from nanoseek.cli import _model_sampling, build_parser, main
from nanoseek.weights.registry import BUILTINS, FALLBACK_SAMPLING, SamplingDefaults, sampling_defaults


def test_registry_then_generation_config_then_fallback(tmp_path):
    assert sampling_defaults("smollm2-135m") == SamplingDefaults(0.2, 0.9, source="registry")
    d = tmp_path / "hf"
    d.mkdir()
    assert sampling_defaults(d) == FALLBACK_SAMPLING
    (d / "generation_config.json").write_text(json.dumps({"temperature": 0.3, "top_p": 0.8, "top_k": 20}))
    assert sampling_defaults(d) == SamplingDefaults(0.3, 0.8, 20, "generation_config.json")
    (d / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.3}))
    assert sampling_defaults(d).temperature == 0.0
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 1}))   # no sampling fields in it
    assert sampling_defaults(d) == FALLBACK_SAMPLING


def test_chat_takes_the_model_defaults_unless_overridden_and_generate_stays_greedy():
    parser = build_parser()
    a = parser.parse_args(["chat"])
    note = _model_sampling(a)
    assert (a.temperature, a.top_p, a.top_k) == (0.2, 0.9, 0) and "from registry" in note
    a = parser.parse_args(["chat", "--temperature", "0.9"])
    _model_sampling(a)
    assert (a.temperature, a.top_p) == (0.9, 0.9)   # the flag wins; the rest stays the model's
    g = parser.parse_args(["generate", "hi"])
    assert (g.temperature, g.top_p, g.top_k) == (0.0, 1.0, 0)


@pytest.mark.skipif("smollm2-135m" not in BUILTINS, reason="no built-in")
def test_models_lists_the_chat_sampling(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")   # one row per model, unwrapped
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "chat sampling" in out and "temperature 0.2, top-p 0.9" in out
