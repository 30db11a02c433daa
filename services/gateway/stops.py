"""Stop strings over streamed text: emit everything that cannot be the start of a stop string."""

from __future__ import annotations


class StopMatcher:
    """Feeds text deltas; returns the text safe to emit now, holding back a possible stop-string prefix.

    The answer stops at the first point where a stop string is complete (the earliest end; of stop strings
    ending there, the longest), so the result does not depend on how the text was split into deltas.
    """

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self.held = ""  # text not emitted yet because it may begin a stop string (a suffix of the text fed)
        self.stopped = False
        # Once stopped: where in the delta that completed the stop string the stop string ended.
        self.stop_end: int | None = None

    def feed(self, delta: str) -> str:
        if self.stopped:
            return ""
        if not self._stops:
            return delta
        text = self.held + delta
        matches = [(i + len(s), i) for s in self._stops if (i := text.find(s)) >= 0]
        if matches:
            end, start = min(matches)
            self.stopped = True
            self.stop_end = end - len(self.held)
            self.held = ""
            return text[:start]
        keep = self._longest_stop_prefix_suffix(text)
        self.held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        held, self.held = self.held, ""
        return "" if self.stopped else held

    def _longest_stop_prefix_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        best = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:length]):
                    best = length
                    break
        return best
