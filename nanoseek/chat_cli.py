"""The terminal chat: streams replies with the reasoning dimmed, keeps history, handles slash commands.

Commands: /think (toggle reasoning mode), /reset (clear history), /system TEXT (set the system prompt,
empty to clear), /exit. Line editing and history come from readline, saved under $NANOSEEK_HOME.
"""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console

from nanoseek.engine.sampling import SamplingParams
from nanoseek.session import ChatTurn, Session

HELP = "commands: /think  /reset  /system TEXT  /exit"


def print_stream(session: Session, messages: list[dict], params: SamplingParams, think: bool | None,
                 console: Console | None = None) -> ChatTurn:
    console = console or Console(highlight=False)
    state = {"in_reasoning": False}

    def on_text(r: str, c: str) -> None:
        if r:
            state["in_reasoning"] = True
            console.print(r, style="dim italic", end="", markup=False)
        if c:
            if state["in_reasoning"]:
                console.print()
                state["in_reasoning"] = False
            console.print(c, end="", markup=False)

    turn = session.chat(messages, params, thinking=think, on_text=on_text)
    console.print()
    return turn


def _history_file() -> Path:
    home = Path(os.environ.get("NANOSEEK_HOME", Path.home() / ".nanoseek"))
    home.mkdir(parents=True, exist_ok=True)
    return home / "chat_history"


def run_chat(session: Session, params: SamplingParams, system: str | None = None, think: bool = False,
             sampling_note: str | None = None) -> int:
    console = Console(highlight=False)
    try:
        import readline

        hist = _history_file()
        if hist.exists():
            readline.read_history_file(hist)
    except (ImportError, OSError):
        readline, hist = None, None
    console.print(f"[bold]nanoseek[/bold] · {session.name} · loaded in {session.load_s:.1f}s · "
                  f"quant {session.quant} · {HELP}", markup=True)
    if sampling_note:
        console.print(f"sampling: {sampling_note}", style="dim", markup=False)
    history: list[dict] = []
    try:
        while True:
            try:
                mark = "think" if think else "chat"
                line = input(f"\n[{mark}] > ")
            except EOFError:
                console.print()
                return 0
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                cmd, _, arg = text.partition(" ")
                if cmd in ("/exit", "/quit"):
                    return 0
                if cmd == "/think":
                    think = not think
                    console.print(f"reasoning mode {'on' if think else 'off'}")
                elif cmd == "/reset":
                    history.clear()
                    console.print("history cleared")
                elif cmd == "/system":
                    system = arg.strip() or None
                    console.print(f"system prompt {'set' if system else 'cleared'}")
                else:
                    console.print(HELP)
                continue
            history.append({"role": "user", "content": text})
            messages = ([{"role": "system", "content": system}] if system else []) + history
            try:
                turn = print_stream(session, messages, params, think if think else None, console)
            except KeyboardInterrupt:
                history.pop()
                console.print("\n[interrupted]")
                continue
            history.append({"role": "assistant", "content": turn.content})
    finally:
        if readline is not None and hist is not None:
            try:
                readline.write_history_file(hist)
            except OSError:
                pass
