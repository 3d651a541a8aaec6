"""The README's training usage examples run as written, at tiny sizes, so the README cannot drift (issue 18).

Every ```bash block whose first line is `# usage example…` is parsed into commands (continuation lines joined,
comments dropped); each `nanoseek …` command runs in-process from a scratch directory, in order (later
examples use earlier outputs), with its placeholders bound to tiny stand-ins and size flags appended (the
last occurrence of a flag wins, so the README's own values are overridden, not edited). Blocks for GPUs and
commands that do not return (serve) are skipped: they are checked to parse only.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from test_newcomer_errors import chats, tiny_model_dir

from nanoseek.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]

# Flags appended per command (argparse keeps the last value of a repeated flag).
TINY_FT = ["--steps", "1", "--device", "cpu", "--seq-len", "512", "--no-plots"]
TINY_TASK = ["--task-arg", "digits=1", "--task-arg", "ops=+"]
SIZES = {
    ("pretrain",): ["--set", "train.steps=2", "--set", "data.batch_size=2", "--set", "data.seq_len=32",
                    "--set", "train.eval_batches=1", "--set", "train.plots=false", "--set", "train.device=cpu"],
    ("generate",): ["--max-tokens", "3"],
    ("eval",): ["--limit", "2", "--samples", "1", "--max-tokens", "4", "--no-greedy", *TINY_TASK],
    ("sft",): TINY_FT,
    ("grpo",): [*TINY_FT[:4], "--no-plots", "--group-size", "2", "--prompts-per-step", "1", "--max-new-tokens", "4",
                *TINY_TASK],
    ("distill", "traces"): ["--limit", "2", "--samples", "1", "--max-tokens", "4"],
    ("distill", "train"): TINY_FT,
    ("distill", "onpolicy"): [*TINY_FT[:4], "--no-plots", "--prompts-per-step", "1", "--max-new-tokens", "4",
                              *TINY_TASK],
    ("recipe", "r1"): ["--sft-steps", "1", "--grpo-steps", "1", "--eval-problems", "2", "--device", "cpu",
                       "--no-plots", *TINY_TASK, *(x for kv in (
                           "cold_start.conversations=4", "cold_start.seq_len=512", "rl.grpo.group_size=2",
                           "rl.grpo.prompts_per_step=1", "rl.grpo.max_new_tokens=4", "eval.protocol.samples=1",
                           "eval.protocol.max_tokens=4", 'eval.quant="none"') for x in ("--set", kv))],
}
NOT_RUN = {"serve"}   # servers do not return


def usage_examples(readme: str) -> list[tuple[str, list[str]]]:
    """(block title, argv) of every command in the README's usage-example blocks, in order."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", readme, flags=re.DOTALL):
        title = block.splitlines()[0]
        if not title.startswith("# usage example"):
            continue
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                out.append((title, argv))
    return out


def _subcommand(argv: list[str]) -> tuple[str, ...]:
    return tuple(argv[1:3]) if tuple(argv[1:3]) in SIZES else (argv[1],)


@pytest.fixture(scope="module")
def readme_examples():
    return usage_examples((REPO / "README.md").read_text())


def test_every_usage_example_parses(readme_examples):
    assert len(readme_examples) >= 15
    parser = build_parser()
    for _, argv in readme_examples:
        if argv[0] == "torchrun":
            argv = argv[argv.index("nanoseek.cli"):]
        assert argv[0] in ("nanoseek", "nanoseek.cli"), argv
        parser.parse_args(argv[1:])   # exits (SystemExit) on an unknown flag or subcommand


def test_cpu_usage_examples_run_at_tiny_sizes(readme_examples, tmp_path, monkeypatch, train_text):
    tiny = tiny_model_dir(tmp_path / "tiny-model")
    gsm = tmp_path / "gsm8k"
    gsm.mkdir()
    for split in ("train", "test"):
        (gsm / f"{split}.jsonl").write_text("".join(
            json.dumps({"question": f"What is {i} + 1?", "answer": f"{i} plus 1.\n#### {i + 1}"}) + "\n"
            for i in range(3)))
    corpus = tmp_path / "input.txt"
    corpus.write_text(train_text.read_text()[:60_000])
    chats(tmp_path / "chats.jsonl", 20)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    names = {"smollm2-135m": str(tiny), "TEACHER": str(tiny), "STUDENT": str(tiny), "MODEL": str(tiny),
             "GSM8K_DIR": str(gsm)}
    monkeypatch.chdir(tmp_path)
    ran = []
    for title, argv in readme_examples:
        if "GPU" in title or argv[0] != "nanoseek" or argv[1] in NOT_RUN:
            continue
        args = [names.get(a, a) for a in argv[1:]] + SIZES.get(_subcommand(argv), [])
        if args[:2] == ["sft", "--model"] and "traces.jsonl" in args and not Path("traces.jsonl").read_text():
            # A random tiny teacher keeps no trace; the README's point here is the command, so give it data.
            chats(Path("traces.jsonl"), 4)
        assert main(args) == 0, (title, args)
        ran.append(" ".join(argv[1:3]))
    assert {"tokenizer train", "data prepare", "recipe r1", "grpo --model", "distill traces"} <= set(ran), ran
