"""A byte-level BPE tokenizer for Python source, trained with the `tokenizers` library.

Byte-level BPE maps every byte to a symbol before merging, so any text encodes
and decodes back exactly: indentation, tabs, trailing spaces and non-ASCII
identifiers included. That exactness matters here, since the engine's output is
compared token for token and the prompts are code.

The saved folder holds tokenizer.json and tokenizer_config.json, which both
easyspec.model.tokenizer.Tokenizer and transformers.AutoTokenizer read. Encoding
with special tokens prepends <|bos|>, and training packs each file as
<|bos|> file <|eos|>, so a prompt starts the way every training document did.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
BOS_ID = 0
EOS_ID = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def train_bpe(texts: Iterable[str], vocab_size: int, max_chars: int | None = None) -> Tokenizer:
    """Train on `texts` (at most `max_chars` characters of them, taken in order).

    The vocabulary holds the two special tokens (ids 0 and 1), the 256 byte
    symbols, and merges up to `vocab_size`.
    """
    if vocab_size < 258 + 1:
        raise ValueError(f"vocab_size must exceed 258 (2 special tokens + 256 bytes), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    # No prefix space: Python source must not gain a leading space at a file start.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_take_chars(texts, max_chars), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, BOS_ID)],
    )
    if tok.token_to_id(BOS_TOKEN) != BOS_ID or tok.token_to_id(EOS_TOKEN) != EOS_ID:
        raise RuntimeError("the BPE trainer did not give the special tokens ids 0 and 1")
    return tok


def _take_chars(texts: Iterable[str], max_chars: int | None) -> Iterable[str]:
    total = 0
    for text in texts:
        if max_chars is not None and total >= max_chars:
            return
        total += len(text)
        yield text


def save_tokenizer(tok: Tokenizer, folder: str | Path, model_max_length: int) -> None:
    """Write tokenizer.json and a tokenizer_config.json without a chat template (a code model)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "add_bos_token": True,
        "add_eos_token": False,
        # HF's default clean-up would rewrite spaces around punctuation on decode.
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_tokenizer(folder: str | Path) -> Tokenizer:
    return Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
