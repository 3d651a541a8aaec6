"""What a newcomer trips over gets one line and an exit code, never a traceback (issue 18): a teacher of another
vocabulary, a changed model under an old run directory, an empty traces file, data too small for the batch;
and a training run or checkpoint directory loads directly wherever a model is named."""

import json
import shutil

import pytest
import torch
from test_chat import CHATML, make_tokenizer

from nanoseek.cli import main
from nanoseek.models import build_model
from nanoseek.models.config import DenseConfig
from nanoseek.train.pretrain import init_weights
from nanoseek.weights.hf import save_hf


def tiny_model_dir(path, hidden=32, vocab=None, tokenizer=True, seed=0):
    """A tiny dense model saved as an HF directory (with the byte tokenizer and a ChatML template)."""
    tok = make_tokenizer(CHATML)
    torch.manual_seed(seed)
    model = build_model(DenseConfig(vocab_size=vocab or len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                                    num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=256, eos_token_id=tok.eos_token_id))
    init_weights(model, 0.02)
    save_hf(model, path, tokenizer=tok if tokenizer else None)
    return path


def chats(path, n):
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"say {i}"},
                                                     {"role": "assistant", "content": f"{i} {i}"}]}) + "\n"
                            for i in range(n)))
    return path


def one_line_error(capsys, argv, code):
    """Runs the CLI in-process (an uncaught exception would fail the test with its traceback) and returns
    the error line after checking the exit code and that the line is alone on stderr."""
    assert main(argv) == code
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("nanoseek: error:")]
    assert len(err) == 1, err
    return err[0]


FT = ["--steps", "1", "--device", "cpu", "--no-plots", "--seq-len", "64"]


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("models") / "student")


def test_teacher_of_another_vocabulary(tmp_path, student, capsys):
    teacher = tiny_model_dir(tmp_path / "teacher", vocab=100, tokenizer=False)
    line = one_line_error(capsys, ["distill", "train", "--teacher", str(teacher), "--model", str(student),
                                   "--data", str(chats(tmp_path / "c.jsonl", 4)), "--out", str(tmp_path / "kd"),
                                   *FT], 3)
    assert "vocabulary of 100 ids" in line and "distill traces" in line


def test_empty_traces_file(tmp_path, student, capsys):
    empty = tmp_path / "traces.jsonl"
    empty.write_text("")
    line = one_line_error(capsys, ["sft", "--model", str(student), "--data", str(empty), "--out",
                                   str(tmp_path / "run"), *FT], 3)
    assert "traces.jsonl: no conversations" in line


def test_small_data_fits_the_batch_and_runs_load_directly(tmp_path, student, capsys):
    run = tmp_path / "runs" / "sft"
    # 3 short conversations pack into one row: the default --batch-size 8 is fitted to it.
    assert main(["sft", "--model", str(student), "--data", str(chats(tmp_path / "c.jsonl", 3)), "--out", str(run),
                 "--steps", "2", "--ckpt-every", "1", "--device", "cpu", "--no-plots", "--seq-len", "64",
                 "--dtype", "bfloat16"]) == 0
    assert json.loads((run / "final" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert "cannot fill --batch-size 8 × 1 process(es); using --batch-size" in capsys.readouterr().err
    step = run / "checkpoints" / "step_00000001"
    gen = ["generate", "hi", "--max-tokens", "3", "--quant", "none", "--stats"]
    for model in (run, step):   # a run (its final/), and one checkpoint with the base model's tokenizer
        assert main([*gen, "--model", str(model)]) == 0
        assert "generated tokens" in capsys.readouterr().err
    shutil.rmtree(run / "final")   # a run killed before final/: its newest checkpoint
    assert main([*gen, "--model", str(run)]) == 0
    capsys.readouterr()
    # a checkpoint whose tokenizer is gone says how to make a loadable directory
    shutil.move(str(student), str(tmp_path / "moved"))
    try:
        line = one_line_error(capsys, [*gen, "--model", str(step)], 2)
        assert "nanoseek export" in line
    finally:
        shutil.move(str(tmp_path / "moved"), str(student))


def test_changed_model_under_an_old_run(tmp_path, student, capsys):
    data = chats(tmp_path / "c.jsonl", 3)
    out = tmp_path / "run"
    argv = ["sft", "--data", str(data), "--out", str(out), "--steps", "1", "--device", "cpu", "--no-plots",
            "--seq-len", "64", "--batch-size", "1"]
    assert main([*argv, "--model", str(student)]) == 0
    wider = tiny_model_dir(tmp_path / "wider", hidden=64)
    line = one_line_error(capsys, [*argv, "--steps", "2", "--model", str(wider)], 3)
    assert "another model (" in line and "hidden_size 32 → 64" in line and "new --out" in line


def test_run_without_checkpoints_and_plain_directory(tmp_path, capsys):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert "without checkpoints" in one_line_error(capsys, ["generate", "hi", "--model", str(tmp_path / "run")], 2)
    (tmp_path / "empty").mkdir()
    assert "nanoseek export" in one_line_error(capsys, ["generate", "hi", "--model", str(tmp_path / "empty")], 2)


def test_extending_steps_warns_that_the_schedule_changes(tmp_path, student, capsys):
    argv = ["sft", "--model", str(student), "--data", str(chats(tmp_path / "c.jsonl", 3)), "--out",
            str(tmp_path / "run"), "--device", "cpu", "--no-plots", "--seq-len", "64", "--batch-size", "1"]
    assert main([*argv, "--steps", "1"]) == 0
    capsys.readouterr()
    assert main([*argv, "--steps", "2"]) == 0
    assert "train.steps changed from 1 to 2" in capsys.readouterr().err
