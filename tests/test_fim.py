"""Fill-in-the-middle end to end: `data prepare` writes DeepSeek-V3's PSM documents, a tiny model trained on
one of them (a second or two on CPU) fills the hole through `POST /beta/completions` with `suffix`, so the
layout the server builds is the layout pretraining used; models without FIM tokens get a clear 400."""

import httpx
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from nanoseek.engine.scheduler import Scheduler
from nanoseek.fim import FIM_SPELLINGS, detect, fim_prompt, maybe_fim
from nanoseek.models import build_model
from nanoseek.models.config import DenseConfig
from nanoseek.serve.app import ServedModel, create_app
from test_serve import _Server

DEEPSEEK = FIM_SPELLINGS[0]
CODE = "def add(a, b):\n    return a + b\n"
CONTEXT = 96


def _tokenizer(fim: bool) -> PreTrainedTokenizerFast:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<｜end▁of▁sentence｜>"] + ([DEEPSEEK.begin, DEEPSEEK.hole, DEEPSEEK.end] if fim else []))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<｜end▁of▁sentence｜>")


def _psm_parts(doc: str) -> tuple[str, str, str]:
    """(prefix, suffix, middle) of a PSM document."""
    rest = doc.removeprefix(DEEPSEEK.begin)
    prefix, rest = rest.split(DEEPSEEK.hole)
    suffix, middle = rest.split(DEEPSEEK.end)
    return prefix, suffix, middle


def test_prepare_writes_psm_documents_at_the_rate(tmp_path):
    from nanoseek.train.data import TokenShards
    from nanoseek.train.prepare import prepare
    tok = _tokenizer(fim=True)
    tok.save_pretrained(tmp_path / "tok")
    docs = [f"document number {i} with some text" for i in range(200)]
    (tmp_path / "d.jsonl").write_text("".join(f'{{"text": "{d}"}}\n' for d in docs))
    meta = prepare([tmp_path / "d.jsonl"], str(tmp_path / "tok"), tmp_path / "out", val_fraction=0, workers=1,
                   fim_rate=0.25)
    assert meta["fim"] == {"rate": 0.25, "seed": 0, "tokens": "deepseek"}
    shards = TokenShards(tmp_path / "out")
    ids = shards.read(0, shards.num_tokens)
    begin = tok.convert_tokens_to_ids(DEEPSEEK.begin)
    assert 30 <= int((ids == begin).sum()) <= 70          # about a quarter of 200 documents
    # each FIM document holds the same characters, rearranged; the choice depends on the index alone
    for i, d in enumerate(docs):
        out = maybe_fim(DEEPSEEK, d, i, 0.25)
        if out != d:
            p, s, m = _psm_parts(out)
            assert p + m + s == d
    assert [maybe_fim(DEEPSEEK, d, i, 0.25) for i, d in enumerate(docs)] == \
           [maybe_fim(DEEPSEEK, d, i, 0.25) for i, d in enumerate(docs)]


def _train(tok, text: str) -> torch.nn.Module:
    """Memorise one PSM document + EOS until greedy decoding reproduces it (with a margin)."""
    torch.manual_seed(0)
    cfg = DenseConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
                      eos_token_id=tok.eos_token_id)
    model = build_model(cfg)
    seq = torch.tensor(tok.encode(text) + [tok.eos_token_id])[None]
    inputs, targets = seq[:, :-1], seq[0, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(400):
        logits = model(inputs)[0]
        with torch.no_grad():
            top2 = logits.topk(2, dim=-1)
            margin = torch.where(top2.indices[:, 0] == targets, top2.values[:, 0] - top2.values[:, 1], -1.0)
        if bool((margin > 1.0).all()):
            break
        loss = F.cross_entropy(logits, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def server():
    tok = _tokenizer(fim=True)
    # The training document: the code in PSM form, exactly as `data prepare` rewrites it (rate 1).
    doc = maybe_fim(detect(tok), CODE, index=3, rate=1.0)
    prefix, suffix, middle = _psm_parts(doc)
    assert middle and prefix + middle + suffix == CODE
    model = _train(tok, doc)
    sched = Scheduler(model, tok, max_batch=2, max_len=CONTEXT).start()
    plain_tok = _tokenizer(fim=False)
    plain = Scheduler(build_model(DenseConfig(vocab_size=len(plain_tok), hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                              max_position_embeddings=CONTEXT)).eval(), plain_tok,
                      max_batch=1, max_len=CONTEXT).start()
    served = {"coder": ServedModel("coder", tok, sched, CONTEXT), "plain": ServedModel("plain", plain_tok, plain, CONTEXT)}
    s = _Server(create_app(served, None, require_auth=False))
    yield s, prefix, suffix, middle
    s.stop()
    sched.stop(timeout=5)
    plain.stop(timeout=5)


def test_beta_completions_fills_the_middle(server):
    s, prefix, suffix, middle = server
    body = {"model": "coder", "prompt": prefix, "suffix": suffix, "max_tokens": 40, "temperature": 0}
    r = httpx.post(s.url + "/beta/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == middle and choice["finish_reason"] == "stop"
    # the openai SDK at the /beta base URL, the same route
    import openai
    c = openai.OpenAI(base_url=s.url + "/beta", api_key="none", max_retries=0)
    assert c.completions.create(model="coder", prompt=prefix, suffix=suffix, max_tokens=40,
                                temperature=0).choices[0].text == middle


def test_fim_prompt_is_the_pretraining_layout():
    assert fim_prompt(DEEPSEEK, "a", "c") + "b" == "<｜fim▁begin｜>a<｜fim▁hole｜>c<｜fim▁end｜>b"
    assert detect(_tokenizer(fim=True)) == DEEPSEEK and detect(_tokenizer(fim=False)) is None


def test_model_without_fim_tokens_is_a_clear_400(server):
    s = server[0]
    r = httpx.post(s.url + "/v1/completions", json={"model": "plain", "prompt": "def f(", "suffix": ")"}, timeout=30)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "suffix" and "fim" in err["message"].lower()
    assert "<｜fim▁begin｜>" in err["message"] and "<fim_prefix>" in err["message"]


def test_models_route_and_beta_chat(server):
    s = server[0]
    card = httpx.get(s.url + "/v1/models/coder", timeout=10).json()
    assert card["id"] == "coder" and card["max_model_len"] == CONTEXT
    assert httpx.get(s.url + "/v1/models/nope", timeout=10).status_code == 404
    r = httpx.post(s.url + "/beta/chat/completions", json={"model": "coder", "max_tokens": 2,
                                                           "messages": [{"role": "user", "content": "hi"}]}, timeout=30)
    assert r.status_code == 200 and r.json()["object"] == "chat.completion"
