"""Stop strings over streamed text.

`StopMatcher` sees the detokenized output as a stream of deltas and decides what may be shown. It holds
back any tail that could still grow into a stop string, and never emits a stop string or anything after it.

What counts as the stop: the occurrence that *starts* earliest in the whole text (the shortest stop string
wins a tie at the same start). The streamed result is therefore the same however the text is cut into
deltas — `first_stop` is the one-shot definition the stream agrees with. The cost: when a stop string
completes while a longer one that started earlier is still only partly seen (stops "abcd" and "bc", text
"abc…"), the matcher waits for the next delta before deciding; the engine may generate a token or two more.
"""

from __future__ import annotations

from collections.abc import Sequence


def first_stop(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    """(start, stop string) of the earliest-starting stop occurrence in text, shortest on a tie; or None."""
    best = None
    for s in stops:
        if s:
            i = text.find(s)
            if i >= 0 and (best is None or (i, len(s)) < (best[0], len(best[1]))):
                best = (i, s)
    return best


class StopMatcher:
    """feed(delta) → (text safe to emit, stopped); flush() at the end of generation → held-back text.

    After a stop, `matched` is the stop string and every further feed returns ("", True). If the stream ends
    while a complete stop is waiting on a longer, earlier candidate, `flush` settles it: returns the text
    before it and sets `stopped`, so check `stopped` after flushing for the finish reason.
    """

    def __init__(self, stop_strings: Sequence[str]):
        self.stops = [s for s in dict.fromkeys(stop_strings) if s]   # dedupe, keep order, drop empties
        self.stopped = False
        self.matched: str | None = None
        self._held = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stops:
            return delta, False
        buf = self._held + delta
        hit = first_stop(buf, self.stops)
        live = self._first_live_partial(buf, hit[0] if hit else len(buf))
        if hit and live is None:
            return self._stop(buf, hit), True
        cut = live if live is not None else len(buf)
        self._held = buf[cut:]
        return buf[:cut], False

    def flush(self) -> str:
        """End of stream: nothing can grow any more, so a waiting stop settles and a partial one is text."""
        if self.stopped:
            return ""
        buf, self._held = self._held, ""
        hit = first_stop(buf, self.stops)
        return self._stop(buf, hit) if hit else buf

    def _stop(self, buf: str, hit: tuple[int, str]) -> str:
        self.stopped, self.matched, self._held = True, hit[1], ""
        return buf[:hit[0]]

    def _first_live_partial(self, buf: str, before: int) -> int | None:
        """Smallest start q < before where buf[q:] is a proper prefix of a stop string (could still match).
        Only the last (longest stop − 1) characters can start one."""
        longest = max(map(len, self.stops))
        for q in range(max(0, len(buf) - longest + 1), min(before, len(buf))):
            tail = buf[q:]
            if any(len(s) > len(tail) and s.startswith(tail) for s in self.stops):
                return q
        return None
