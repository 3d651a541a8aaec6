"""GGUF export (nanoseek.weights.gguf_export): what we write reads back into the same model and tokenizer, bad
input writes nothing, and — where llama-cpp-python is installed — llama.cpp itself runs the files and agrees.

Tiny random models (a trained tokenizer of 400 ids) keep this fast. Tolerances, over a 17-token prompt:
- f16, bf16: exact (|Δlogit| ≤ 1e-5). The source weights are first rounded to values both formats hold, so the
  file loses nothing and any difference would be a layout error (row order, the k_b/v_b split, expert packing).
- quantized: each weight matrix read back within a relative RMS error of 0.01 (q8_0) / 0.12 (q4_0, q4_1) of the
  source, and logits within a relative RMS error ‖Δ‖/‖logits‖ of 0.15 (q8_0) / 0.7 (q4_*). These random
  gaussian weights are the worst case for 4-bit blocks, and a flipped expert choice moves a whole row of an
  MoE's logits; benchmarks/gguf_export.py records the figures for trained models.
"""

from __future__ import annotations

import json
import os
import re

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from nanoseek.cli import main
from nanoseek.errors import NotFoundError, UnsupportedError
from nanoseek.models import build_model
from nanoseek.models.config import DeepseekConfig, DenseConfig
from nanoseek.train.checkpoint import model_spec
from nanoseek.train.tokenizer import FIM_BEGIN, THINK_OPEN, USER, train_tokenizer
from nanoseek.weights.gguf import GGUFFile, load_gguf
from nanoseek.weights.gguf_export import PROBE_TEXT, export_gguf

TEXT = (["The quick brown fox jumps over the lazy dog 12345 times. It's 3.14! Don't stop; we'll see."] * 40
        + ["東京タワー 🙂 Ünïcödé naïve café", "def f(x):\n    return x ** 2  # code\n\n"] * 10)
PROMPT = "The quick brown fox 12345 東京 It's"
WEIGHT_TOL = {"q8_0": 0.01, "q4_0": 0.12, "q4_1": 0.12}
LOGIT_TOL = {"q8_0": 0.15, "q4_0": 0.7, "q4_1": 0.7}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(TEXT, 400, tmp_path_factory.mktemp("tok"))


def _configs(vocab: int) -> dict:
    dense = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, bos_token_id=0, eos_token_id=1)
    mla = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
               num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=32, n_routed_experts=8, num_experts_per_tok=2,
               first_k_dense_replace=1, v_head_dim=32)
    return {
        "llama": DenseConfig(arch="llama", tie_word_embeddings=True, **dense),
        "qwen2": DenseConfig(arch="qwen2", attention_bias=True, **dense),
        # the tiny preset's shape: one q projection, MTP, rope interleaved as in DeepSeek's weights
        "deepseek": DeepseekConfig(q_lora_rank=None, qk_rope_head_dim=16, n_group=2, topk_group=1,
                                   num_nextn_predict_layers=1, **mla),
        # V3's: q LoRA, group-limited routing, scaled gates, and the rotate-half rope layout (rows permuted on export)
        "deepseek-qlora": DeepseekConfig(q_lora_rank=32, qk_rope_head_dim=32, n_group=4, topk_group=2,
                                         routed_scaling_factor=2.5, rope_interleave=False, **mla),
    }


def _model(cfg, std: float = 0.1, exact: bool = False):
    torch.manual_seed(0)
    m = build_model(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(std=std)
            if exact:  # bf16 values away from f16's subnormals: stored losslessly as f16 and as bf16
                p.copy_(p.bfloat16().float().masked_fill(p.abs() < 1e-3, 0.0))
        for name, b in m.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(std=0.05)
    return m


def _logits(m, ids) -> torch.Tensor:
    with torch.no_grad():
        return m(torch.tensor([ids]))[0]


ARCHS = ["llama", "qwen2", "deepseek", "deepseek-qlora"]


# ---- round trip through nanoseek's own reader -------------------------------------------------------------
@pytest.mark.parametrize("quant", ["f16", "bf16", "q8_0", "q4_0", "q4_1"])
@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_logits(arch, quant, tok, tmp_path):
    exact = quant in ("f16", "bf16")
    m = _model(_configs(len(tok))[arch], exact=exact)
    out = tmp_path / "m.gguf"
    export_gguf(m, tok, out, quant=quant)
    back, cfg, tok2 = load_gguf(out)
    ids = tok.encode(PROMPT)
    want, got = _logits(m, ids), _logits(back, ids)
    if exact:
        assert torch.allclose(got, want, rtol=0, atol=1e-5), (got - want).abs().max()
    else:
        assert (got - want).norm() / want.norm() < LOGIT_TOL[quant]
        theirs = back.state_dict()
        # (q/kv_a rows of a rotate-half rope model come back in DeepSeek's interleaved order: skip those)
        relaid = ("q_proj", "q_b_proj", "kv_a_proj") if not getattr(m.config, "rope_interleave", True) else ()
        for k, v in m.state_dict().items():
            if v.dim() >= 2 and not k.startswith("mtp.") and not any(r in k for r in relaid):
                assert (theirs[k] - v).norm() / v.norm() < WEIGHT_TOL[quant], k
    with GGUFFile(out) as g:
        types = {n: t.qtype.name for n, t in g.tensors.items()}
    assert types["blk.0.attn_norm.weight"] == "F32"   # norms stay f32
    if arch.startswith("deepseek"):
        assert {"blk.1.attn_k_b.weight", "blk.1.attn_v_b.weight", "blk.1.ffn_gate_exps.weight",
                "blk.1.exp_probs_b.bias", "blk.0.ffn_gate.weight"} <= set(types)
        assert types["blk.1.ffn_gate_inp.weight"] == "F32"   # the router stays f32
        assert not any("nextn" in n for n in types)          # MTP left out
        assert cfg.num_nextn_predict_layers == 0
    assert tok2.encode(PROBE_TEXT) == tok.encode(PROBE_TEXT)


def test_file_metadata(tok, tmp_path):
    cfg = _configs(len(tok))["deepseek"]
    export_gguf(_model(cfg), tok, tmp_path / "m.gguf", quant="q8_0", name="tiny")
    with GGUFFile(tmp_path / "m.gguf") as g:
        meta = g.metadata
    assert meta["general.architecture"] == "deepseek2" and meta["general.name"] == "tiny"
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "llama-bpe"
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == cfg.vocab_size and len(meta["tokenizer.ggml.merges"]) > 0
    assert meta["tokenizer.ggml.bos_token_id"] == 0 and meta["tokenizer.ggml.eos_token_id"] == 1
    assert meta["tokenizer.ggml.eot_token_id"] == 1 and meta["tokenizer.ggml.padding_token_id"] == 1
    assert tokens[meta["tokenizer.ggml.fim_pre_token_id"]] == FIM_BEGIN
    types = meta["tokenizer.ggml.token_type"]
    assert types[tokens.index(USER)] == 3 and types[tokens.index(THINK_OPEN)] == 4  # control / user-defined
    assert "<think>" in meta["tokenizer.chat_template"]
    assert meta["deepseek2.attention.head_count_kv"] == 1 and meta["deepseek2.attention.q_lora_rank"] == 0
    assert meta["deepseek2.expert_gating_func"] == 2 and meta["deepseek2.leading_dense_block_count"] == 1
    assert meta["deepseek2.attention.key_length_mla"] == 48 and meta["deepseek2.attention.value_length_mla"] == 32


# ---- bad input ---------------------------------------------------------------------------------------------
def test_old_pre_tokenizer_is_refused(tok, tmp_path):
    """Digits 1-3 then GPT-2's regex (what `tokenizer train` used to write) has no llama.cpp pre-type."""
    from tokenizers import Regex, Tokenizer, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())  # a copy: the fixture is shared
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    old = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=tok.bos_token, eos_token=tok.eos_token)
    with pytest.raises(UnsupportedError, match="matches no llama.cpp pre-type"):
        export_gguf(_model(_configs(len(tok))["llama"]), old, tmp_path / "m.gguf")
    assert os.listdir(tmp_path) == []


def test_groups_with_softmax_routing_are_refused(tok, tmp_path):
    cfg = _configs(len(tok))["deepseek"]
    cfg.scoring_func = "softmax"
    with pytest.raises(UnsupportedError, match="softmax routing with expert groups"):
        export_gguf(_model(cfg), tok, tmp_path / "m.gguf")
    assert os.listdir(tmp_path) == []


def _checkpoint(path, model, tokenizer_dir=None):
    path.mkdir(parents=True)
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        weights.pop("lm_head.weight")
    save_file(weights, str(path / "model.safetensors"))
    meta = {"step": 1, "model": model_spec(model.config)}
    if tokenizer_dir:
        meta["tokenizer"] = str(tokenizer_dir)
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def test_checkpoint_without_tokenizer_gives_one_line_and_no_file(tok, tmp_path, capsys):
    ck = _checkpoint(tmp_path / "ck", _model(_configs(len(tok))["llama"]))
    assert main(["export", str(ck), str(tmp_path / "m.gguf"), "--format", "gguf"]) != 0
    err = capsys.readouterr().err.strip()
    assert "records no tokenizer" in err and "\n" not in err
    assert not (tmp_path / "m.gguf").exists()


def test_interrupted_export_leaves_no_file(tok, tmp_path, monkeypatch):
    m = _model(_configs(len(tok))["qwen2"])
    out = tmp_path / "m.gguf"
    out.write_bytes(b"previous export")

    def killed(self, *a, **kw):
        self.fout[0].write(b"half a tensor")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", killed)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(m, tok, out)
    assert out.read_bytes() == b"previous export"   # the old file is untouched...
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"]  # ...and no temp file is left behind


def test_rows_a_block_cannot_hold_fall_back_per_tensor(tok, tmp_path):
    cfg = _configs(len(tok))["llama"]
    cfg.intermediate_size = 80   # ffn_down rows of 80: not a multiple of 32
    m = _model(cfg)
    r = export_gguf(m, tok, tmp_path / "m.gguf", quant="q8_0")
    assert [str(f) for f in r.fallbacks] == [f"blk.{i}.ffn_down.weight: Q8_0 → F16 (rows of 80 do not fill "
                                             f"blocks of 32)" for i in range(2)]
    assert "Q8_0 → F16 (rows of 80 do not fill blocks of 32): blk.{0-1}.ffn_down.weight" in r.summary()
    with GGUFFile(tmp_path / "m.gguf") as g:
        assert g.tensors["blk.0.ffn_down.weight"].qtype.name == "F16"
        assert g.tensors["blk.0.ffn_up.weight"].qtype.name == "Q8_0"
    back, _, _ = load_gguf(tmp_path / "m.gguf")
    ids = tok.encode(PROMPT)
    assert (_logits(back, ids) - _logits(m, ids)).abs().max() < 0.1


def test_q4_k_m_without_llama_cpp_is_one_clear_error(tok, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "llama_cpp", None)   # as if llama-cpp-python were not installed
    with pytest.raises(UnsupportedError, match=r"pip install 'nanoseek\[bench\]'"):
        export_gguf(_model(_configs(len(tok))["llama"]), tok, tmp_path / "m.gguf", quant="q4_k_m")
    assert os.listdir(tmp_path) == []


# ---- the commands -----------------------------------------------------------------------------------------
def test_export_and_convert_commands(tok, tmp_path, capsys):
    tok_dir = tmp_path / "tok"
    tok.save_pretrained(tok_dir)
    m = _model(_configs(len(tok))["deepseek"])
    run = tmp_path / "run"
    _checkpoint(run / "checkpoints" / "step_00000001", m, tok_dir)
    assert main(["export", str(run), str(tmp_path / "a.gguf"), "--format", "gguf", "--quant", "q8_0"]) == 0
    assert "wrote" in capsys.readouterr().out
    ids = tok.encode(PROMPT)
    a, _, _ = load_gguf(tmp_path / "a.gguf")
    assert (_logits(a, ids) - _logits(m, ids)).abs().max() < 0.2
    # convert: GGUF → HF directory (as before), then HF directory → GGUF (direction from the arguments)
    assert main(["convert", str(tmp_path / "a.gguf"), str(tmp_path / "hf")]) == 0
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "b.gguf")]) == 0
    # a fine-tuning run directory exports its final/ (LoRA adapters already merged there)
    from nanoseek.weights.hf import save_hf

    save_hf(m, tmp_path / "sft" / "final", tokenizer=tok)
    (tmp_path / "sft" / "checkpoints").mkdir()
    assert main(["export", str(tmp_path / "sft"), str(tmp_path / "c.gguf")]) == 0
    c, _, _ = load_gguf(tmp_path / "c.gguf")
    assert (_logits(c, ids) - _logits(m, ids)).abs().max() < 0.05
    b, _, tok_b = load_gguf(tmp_path / "b.gguf")
    want = _logits(a, ids)
    assert (_logits(b, ids) - want).abs().max() / want.abs().max() < 0.01   # Q8_0's values, re-stored as f16
    assert tok_b.encode(PROBE_TEXT) == tok.encode(PROBE_TEXT)


# ---- llama.cpp itself -------------------------------------------------------------------------------------
def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        pytest.skip(f"llama-cpp-python is not importable ({e}); install the bench extra to run llama.cpp checks")
    return llama_cpp


def _greedy(step, ids: list[int], n: int) -> list[int]:
    out = []
    for _ in range(n):
        nxt = int(np.argmax(step(ids + out)))
        out.append(nxt)
    return out


def _trained(cfg, tok, steps: int = 60):
    """A few Adam steps on a short text: a random model's greedy choices are near-ties that f16 rounding can
    flip, a trained one's are not (llama.cpp's f16 logits differ from ours by ~1e-3; the gaps here are ≥1e-2)."""
    import torch.nn.functional as F

    data = torch.tensor(tok.encode(" ".join(TEXT[:1] + TEXT[-2:]) * 3)[:200])
    m = _model(cfg, std=0.02).train()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - 33, (8,), generator=gen)
        x = torch.stack([data[s:s + 33] for s in starts])
        loss = F.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():  # values f16 holds exactly: what llama.cpp runs is exactly our model
        for p in m.parameters():
            p.copy_(p.bfloat16().float().masked_fill(p.abs() < 1e-3, 0.0))
    return m.eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_llama_cpp_runs_the_export(arch, tok, tmp_path):
    """llama.cpp loads the f16 file, tokenizes and detokenizes text as we do, continues greedily the same for
    32 tokens and agrees on logits (max |Δ| ≤ 1% of max |logit|)."""
    llama_cpp = _llama_cpp()
    m = _trained(_configs(len(tok))[arch], tok)
    export_gguf(m, tok, tmp_path / "m.gguf", quant="f16")
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=128, n_threads=1, logits_all=True, verbose=False)
    # text both ways: a pre-tokenizer mismatch shows only here
    assert llm.tokenize(PROBE_TEXT.encode(), add_bos=False, special=False) == tok.encode(PROBE_TEXT,
                                                                                          add_special_tokens=False)
    ids = tok.encode(PROMPT)
    assert llm.tokenize(PROMPT.encode(), add_bos=True, special=False) == ids

    def ours(seq):
        return _logits(m, seq)[-1].numpy()

    def theirs(seq):
        llm.reset()
        llm.eval(seq)
        return np.asarray(llm.scores[len(seq) - 1])

    ref = _logits(m, ids).numpy()
    llm.reset()
    llm.eval(ids)
    got = np.asarray(llm.scores[:len(ids)])
    assert np.abs(got - ref).max() / np.abs(ref).max() < 0.01
    a, b = _greedy(ours, ids, 32), _greedy(theirs, ids, 32)
    assert a == b
    assert llm.detokenize(a, special=True).decode("utf-8", "replace") == tok.decode(a)


@pytest.fixture(scope="module")
def wide_llama(tok):
    cfg = _configs(len(tok))["llama"]
    cfg.hidden_size, cfg.intermediate_size = 256, 320   # Q4_K holds rows of 256, not 320 (ffn_down)
    return _trained(cfg, tok, steps=30)


@pytest.mark.parametrize("quant", ["bf16", "q8_0", "q4_0", "q4_1", "q4_k_m"])
def test_llama_cpp_runs_quantized_exports(quant, tok, wide_llama, tmp_path):
    """Each quant type loads in llama.cpp, which then agrees with nanoseek reading the same file (the same
    stored values: only the arithmetic differs, llama.cpp's 8-bit activations included) within 5% RMS, and the
    source within LOGIT_TOL (bf16 and q4_k_m: 5%). q4_k_m comes from llama.cpp's own quantizer; rows of 320
    fall back, and we say so."""
    llama_cpp = _llama_cpp()
    m = wide_llama
    r = export_gguf(m, tok, tmp_path / "m.gguf", quant=quant)
    with GGUFFile(tmp_path / "m.gguf") as g:
        types = {n: t.qtype.name for n, t in g.tensors.items()}
    if quant == "q4_k_m":
        assert types["blk.0.attn_q.weight"] in ("Q4_K", "Q6_K")
        assert types["blk.0.ffn_down.weight"] not in ("Q4_K", "Q6_K")
        assert any(str(f).startswith("blk.0.ffn_down.weight: Q4_K") and "blocks of 256" in str(f)
                   for f in r.fallbacks)
    else:
        assert types["blk.0.attn_q.weight"] == quant.upper()
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=64, n_threads=1, logits_all=True, verbose=False)
    ids = tok.encode(PROMPT)
    llm.eval(ids)
    theirs = torch.from_numpy(np.asarray(llm.scores[:len(ids)]))
    back, _, _ = load_gguf(tmp_path / "m.gguf")
    same_file, source = _logits(back, ids), _logits(m, ids)
    assert (theirs - same_file).norm() / same_file.norm() < 0.05
    assert (theirs - source).norm() / source.norm() < LOGIT_TOL.get(quant, 0.05)


# ---- Ollama -----------------------------------------------------------------------------------------------
def _go_render(template: str, root: dict) -> str:
    """The subset of Go's text/template the Modelfiles use: text, {{ .Field }}, if / else if / else / end over
    `.Field`, `eq .Field "s"`, `ne .Field "s"`, and `range .Messages`; `{{-` / `-}}` trim whitespace."""
    pieces: list[tuple[str, str]] = []   # ("text", s) or ("action", s)
    pos = 0
    for mt in re.finditer(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", template, re.S):
        text = template[pos:mt.start()]
        if mt.group(1):
            text = text.rstrip()
        if pieces and pieces[-1][0] == "trim_next":
            pieces.pop()
            text = text.lstrip()
        pieces.append(("text", text))
        pieces.append(("action", mt.group(2)))
        if mt.group(3):
            pieces.append(("trim_next", ""))
        pos = mt.end()
    tail = template[pos:]
    if pieces and pieces[-1][0] == "trim_next":
        pieces.pop()
        tail = tail.lstrip()
    pieces.append(("text", tail))

    def value(expr: str, dot: dict):
        expr = expr.strip()
        if expr.startswith('"'):
            return json.loads(expr)
        assert expr.startswith("."), expr
        return dot.get(expr[1:], "")

    def cond(expr: str, dot: dict) -> bool:
        parts = re.findall(r'"[^"]*"|\S+', expr)
        if parts[0] in ("eq", "ne"):
            same = value(parts[1], dot) == value(parts[2], dot)
            return same if parts[0] == "eq" else not same
        return bool(value(parts[0], dot))

    def block(i: int, dot: dict, out: list[str] | None) -> tuple[int, str]:
        """Render from piece i until an else/end at this level; returns (index of that piece, its action)."""
        while i < len(pieces):
            kind, s = pieces[i]
            if kind == "text":
                if out is not None:
                    out.append(s)
                i += 1
                continue
            if s == "end" or s == "else" or s.startswith("else if "):
                return i, s
            if s.startswith("if "):
                taken, c = False, s[3:]
                while True:
                    now = out is not None and not taken and (c is None or cond(c, dot))
                    i, stop = block(i + 1, dot, out if now else None)
                    taken = taken or now
                    if stop == "end":
                        break
                    c = stop[8:] if stop.startswith("else if ") else None
                i += 1
            elif s.startswith("range "):
                items = value(s[6:], dot) if out is not None else []
                end = block(i + 1, dot, None)[0]
                for item in items:
                    block(i + 1, item, out)
                i = end + 1
            else:
                if out is not None:
                    out.append(str(value(s, dot)))
                i += 1
        return i, ""

    out: list[str] = []
    block(0, root, out)
    return "".join(out)


def _parse_modelfile(text: str) -> dict:
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M)
    return {"from": re.search(r"^FROM (.+)$", text, re.M).group(1),
            "template": template.group(1) if template else None,
            "stop": [json.loads(s) for s in re.findall(r"^PARAMETER stop (.+)$", text, re.M)],
            "params": dict(re.findall(r"^PARAMETER (?!stop)(\w+) (.+)$", text, re.M))}


CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c\nd"}],
]


def _check_template(tok, fields: dict, bos: str) -> None:
    for conv in CONVERSATIONS:
        for think in (False, True):
            jinja = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True, thinking=think)
            system = next((m["content"] for m in conv if m["role"] == "system"), "")
            messages = [{"Role": m["role"], "Content": m["content"]} for m in conv]   # Ollama's field names
            go = _go_render(fields["template"], {"Messages": messages, "System": system, "Think": think})
            assert go == jinja.removeprefix(bos), (conv, think)


def test_ollama_modelfile_r1(tok, tmp_path):
    r = export_gguf(_model(_configs(len(tok))["deepseek"]), tok, tmp_path / "tiny.gguf", quant="q8_0", ollama=True)
    assert r.modelfile == tmp_path / "Modelfile" and "Modelfile" in r.summary()
    fields = _parse_modelfile(r.modelfile.read_text())
    assert fields["from"] == "./tiny.gguf"
    assert fields["stop"] == ["<｜end▁of▁sentence｜>", "<｜User｜>"]
    assert fields["params"] == {"temperature": "0.6", "top_p": "0.95", "num_ctx": "4096"}
    _check_template(tok, fields, tok.bos_token)   # the BOS is llama.cpp's to add (add_bos_token)


def test_ollama_modelfile_chatml():
    from nanoseek.weights.ollama import modelfile_text
    from nanoseek.weights.registry import BUILTINS

    try:
        smol = load_gguf(BUILTINS["smollm2-135m"].path())[2]
    except NotFoundError as e:
        pytest.skip(str(e))
    fields = _parse_modelfile(modelfile_text("smol.gguf", smol))
    assert fields["stop"] == ["<|im_end|>", "<|im_start|>"]
    assert "You are a helpful AI assistant named SmolLM" in fields["template"]   # its default system prompt
    _check_template(smol, fields, "")


@pytest.mark.parametrize("kind", ["llama3", "yarn"])
def test_scaled_rope_round_trips(kind, tok, tmp_path):
    """Llama 3.1 rope scaling travels as llama.cpp's rope_freqs tensor, DeepSeek's YaRN as metadata (its
    mscale as yarn_log_multiplier): nanoseek reads both back exactly, and llama.cpp agrees where installed."""
    from nanoseek.models.config import RopeConfig

    cfgs = _configs(len(tok))
    if kind == "llama3":
        cfg = cfgs["llama"]
        cfg.rope = RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0, original_max_position_embeddings=8192)
    else:
        cfg = cfgs["deepseek-qlora"]
        cfg.rope = RopeConfig(rope_type="yarn", factor=4.0, original_max_position_embeddings=16, mscale=1.0,
                              mscale_all_dim=1.0)
    m = _model(cfg, exact=True)
    export_gguf(m, tok, tmp_path / "m.gguf")
    back, cfg2, _ = load_gguf(tmp_path / "m.gguf")
    assert cfg2.rope.rope_type == kind
    ids = tok.encode(PROMPT * 2)   # past yarn's original 16 positions
    want = _logits(m, ids)
    assert torch.allclose(_logits(back, ids), want, rtol=0, atol=1e-5)
    try:
        import llama_cpp
    except ImportError:
        return
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=128, n_threads=1, logits_all=True, verbose=False)
    llm.eval(ids)
    theirs = torch.from_numpy(np.asarray(llm.scores[:len(ids)]).copy())
    assert (theirs - want).abs().max() / want.abs().max() < 0.01
