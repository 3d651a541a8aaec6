"""One progress bar helper (rich) so every long step — loading, converting, benchmarking — looks the same."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


@contextmanager
def progress_bar(desc: str, total: int | None) -> Iterator[Callable[..., None]]:
    """Yields `advance(n=1)`; draws on stderr only when it is a terminal."""
    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=not sys.stderr.isatty()) as prog:
        task = prog.add_task(desc, total=total)
        yield lambda n=1: prog.advance(task, n)
