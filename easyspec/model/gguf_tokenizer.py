"""The tokenizer a GGUF file describes, rebuilt as a `tokenizers` Tokenizer.

A GGUF file has no tokenizer.json: it stores the vocabulary (tokenizer.ggml.tokens),
the BPE merges (or, for SentencePiece vocabularies, scores), each token's type
(normal, control, user-defined, byte, ...), the special token ids, the chat
template and, in tokenizer.ggml.pre, the name of the pre-tokenizer a byte-level
vocabulary was trained with (llama.cpp keeps one split rule per name). From these
this module builds the tokenizer.json of the original Hugging Face model: BPE
with that split rule, control tokens as special added tokens, user-defined ones
as plain added tokens, and BOS/EOS added where the metadata asks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from easyspec.model.checkpoint import CheckpointError
from easyspec.model.gguf_file import GGUFFile, open_gguf
from easyspec.model.tokenizer import Tokenizer, check_chat_template

# llama.cpp's token types (tokenizer.ggml.token_type).
CONTROL, USER_DEFINED = 3, 4

_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_LLAMA3_SPLIT = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                 r"|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


@dataclass(frozen=True)
class SplitRule:
    """How one family of vocabularies cuts text into words before BPE."""

    regexes: tuple[str, ...]  # applied in turn, every match kept as its own piece
    ignore_merges: bool = False  # a word that is itself a token is not merged up from bytes
    nfc: bool = False  # Unicode NFC normalization first
    add_bos: bool = False  # llama.cpp's default when the file does not say


_GPT2 = SplitRule((_GPT2_SPLIT,))
_DIGITS_GPT2 = SplitRule((r"\p{N}", _GPT2_SPLIT))
_LLAMA3 = SplitRule((_LLAMA3_SPLIT,), ignore_merges=True, add_bos=True)
_QWEN2 = SplitRule((_QWEN2_SPLIT,), nfc=True)
# tokenizer.ggml.pre -> rule, for the names llama.cpp gives the vocabularies of supported architectures.
SPLIT_RULES = {
    "default": SplitRule((r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]")),
    **dict.fromkeys(("gpt-2", "mpt", "olmo", "jais", "phi-2", "roberta-bpe"), _GPT2),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"), _DIGITS_GPT2),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "dbrx", "smaug-bpe"), _LLAMA3),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"), _QWEN2),
}


@dataclass(frozen=True)
class TokenizerSettings:
    """What tokenizer_config.json says beside tokenizer.json."""

    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    unk_token: str | None
    add_bos: bool
    add_eos: bool


def _special(f: GGUFFile, tokens: list[str], name: str) -> tuple[int, str] | None:
    token_id = f.scalar(f"tokenizer.ggml.{name}_token_id", None)
    if token_id is None:
        return None
    if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < len(tokens):
        raise CheckpointError(f"{f.path}: tokenizer.ggml.{name}_token_id {token_id!r} is not a token id of the "
                              f"vocabulary ({len(tokens)} tokens)")
    return token_id, tokens[token_id]


def _template(sequence: str, type_id: int, first: tuple[int, str] | None,
              last: tuple[int, str] | None) -> list[str]:
    """One sequence of a TemplateProcessing template, e.g. ['<s>:0', '$A:0']."""
    pieces = [first[1]] if first else []
    pieces.append(sequence)
    pieces += [last[1]] if last else []
    return [f"{piece}:{type_id}" for piece in pieces]


def _byte_level_bpe(f: GGUFFile, tokens: list[str]) -> tuple[HFTokenizer, bool]:
    """tokenizer.ggml.model 'gpt2': byte-level BPE with the split rule tokenizer.ggml.pre names."""
    merges: list[str] = f.value("tokenizer.ggml.merges")
    pre = f.scalar("tokenizer.ggml.pre", "default")
    rule = SPLIT_RULES.get(pre)
    if rule is None:
        raise CheckpointError(f"{f.path}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; "
                              f"known: {', '.join(sorted(SPLIT_RULES))}")
    bpe = models.BPE(vocab={token: i for i, token in enumerate(tokens)},
                     merges=[tuple(m.split(" ", 1)) for m in merges], ignore_merges=rule.ignore_merges)
    tok = HFTokenizer(bpe)
    if rule.nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in rule.regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    return tok, rule.add_bos


def _sentencepiece_bpe(f: GGUFFile, tokens: list[str]) -> tuple[HFTokenizer, bool]:
    """tokenizer.ggml.model 'llama': SentencePiece BPE (Llama 2, Mistral 7B), spaces as '\u2581', bytes
    outside the vocabulary as <0xNN> tokens. The file stores scores, not merges: a merge ranks by the
    score of the piece it makes, highest first (SentencePiece's rule), ties broken as transformers does."""
    scores: list[float] = f.value("tokenizer.ggml.scores")
    ids = {token: i for i, token in enumerate(tokens)}
    merges: list[tuple[float, str, str]] = []
    for token, score in zip(tokens, scores, strict=True):
        pairs = sorted(((token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in ids and token[k:] in ids),
                       key=lambda pair: (ids[pair[0]], ids[pair[1]]))
        merges += [(score, left, right) for left, right in pairs]
    merges.sort(key=lambda m: (-m[0], -len(m[1]), -len(m[2])))
    unk = _special(f, tokens, "unknown")
    tok = HFTokenizer(models.BPE(vocab=ids, merges=[(left, right) for _, left, right in merges],
                                 unk_token=unk and unk[1], fuse_unk=True, byte_fallback=True))
    # Like SentencePiece and llama.cpp, every stretch of text (the start, and after each special token) gets a
    # space in front, even one that starts with spaces already; decoding drops that one space again.
    prefix = bool(f.scalar("tokenizer.ggml.add_space_prefix", True))
    spaces = [normalizers.Replace(" ", "\u2581")]
    tok.normalizer = normalizers.Sequence(([normalizers.Prepend("\u2581")] if prefix else []) + spaces)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok, True


_BUILDERS = {"gpt2": _byte_level_bpe, "llama": _sentencepiece_bpe}


def build_tokenizer(f: GGUFFile) -> tuple[HFTokenizer, TokenizerSettings]:
    """The file's tokenizer and its settings; errors name the file and the missing or unsupported part."""
    kind = f.scalar("tokenizer.ggml.model", None)
    if kind is None:
        raise CheckpointError(f"{f.path}: no tokenizer metadata (tokenizer.ggml.model is missing); "
                              "easyspec needs the vocabulary stored in the file")
    if kind not in _BUILDERS:
        raise CheckpointError(f"{f.path}: tokenizer model {kind!r} is not supported; easyspec reads 'gpt2' "
                              "(byte-level BPE: Llama 3, Qwen, SmolLM, ...) and 'llama' (SentencePiece BPE: "
                              "Llama 2, Mistral 7B)")
    tokens: list[str] = f.value("tokenizer.ggml.tokens")
    types: list[int] = f.value("tokenizer.ggml.token_type", [1] * len(tokens))
    if len(types) != len(tokens):
        raise CheckpointError(f"{f.path}: {len(types)} token types for {len(tokens)} tokens")
    tok, default_add_bos = _BUILDERS[kind](f, tokens)
    # Control tokens (<|im_start|>, <|eot_id|>, ...) are matched whole and skipped when decoding with
    # skip_special_tokens; user-defined ones (<think>, ...) are matched whole and always decoded.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, token_type in zip(tokens, types, strict=True) if token_type == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, token_type in zip(tokens, types, strict=True) if token_type == USER_DEFINED])

    bos, eos = _special(f, tokens, "bos"), _special(f, tokens, "eos")
    add_bos = bool(f.scalar("tokenizer.ggml.add_bos_token", default_add_bos))
    add_eos = bool(f.scalar("tokenizer.ggml.add_eos_token", False))
    for wanted, special, name in ((add_bos, bos, "bos"), (add_eos, eos, "eos")):
        if wanted and special is None:
            raise CheckpointError(f"{f.path}: tokenizer.ggml.add_{name}_token is set but there is no "
                                  f"tokenizer.ggml.{name}_token_id")
    if add_bos or add_eos:
        first, last = bos if add_bos else None, eos if add_eos else None
        tok.post_processor = processors.TemplateProcessing(
            single=_template("$A", 0, first, last),
            pair=_template("$A", 0, first, last) + _template("$B", 1, first, last),
            special_tokens=list({s[1]: (s[1], s[0]) for s in (first, last) if s is not None}.values()),
        )
    pad, unk = _special(f, tokens, "padding"), _special(f, tokens, "unknown")
    template = f.scalar("tokenizer.chat_template", None)
    if template is not None and not isinstance(template, str):
        raise CheckpointError(f"{f.path}: tokenizer.chat_template must be text, got {template!r}")
    settings = TokenizerSettings(
        chat_template=template,
        bos_token=bos and bos[1], eos_token=eos and eos[1], pad_token=pad and pad[1], unk_token=unk and unk[1],
        add_bos=add_bos, add_eos=add_eos,
    )
    return tok, settings


def gguf_tokenizer(path: str | Path) -> Tokenizer:
    f = open_gguf(path)
    tok, settings = build_tokenizer(f)
    check_chat_template(settings.chat_template, f"{f.path}: tokenizer.chat_template")
    return Tokenizer(tok, settings.chat_template, settings.bos_token, settings.eos_token, str(f.path),
                     {"pad_token": settings.pad_token, "unk_token": settings.unk_token})


def write_tokenizer_files(path: str | Path, folder: str | Path, model_max_length: int) -> None:
    """tokenizer.json and tokenizer_config.json (chat template, special tokens) of the file's tokenizer."""
    f = open_gguf(path)
    tok, s = build_tokenizer(f)
    Tokenizer(tok, s.chat_template, s.bos_token, s.eos_token, str(f.path)).save(folder, {
        "pad_token": s.pad_token, "unk_token": s.unk_token, "add_bos_token": s.add_bos, "add_eos_token": s.add_eos,
        "model_max_length": model_max_length,
    })
