"""Token shards (`nanoseek data prepare`) and the packed loader."""

import json
import sys

import numpy as np
import pytest
import torch

from nanoseek.cli import main
from nanoseek.errors import BadInputError, NotFoundError, UnsupportedError
from nanoseek.train import prepare as prep
from nanoseek.train.data import PackedLoader, ShardWriter, TokenShards, iter_eval_batches, write_meta
from nanoseek.train.tokenizer import train_tokenizer

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Numbers 12345 and ünïcödé text, plus a tab\tand emoji 🙂.",
    "  leading spaces and a trailing newline\n",
    "Short.",
    "Another document about foxes and dogs, quick and lazy.",
    "Line one\nline two\nline three",
    "A seventh document.",
    "The eighth and last one.",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(DOCS * 20, 400, out, min_frequency=2)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))


def expected_doc(tok, text):
    return [tok.bos_token_id, *tok.encode(text, add_special_tokens=False), tok.eos_token_id]


def write_jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


# --- prepare ---------------------------------------------------------------------------------------------

def test_prepare_txt_and_jsonl_round_trip(tmp_path, tok_dir, tok):
    (tmp_path / "a.txt").write_text(DOCS[0])
    write_jsonl(tmp_path / "b.jsonl", DOCS[1:4] + ["   \n"])   # a blank row is skipped
    out = tmp_path / "shards"
    meta = prep.prepare([tmp_path / "a.txt", tmp_path / "b.jsonl"], str(tok_dir), out, val_fraction=0, workers=1)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == len(tok) == 400
    assert meta["bos_id"] == tok.bos_token_id and meta["eos_id"] == tok.eos_token_id
    assert meta["splits"]["val"] == []
    s = TokenShards(out)
    docs = [expected_doc(tok, t) for t in DOCS[:4]]
    assert s.read(0, s.num_tokens).tolist() == sum(docs, [])
    assert s.num_docs == 4 and s.doc_starts.tolist() == np.cumsum([0] + [len(d) for d in docs[:-1]]).tolist()
    for start, d in zip(s.doc_starts, docs):   # each document ends with eos
        assert s.read(int(start) + len(d) - 1, int(start) + len(d)).tolist() == [tok.eos_token_id]
    assert (out / "train-00000.bin").stat().st_size == s.num_tokens * 2
    assert not list(out.glob(".*"))   # no temporary files left


def test_blank_line_split_and_directory_input(tmp_path, tok_dir, tok):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "b.txt").write_text("second file\n")
    (src / "a.txt").write_text("para one\nstill one\n\n\n   \npara two\n\n  indented three")
    (src / "notes.csv").write_text("ignored")
    meta = prep.prepare([src], str(tok_dir), tmp_path / "out", val_fraction=0, workers=1, doc_split="blank-lines")
    s = TokenShards(tmp_path / "out")
    texts = ["para one\nstill one", "para two", "  indented three", "second file\n"]
    assert s.read(0, s.num_tokens).tolist() == sum((expected_doc(tok, t) for t in texts), [])
    assert meta["splits"]["train"][0]["docs"] == 4


def test_output_is_identical_for_any_worker_count(tmp_path, tok_dir, monkeypatch):
    texts = [f"{DOCS[i % 8]} variant {i}" for i in range(40)]
    write_jsonl(tmp_path / "d.jsonl", texts)
    monkeypatch.setattr(prep, "BATCH_DOCS", 3)   # many small tasks, so the two workers interleave
    outs = {}
    for w in (1, 2):
        outs[w] = tmp_path / f"w{w}"
        prep.prepare([tmp_path / "d.jsonl"], str(tok_dir), outs[w], val_fraction=0.1, workers=w, shard_tokens=97)
    files = sorted(p.name for p in outs[1].iterdir())
    assert files == sorted(p.name for p in outs[2].iterdir()) and len(files) > 6   # several shards
    for name in files:
        assert (outs[1] / name).read_bytes() == (outs[2] / name).read_bytes(), name
    # shards cut the stream at exactly 97 tokens; reading across the cuts gives the documents back
    meta = json.loads((outs[1] / "meta.json").read_text())
    assert all(e["tokens"] == 97 for e in meta["splits"]["train"][:-1])
    assert 0 < meta["splits"]["train"][-1]["tokens"] <= 97


def test_val_split_takes_evenly_spaced_whole_documents(tmp_path, tok_dir, tok):
    write_jsonl(tmp_path / "d.jsonl", DOCS)
    prep.prepare([tmp_path / "d.jsonl"], str(tok_dir), tmp_path / "o", val_fraction=0.25, workers=1)
    train, val = TokenShards(tmp_path / "o", "train"), TokenShards(tmp_path / "o", "val")
    want_val = [3, 7]   # floor((i+1)/4) > floor(i/4)
    assert val.read(0, val.num_tokens).tolist() == sum((expected_doc(tok, DOCS[i]) for i in want_val), [])
    assert train.read(0, train.num_tokens).tolist() == sum(
        (expected_doc(tok, DOCS[i]) for i in range(8) if i not in want_val), [])
    assert (train.num_docs, val.num_docs) == (6, 2)


def test_single_document_is_split_by_tokens(tmp_path, tok_dir, tok, shared_data):
    src = tmp_path / "shakespeare.txt"   # a slice keeps the test fast on a busy CI machine
    src.write_text((shared_data / "tinyshakespeare" / "input.txt").read_text()[:100_000])
    prep.prepare([src], str(tok_dir), tmp_path / "o", val_fraction=0.1, workers=1)
    train, val = TokenShards(tmp_path / "o", "train"), TokenShards(tmp_path / "o", "val")
    whole = expected_doc(tok, src.read_text())
    assert train.read(0, train.num_tokens).tolist() + val.read(0, val.num_tokens).tolist() == whole
    assert val.num_tokens == round(0.1 * len(whole))
    assert val.read(val.num_tokens - 1, val.num_tokens)[0] == tok.eos_token_id


def test_large_vocabulary_is_stored_as_uint32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(70_000)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>").save_pretrained(tmp_path / "tk")
    (tmp_path / "a.txt").write_text("w69999 w5 w65534 w65535")
    meta = prep.prepare([tmp_path / "a.txt"], str(tmp_path / "tk"), tmp_path / "o", val_fraction=0, workers=1)
    assert meta["dtype"] == "uint32" and meta["bos_id"] is None and meta["eos_id"] == 1
    s = TokenShards(tmp_path / "o")
    assert s.dtype == np.uint32 and s.read(0, s.num_tokens).tolist() == [70001, 7, 65536, 65537, 1]


def test_reprepare_removes_stale_shards(tmp_path, tok_dir):
    write_jsonl(tmp_path / "d.jsonl", DOCS)
    prep.prepare([tmp_path / "d.jsonl"], str(tok_dir), tmp_path / "o", val_fraction=0, workers=1, shard_tokens=20)
    assert (tmp_path / "o" / "train-00003.bin").exists()
    prep.prepare([tmp_path / "d.jsonl"], str(tok_dir), tmp_path / "o", val_fraction=0, workers=1)
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["meta.json", "train-00000.bin", "train-00000.idx"]


def test_bad_inputs_name_the_problem(tmp_path, tok_dir, monkeypatch):
    tok = str(tok_dir)
    with pytest.raises(NotFoundError, match="nope.txt"):
        prep.prepare([tmp_path / "nope.txt"], tok, tmp_path / "o")
    (tmp_path / "ok.txt").write_text("fine")
    with pytest.raises(NotFoundError, match="no-such-tokenizer: not a built-in model"):
        prep.prepare([tmp_path / "ok.txt"], "no-such-tokenizer", tmp_path / "o")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(UnsupportedError, match="x.csv"):
        prep.prepare([tmp_path / "x.csv"], tok, tmp_path / "o")
    write_jsonl(tmp_path / "d.jsonl", ["fine", "fine"])
    with (tmp_path / "d.jsonl").open("a") as f:
        f.write('{"body": "no text field"}\n')
    with pytest.raises(BadInputError, match=r"d\.jsonl:3: no string field 'text' \(has: body\)"):
        prep.prepare([tmp_path / "d.jsonl"], tok, tmp_path / "o", workers=1)
    (tmp_path / "e.jsonl").write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(BadInputError, match=r"e\.jsonl:2: not valid JSON"):
        prep.prepare([tmp_path / "e.jsonl"], tok, tmp_path / "o", workers=1)
    (tmp_path / "blank.txt").write_text("  \n\n")
    with pytest.raises(BadInputError, match="no documents"):
        prep.prepare([tmp_path / "blank.txt"], tok, tmp_path / "o", workers=1)
    with pytest.raises(BadInputError, match="val-fraction"):
        prep.prepare([tmp_path / "d.jsonl"], tok, tmp_path / "o", val_fraction=1.0)
    # optional readers: a clear message naming the package when it is not installed
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(UnsupportedError, match="t.parquet: reading Parquet needs pyarrow"):
        prep.prepare([tmp_path / "t.parquet"], tok, tmp_path / "o", workers=1)
    with pytest.raises(UnsupportedError, match="hf:some/set: .* datasets package"):
        prep.prepare(["hf:some/set"], tok, tmp_path / "o", workers=1)


def test_parquet_input(tmp_path, tok_dir, tok):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": DOCS[:3]}), tmp_path / "d.parquet")
    prep.prepare([tmp_path / "d.parquet"], str(tok_dir), tmp_path / "o", val_fraction=0, workers=1,
                 text_field="content")
    s = TokenShards(tmp_path / "o")
    assert s.read(0, s.num_tokens).tolist() == sum((expected_doc(tok, t) for t in DOCS[:3]), [])


def test_cli_prepare(tmp_path, tok_dir, capsys):
    write_jsonl(tmp_path / "d.jsonl", DOCS, field="body")
    out = tmp_path / "o"
    assert main(["data", "prepare", str(tmp_path / "d.jsonl"), "--tokenizer", str(tok_dir), "--out", str(out),
                 "--text-field", "body", "--val-fraction", "0.25", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "train:" in printed and "6 documents" in printed and "2 documents" in printed
    assert TokenShards(out, "val").num_docs == 2
    assert main(["data", "prepare", str(tmp_path / "missing.jsonl"), "--tokenizer", str(tok_dir),
                 "--out", str(out)]) == NotFoundError.exit_code
    assert "missing.jsonl" in capsys.readouterr().err


# --- shard validation -------------------------------------------------------------------------------------

def make_shards(path, n_tokens, vocab=1 << 16, shard_tokens=1 << 30, split="train", doc_len=50):
    """Token value = its position in the stream (mod vocab), so every read can be checked by arithmetic."""
    path.mkdir(parents=True, exist_ok=True)
    w = ShardWriter(path, split, "uint16", shard_tokens)
    tokens = np.arange(n_tokens) % vocab
    for i in range(0, n_tokens, doc_len):
        w.add(tokens[i:i + doc_len])
    splits = {"train": [], "val": [], split: w.close()}
    write_meta(path, {"dtype": "uint16", "vocab_size": vocab, "tokenizer": "test", "bos_id": None, "eos_id": None,
                      "splits": splits})
    return path


def test_reading_across_shards(tmp_path):
    s = TokenShards(make_shards(tmp_path / "s", 1000, shard_tokens=64, doc_len=30))
    assert len(s.meta["splits"]["train"]) == 16 and s.num_tokens == 1000
    assert s.read(60, 200).tolist() == list(range(60, 200))
    assert s.read(999, 1000).tolist() == [999] and s.read(5, 5).tolist() == []
    assert s.doc_starts.tolist() == list(range(0, 1000, 30))
    with pytest.raises(IndexError):
        s.read(990, 1001)


def test_corrupt_or_inconsistent_shards_fail_clearly(tmp_path):
    d = make_shards(tmp_path / "s", 300, shard_tokens=128)
    meta = json.loads((d / "meta.json").read_text())

    def rewrite(**change):
        (d / "meta.json").write_text(json.dumps({**meta, **change}))

    with open(d / "train-00001.bin", "r+b") as f:   # truncated
        f.truncate(100)
    with pytest.raises(BadInputError, match=r"train-00001\.bin: 100 bytes, meta.json says 256"):
        TokenShards(d)
    (d / "train-00001.bin").unlink()
    with pytest.raises(NotFoundError, match=r"train-00001\.bin: listed in .* but missing"):
        TokenShards(d)
    rewrite(dtype="uint16", vocab_size=70_000)
    with pytest.raises(BadInputError, match="'dtype' must be wide enough for vocab_size 70000"):
        TokenShards(d)
    rewrite(format="something-else")
    with pytest.raises(BadInputError, match="'format' is 'something-else'"):
        TokenShards(d)
    rewrite(splits={"train": [{"file": "train-00000.bin", "tokens": -1, "docs": 0}]})
    with pytest.raises(BadInputError, match=r"splits.train\[0\]"):
        TokenShards(d)
    rewrite()
    with pytest.raises(NotFoundError, match="no split 'test'"):
        TokenShards(d, "test")
    (d / "meta.json").write_text("{not json")
    with pytest.raises(BadInputError, match="meta.json: not valid JSON"):
        TokenShards(d)
    (d / "meta.json").unlink()
    with pytest.raises(NotFoundError, match="meta.json: no such file"):
        TokenShards(d)


# --- loader -----------------------------------------------------------------------------------------------

L = 16


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    # 64 shards of 37 tokens: most windows cross a shard boundary
    return TokenShards(make_shards(tmp_path_factory.mktemp("s"), 2369, shard_tokens=37))


def starts(x):
    return x[:, 0].tolist()


def test_batches_are_shifted_windows(shards):
    loader = PackedLoader(shards, L, 4, shuffle=False)
    assert loader.steps_per_epoch == (2368 // L) // 4 == 37
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, L) and x.dtype == y.dtype == torch.int64
    assert starts(x) == [0, 16, 32, 48]   # stride seq_len: windows share their boundary token
    assert torch.equal(x, torch.tensor(starts(x))[:, None] + torch.arange(L))
    assert torch.equal(y, x + 1)


def test_epoch_covers_each_window_once_then_wraps_reshuffled(shards):
    loader = PackedLoader(shards, L, 4, seed=3)
    seen = [s for _ in range(loader.steps_per_epoch) for s in starts(loader.next_batch()[0])]
    assert loader.epoch == 0 and len(set(seen)) == len(seen) == 148
    assert all(s % L == 0 and s + L + 1 <= shards.num_tokens for s in seen)
    assert seen != sorted(seen)
    nxt = [s for _ in range(loader.steps_per_epoch) for s in starts(loader.next_batch()[0])]
    assert loader.epoch == 1 and nxt != seen and len(set(nxt)) == 148


def test_shuffle_is_determined_by_seed(shards):
    def first(seed, n=5):
        ld = PackedLoader(shards, L, 2, seed=seed)
        return [starts(ld.next_batch()[0]) for _ in range(n)]

    assert first(7) == first(7)
    assert first(7) != first(8)


@pytest.mark.parametrize("taken", [5, 37, 40])   # mid-epoch, exactly at the end of an epoch, into the next
def test_resume_from_state_dict_gives_the_same_batches(shards, taken):
    a = PackedLoader(shards, L, 4, seed=11)
    for _ in range(taken):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))   # survives a JSON/pickle checkpoint
    b = PackedLoader(shards, L, 4, seed=11)
    b.load_state_dict(state)
    for _ in range(6):
        (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert (a.epoch, a.step) == (b.epoch, b.step)
    with pytest.raises(BadInputError, match="seq_len 16 \\(now 8\\)"):
        PackedLoader(shards, 8, 4, seed=11).load_state_dict(state)


def test_two_ranks_see_what_one_process_sees_with_double_batch(shards):
    one = PackedLoader(shards, L, 6, seed=5)
    ranks = [PackedLoader(shards, L, 3, rank=r, world_size=2, seed=5) for r in range(2)]
    assert ranks[0].steps_per_epoch == one.steps_per_epoch
    for _ in range(one.steps_per_epoch + 3):   # across the epoch boundary too
        x, y = one.next_batch()
        parts = [ld.next_batch() for ld in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts])) and torch.equal(y, torch.cat([p[1] for p in parts]))
    # the position is rank-independent: a 2-rank checkpoint resumes a 1-process run
    single = PackedLoader(shards, L, 6, seed=5)
    single.load_state_dict(ranks[1].state_dict())
    assert torch.equal(single.next_batch()[0], torch.cat([ld.next_batch()[0] for ld in ranks]))


def test_loader_rejects_too_little_data(shards):
    with pytest.raises(BadInputError, match="fewer than one global batch of 200"):
        PackedLoader(shards, L, 100, world_size=2)
    with pytest.raises(BadInputError, match="rank 2 is outside world size 2"):
        PackedLoader(shards, L, 1, rank=2, world_size=2)


def test_eval_batches_are_fixed_and_split_across_ranks(shards):
    full = list(iter_eval_batches(shards, L, 4, max_batches=None))
    assert len(full) == 37 and starts(full[0][0]) == [0, 16, 32, 48] and starts(full[1][0]) == [64, 80, 96, 112]
    assert all(torch.equal(y, x + 1) for x, y in full)
    again = list(iter_eval_batches(shards, L, 4, max_batches=3))
    assert len(again) == 3 and all(torch.equal(a[0], b[0]) for a, b in zip(again, full))
    per_rank = [list(iter_eval_batches(shards, L, 2, 5, rank=r, world_size=2)) for r in range(2)]
    assert [len(p) for p in per_rank] == [5, 5]
    for g in range(5):
        assert torch.equal(torch.cat([per_rank[0][g][0], per_rank[1][g][0]]), full[g][0])
    # a split smaller than one global batch still gives every rank one (smaller) batch
    small = [list(iter_eval_batches(shards, L, 100, None, rank=r, world_size=2)) for r in range(2)]
    assert [b[0][0].shape for b in small] == [(74, L), (74, L)]
