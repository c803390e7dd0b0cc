"""Stop strings: the watcher's hold-back on plain text, then through the Engine's streamed chunks."""

from __future__ import annotations

from pathlib import Path

import pytest
from hf_models import make_hf_checkpoint
from server_utils import SPREAD, write_tokenizer

from easyspec import Engine, EngineOptions, SamplingParams
from easyspec.engine.stop import StopText, StopWatcher
from easyspec.model.tokenizer import Tokenizer


def test_partial_match_is_held_back_until_it_fails():
    watcher = StopWatcher(("STOP",))
    assert watcher.feed("abc S") == ("abc ", False)
    assert watcher.feed("T") == ("", False)
    assert watcher.feed("x") == ("STx", False)


def test_match_spanning_pieces_cuts_before_it():
    watcher = StopWatcher(("STOP",))
    assert watcher.feed("one S") == ("one ", False)
    assert watcher.feed("T") == ("", False)
    assert watcher.feed("OP and more") == ("", True)
    assert watcher.feed("later", final=True) == ("", True)  # nothing more once stopped


def test_earliest_of_several_stops_wins():
    watcher = StopWatcher(("xyz", "b d", "c"))
    assert watcher.feed("a b") == ("a ", False)  # "b" could begin "b d"
    assert watcher.feed(" c d xyz") == ("b ", True)
    assert watcher.matched == "c"  # vLLM's stop_reason


def test_stops_starting_at_one_place_the_first_listed_is_matched():
    watcher = StopWatcher(("ab", "a", "abc"))
    assert watcher.feed("xabc") == ("x", True) and watcher.matched == "ab"


def test_shorter_stop_inside_a_longer_partial_match():
    # "ab" is still only a partial "abcd" when "b" alone completes: the cut is before "b".
    watcher = StopWatcher(("abcd", "b"))
    assert watcher.feed("xa") == ("x", False)
    assert watcher.feed("bc") == ("a", True)


def test_held_text_is_released_at_the_end():
    watcher = StopWatcher(("the end",))
    assert watcher.feed("so, the") == ("so, ", False)
    assert watcher.feed(" en") == ("", False)
    assert watcher.feed("", final=True) == ("the en", False)


def test_stop_strings_completed_before_min_tokens_are_text():
    """Unarmed (before min_tokens), a completed stop string is text like any other; a possible start is
    still held back, and one that completes once armed ends the text."""
    watcher = StopWatcher(("ab", "xabc"))
    assert watcher.feed("xab", armed=False) == ("", False)  # could begin "xabc"
    assert watcher.feed("d") == ("xabd", False)  # "ab" was completed before min_tokens: no stop
    watcher = StopWatcher(("STOP",))
    assert watcher.feed("a STOP b ST", armed=False) == ("a STOP b ", False)
    assert watcher.feed("OP c") == ("", True) and watcher.matched == "STOP"  # spans the boundary: counts


def test_no_stops_holds_nothing():
    watcher = StopWatcher(("",))
    assert watcher.feed("anything") == ("anything", False)


@pytest.fixture(scope="module")
def word_model(tmp_path_factory) -> Path:
    """A tiny model whose token ids decode to whole words, so stop strings can span tokens."""
    folder = tmp_path_factory.mktemp("stop") / "base"
    make_hf_checkpoint("llama3", folder, seed=5, **SPREAD)
    write_tokenizer(folder, None)
    return folder


PROMPT = [7, 8, 9, 10]


def stream(engine: Engine, stop: tuple[str, ...]) -> tuple[list[str], list[int], str | None]:
    """Each chunk's text, all token ids and the finish reason of a greedy 16-token request; the stop
    string that ended it is the last chunk's stop_reason (None on every other chunk)."""
    params = SamplingParams(temperature=0.0, max_new_tokens=16, ignore_eos=True, stop=stop)
    chunks = list(engine.generate(PROMPT, params))
    assert all(c.stop_reason is None for c in chunks[:-1])
    stop_reason = chunks[-1].stop_reason
    assert (stop_reason in stop) if chunks[-1].finish_reason == "stop" else stop_reason is None
    return [c.text for c in chunks], [t for c in chunks for t in c.token_ids], chunks[-1].finish_reason


# "sd" with the model drafting for itself commits several tokens per step, so a stop
# string can be completed in the middle of a step as well as across steps.
@pytest.mark.parametrize("method", ["vanilla", "sd"])
def test_streamed_chunks_add_up_to_the_cut_text(word_model, method):
    draft = str(word_model) if method == "sd" else None
    with Engine(EngineOptions(model=str(word_model), method=method, draft=draft, num_draft=3)) as engine:
        pieces, ids, reason = stream(engine, ())
        full = "".join(pieces)
        words = full.split(" ")
        assert reason == "length" and len(words) > 8
        for first in (2, 4):
            stop = " ".join(words[first : first + 2])  # two tokens: its first word streams before the second
            expected = full[: full.index(stop)]
            pieces, ids, reason = stream(engine, ("never appears", stop))
            assert "".join(pieces) == expected and reason == "stop"
            assert engine.generate_many([PROMPT], SamplingParams(temperature=0.0, max_new_tokens=16, ignore_eos=True,
                                        stop=("never appears", stop)), progress=False)[0].stop_reason == stop
            text = engine.tokenizer.decode(ids)
            assert stop in text and stop not in engine.tokenizer.decode(ids[:-1])  # ends at the completing token
        # A stop string that begins at the very end but never completes: the held-back word comes out at the end.
        pieces, _, reason = stream(engine, (words[-1] + " never",))
        assert "".join(pieces) == full and reason == "length"


def test_min_tokens_decides_which_stop_string_counts(word_model):
    """A stop string counts once the token completing it is at least the min_tokens-th (vLLM's rule),
    whether the tokens come one step at a time or all in one."""
    tok = Tokenizer.from_folder(word_model)
    ids = tok.encode("the fox runs the fox runs far", add_special_tokens=False)
    for min_tokens, keep, text in ((0, 2, "the "), (2, 2, "the "), (3, 5, "the fox runs the "), (6, None, None)):
        for steps in ([ids], [[t] for t in ids]):
            stop_text = StopText(tok, ("fox",), min_tokens)
            generated, kept = 0, None
            for step in steps:
                kept = stop_text.push(step, generated)
                if kept is not None:
                    kept += generated
                    break
                generated += len(step)
            assert kept == keep, (min_tokens, steps)
            assert stop_text.take(final=True) == (text if text is not None else " ".join(tok.decode(ids).split()))


def test_special_tokens_shown_when_not_skipped(word_model):
    tok = Tokenizer.from_folder(word_model)
    ids = [1, *tok.encode("the fox", add_special_tokens=False), 2]  # <s> the fox </s>
    for skip, want in ((True, "the fox"), (False, "<s> the fox </s>")):
        stop_text = StopText(tok, (), skip_special_tokens=skip)
        assert stop_text.push(ids) is None and stop_text.take(final=True) == want
