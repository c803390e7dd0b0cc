"""A plain-text progress bar on stderr: one line redrawn with \\r on a terminal, one line per update
in a log (a redrawn line would be unreadable there). No dependency."""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"


class Progress:
    """Counts timed runs (methods x prompts x repeats); warm-up and model loading are not counted,
    so the time left is a rough estimate that grows a little at each new method."""

    BAR = 24

    def __init__(self, total: int, quiet: bool = False, stream: TextIO | None = None) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.start = time.monotonic()
        self.label = ""
        self._drawn = 0  # width of the line on screen, to blank what a shorter line leaves behind

    def begin(self, label: str, index: int, count: int) -> None:
        """A new method row starts (its process is loading the models)."""
        self.label = label
        self._show(f"[{index}/{count}] {label}: starting")

    def step(self, detail: str) -> None:
        """One timed run finished."""
        self.done = min(self.done + 1, self.total)
        self._show(f"{self.label}: {detail}")

    def note(self, text: str) -> None:
        """A message that must stay readable (a skipped row): always its own line."""
        if self.quiet:
            return
        self._clear()
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        """Leave the last bar on screen, ended by a newline."""
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = 0

    def line(self, detail: str) -> str:
        frac = self.done / self.total
        filled = round(frac * self.BAR)
        elapsed = time.monotonic() - self.start
        left = f", ~{_clock(elapsed / self.done * (self.total - self.done))} left" if self.done else ""
        return (f"[{'#' * filled}{'.' * (self.BAR - filled)}] {self.done}/{self.total} {100 * frac:3.0f}% "
                f"{_clock(elapsed)}{left} | {detail}")

    def _show(self, detail: str) -> None:
        if self.quiet:
            return
        text = self.line(detail)
        if self.tty:
            # A line wider than the terminal wraps, and \r would then redraw only its last part.
            text = text[: shutil.get_terminal_size().columns - 1]
            self.stream.write("\r" + text.ljust(self._drawn))
            self._drawn = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def _clear(self) -> None:
        if self.tty and self._drawn:
            self.stream.write("\r" + " " * self._drawn + "\r")
            self.stream.flush()
            self._drawn = 0
