"""Streamed text equals the text of the whole output, whatever the tokens: random token runs
through a SentencePiece byte-fallback tokenizer (Llama 2 / Mistral style, where byte tokens
that are not valid UTF-8 are common) and a byte-level one (GPT-2 / Llama 3 / Qwen style),
committed in steps of random length as speculative decoding commits them; stop strings found."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from tokenizers import AddedToken, decoders, models
from tokenizers import Tokenizer as HFTokenizer

from easyspec.engine.stop import StopText
from easyspec.model.tokenizer import StreamDecoder, Tokenizer

DEMO = Path(__file__).resolve().parent.parent / "easyspec" / "models" / "demo" / "base"
WORDS = ["▁the", "▁a", "▁caf", "é", "▁naïve", "▁東京", "s", "ing", "▁", "▁x", "\n", "▁—", "▁🙂", "▁stop", "▁here"]


def byte_fallback_tokenizer() -> Tokenizer:
    """<unk>, <s>, </s>, the 256 byte tokens <0x00>..<0xFF>, a few pieces; Llama 2's decoder."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return Tokenizer(tok, None, "<s>", "</s>", "byte-fallback")


TOKENIZERS = {"byte-fallback": byte_fallback_tokenizer, "byte-level": lambda: Tokenizer.from_folder(DEMO)}


def random_ids(rng: random.Random, tok: Tokenizer, length: int) -> list[int]:
    """Mostly runs of byte tokens (valid multi-byte characters cut anywhere, or invalid bytes) and
    words, with a special token now and then."""
    ids: list[int] = []
    size = tok.vocab_size
    while len(ids) < length:
        roll = rng.random()
        if tok.source == "byte-fallback" and roll < 0.5:
            text = rng.choice(["é", "東", "🙂", "€", "x"]).encode()
            data = text if rng.random() < 0.5 else bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
            ids += [tok.token_id(f"<0x{b:02X}>") for b in data]
        elif roll < 0.05:
            ids.append(tok.token_id(tok.eos_token))
        else:
            ids.append(rng.randrange(size))
    return ids[:length]


def stream(tok: Tokenizer, ids: list[int], rng: random.Random, stops: tuple[str, ...] = ()) -> tuple[str, int | None]:
    """Released text and where a stop string ended generation (a count of tokens), as the worker runs it."""
    text = StopText(tok, stops)
    out, pos = "", 0
    while pos < len(ids):
        step = ids[pos : pos + rng.randint(1, 5)]
        taken = text.push(step)
        if taken is not None:
            return out + text.take(final=True), pos + taken
        pos += len(step)
        out += text.take(final=False)
    return out + text.take(final=True), None


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_streamed_text_is_the_final_text(name):
    tok = TOKENIZERS[name]()
    rng = random.Random(0)
    for _ in range(300):
        ids = random_ids(rng, tok, rng.randint(1, 60))
        text, stopped = stream(tok, ids, rng)
        assert stopped is None
        assert text == tok.decode(ids), ids


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_stop_strings_are_found_in_streamed_text(name):
    tok = TOKENIZERS[name]()
    rng = random.Random(1)
    checked = 0
    word = tok.token_id("▁here") if name == "byte-fallback" else tok.encode(" here", add_special_tokens=False)[0]
    for _ in range(300):
        # Ending on a word closes any byte run, so every stop string is settled before the end.
        ids = random_ids(rng, tok, rng.randint(2, 60)) + [word]
        final = tok.decode(ids)
        if len(final) < 4:
            continue
        start = rng.randrange(len(final) - 2)
        stop = final[start : start + rng.randint(1, 3)]
        text, stopped = stream(tok, ids, rng, (stop,))
        # The text ends just before the first occurrence of the stop string in the output.
        assert stopped is not None and text == final[: final.find(stop)], (ids, stop)
        assert stop in tok.decode(ids[:stopped])  # generation ends at the token that completes it
        checked += 1
    assert checked > 100


def test_text_after_an_invalid_byte_run_is_released():
    """The bug this file guards: '@' (0x40) then 0xC3 0x26, not valid UTF-8, turn the whole run into
    U+FFFD; releasing '@' early used to stop the stream for good."""
    tok = byte_fallback_tokenizer()
    decoder = StreamDecoder(tok)
    ids = [tok.token_id(f"<0x{b:02X}>") for b in (0x40, 0xC3, 0x26)] + [tok.token_id("▁the"), tok.token_id("▁caf")]
    pieces = [decoder.push([i]) for i in ids]
    assert pieces[:3] == ["", "", ""]  # the run is held until a word ends it
    assert "".join(pieces[:4]) == tok.decode(ids[:4]) == "\ufffd" * 3 + " the"
    assert "".join(pieces) + decoder.flush() == tok.decode(ids)
