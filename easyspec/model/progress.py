"""Progress on stderr for the slow one-time steps (loading weights, capturing CUDA graphs) and
for batches of prompts: a tqdm bar on a terminal, one log line when it is done elsewhere (a
redrawn bar would be unreadable in a log file)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("easyspec")


class _Counter:
    """What a bar's user sees: `update(n)` after n more units are done."""

    def __init__(self, bar: object | None) -> None:
        self.bar = bar
        self.done = 0

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)


@contextmanager
def bar(total: int | None, desc: str, unit: str = "it", enabled: bool = True) -> Iterator[_Counter]:
    """A progress bar of `total` units (None: a counter); when done, off a terminal, one INFO line
    "desc: N units in S s". Nothing at all when not `enabled`."""
    tty = enabled and sys.stderr.isatty()
    shown = None
    if tty:
        from tqdm import tqdm

        shown = tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, file=sys.stderr)
    counter = _Counter(shown)
    start = time.perf_counter()
    try:
        yield counter
    finally:
        if shown is not None:
            shown.close()
        if enabled and counter.done:
            log.info("%s: %d %s%s in %.1f s", desc, counter.done, unit, "" if counter.done == 1 else "s",
                     time.perf_counter() - start)
