"""Stop strings: where generation ends, and what text may be shown before it does.

Text that could be the beginning of a stop string is held back until the next
tokens show that it is not one, so streamed text never contains any part of a
stop string and its pieces always add up to the final text, which is cut just
before the earliest stop string.

With min_tokens, as in vLLM, a stop string counts only when the token that
completes it is at least the min_tokens-th generated: one completed earlier is
text like any other.
"""

from __future__ import annotations

from easyspec.model.tokenizer import StreamDecoder, Tokenizer


class StopWatcher:
    """Text in, text safe to show out: cut before the earliest stop string, a possible
    partial match held back until it is settled."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.held = ""
        self.matched: str | None = None  # the stop string found (vLLM's stop_reason)

    @property
    def stopped(self) -> bool:
        return self.matched is not None

    def _earliest(self, text: str) -> tuple[int, str] | None:
        """Where the earliest stop string that ends past the held-back text starts in `text` (held text
        + new text), and which one (at one place, the first listed). Text held back never holds a whole
        stop string that counts, so one there was completed before min_tokens."""
        held = len(self.held)
        found = [(i, n) for n, s in enumerate(self.stops) if (i := text.find(s, max(0, held - len(s) + 1))) >= 0]
        if not found:
            return None
        start, which = min(found)
        return start, self.stops[which]

    def would_stop(self, text: str) -> bool:
        """Whether feeding `text` next would complete a stop string; changes nothing."""
        return not self.stopped and self._earliest(self.held + text) is not None

    def feed(self, text: str, final: bool = False, armed: bool = True) -> tuple[str, bool]:
        """Text safe to release, and whether a stop string has been found.
        `final` releases what is held back: no more text is coming. Unless `armed`, a stop string
        that `text` completes does not count (min_tokens): only a possible start is held back."""
        if self.stopped:
            return "", True
        buffer = self.held + text
        found = self._earliest(buffer) if armed else None
        if found is not None:
            cut, self.matched = found
            self.held = ""
            return buffer[:cut], True
        keep = 0 if final else self._partial(buffer)
        self.held = buffer[len(buffer) - keep:] if keep else ""
        return buffer[: len(buffer) - keep], False

    def _partial(self, text: str) -> int:
        """Length of the longest end of `text` that begins some stop string: a stop string can
        only start there, so holding back that much is enough."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest


class StopText:
    """Committed token ids in, text to show out, for one request on the rank that decides.

    `push` takes each step's tokens and says whether one of them completes a stop
    string (generation then ends at that token); `take` hands out the text released
    since the previous call.
    """

    def __init__(self, tokenizer: Tokenizer, stops: tuple[str, ...], min_tokens: int = 0,
                 skip_special_tokens: bool = True) -> None:
        self.decoder = StreamDecoder(tokenizer, skip_special_tokens)
        self.watcher = StopWatcher(stops)
        self.min_tokens = min_tokens
        self._released = ""

    def push(self, tokens: list[int], generated: int = 0) -> int | None:
        """Decode the next committed tokens, `generated` tokens into the request; returns how many
        of them it took to complete a stop string (the rest are not taken), or None when none
        completes one. The tokens before the min_tokens-th generated one complete none."""
        early = min(max(self.min_tokens - 1 - generated, 0), len(tokens))
        if early:
            self._feed(self.decoder.push(tokens[:early]), armed=False)
            tokens = tokens[early:]
        # A step is decoded in one go, token by token only when it holds a stop string
        # and the token ending it must be found.
        if len(tokens) > 1 and self._may_stop(tokens):
            for count, token in enumerate(tokens, 1):
                if self._feed(self.decoder.push([token])):
                    return early + count
            return None
        return early + len(tokens) if tokens and self._feed(self.decoder.push(tokens)) else None

    def take(self, final: bool) -> str:
        """Text released since the last call; `final` also releases what is held back."""
        if final and not self.watcher.stopped:
            # The decoder may still hold an unfinished character: the request's end releases it.
            self._feed(self.decoder.flush(), final=True)
        text, self._released = self._released, ""
        return text

    def _may_stop(self, tokens: list[int]) -> bool:
        if not self.watcher.stops:
            return False
        text = self.decoder.peek(tokens)
        # Text that cannot be judged in one go (an unfinished character) goes token by token.
        return text is None or self.watcher.would_stop(text)

    def _feed(self, text: str, final: bool = False, armed: bool = True) -> bool:
        released, hit = self.watcher.feed(text, final, armed)
        self._released += released
        return hit
