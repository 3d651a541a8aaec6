"""One progress helper so every long step — loading, converting, evaluating, sampling traces — looks the same: a
rich bar on a terminal, and otherwise (a log file, CI) a plain line at least every EVERY_S seconds, so output
that is not a terminal never goes quiet for minutes."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

EVERY_S = 10.0


@contextmanager
def progress_bar(desc: str, total: int | None, every_s: float = EVERY_S) -> Iterator[Callable[..., None]]:
    """Yields `advance(n=1)`; draws a bar on stderr when it is a terminal, else prints a `desc: done/total`
    line every `every_s` seconds (and a last one at the end of a step that printed any)."""
    if sys.stderr.isatty():
        console = Console(stderr=True)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as prog:
            task = prog.add_task(desc, total=total)
            yield lambda n=1: prog.advance(task, n)
        return
    # A ticker thread, not the callers' advance(): one decode batch can run for minutes before any item ends.
    done = [0]
    t0 = time.monotonic()
    stop = threading.Event()

    def line() -> None:
        of = f"/{total}" if total is not None else ""
        print(f"{desc}: {done[0]}{of} ({time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)

    def tick() -> None:
        while not stop.wait(every_s):
            line()

    ticker = threading.Thread(target=tick, name=f"progress {desc}", daemon=True)
    ticker.start()
    try:
        yield lambda n=1: done.__setitem__(0, done[0] + n)
    finally:
        stop.set()
        ticker.join()
    if time.monotonic() - t0 >= every_s:   # quick steps (loading a small model) stay silent, as before
        line()
