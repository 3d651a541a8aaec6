"""`--help` works on the `nanoseek` command and on every subcommand, nested ones included.

argparse formats help strings with %, so one unescaped % in any help text turns `--help` into a traceback.
The commands are found by walking the parser `nanoseek.cli` builds, so a new subcommand is covered
without editing this file.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nanoseek.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path under `parser`: () for the top level, ("keys", "create") for a nested one."""
    out = [path]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += _commands(sub, (*path, name))
    return out


COMMANDS = _commands(build_parser())


def test_the_walk_finds_nested_subcommands():
    # Guards the walk itself: if it found nothing below the top level, every test below would be vacuous.
    assert ("eval",) in COMMANDS and ("keys", "create") in COMMANDS and ("distill", "traces") in COMMANDS
    assert len(COMMANDS) > 15


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "nanoseek")
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_exits_zero_with_usage(command, flag):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
        main([*command, flag])
    assert exc.value.code == 0, err.getvalue()
    text = out.getvalue()
    assert text.startswith(f"usage: {' '.join(('nanoseek', *command))} "), text[:200]
    assert "show this help message and exit" in text


def test_python_dash_m_help_imports_nothing_heavy():
    # The module entry point end to end, in a fresh interpreter; and printing usage stays cheap: no
    # subcommand's heavy imports (torch, the server) are pulled in for it.
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "nanoseek.cli", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("usage: nanoseek") and "eval" in r.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "argparse" in imported   # the import log was read at all
    assert not imported & {"torch", "transformers", "fastapi", "uvicorn"}
