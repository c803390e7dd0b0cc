"""Text in and out: tokenizer.json through `tokenizers`, chat templates as transformers renders
them (easyspec.model.chat_template), and the streaming decoder."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
from tokenizers import Tokenizer as _HFTokenizer

from easyspec.model.chat_template import compile_template
from easyspec.model.chat_template import render as render_template
from easyspec.model.checkpoint import CheckpointError, read_json, read_text


def _special_text(value: object) -> str | None:
    # tokenizer_config.json writes special tokens as a string or as {"content": ...}.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(value: object, source: Path) -> str | None:
    """tokenizer_config.json's chat_template: a string, or named templates [{"name", "template"}] of
    which the default one is used."""
    if value is None or isinstance(value, str):
        return value
    named = isinstance(value, list) and all(
        isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str) for t in value)
    if not named:
        raise CheckpointError(f"{source}: chat_template must be a string or a list of "
                              '{"name": ..., "template": ...} objects')
    return next((t["template"] for t in value if t["name"] == "default"), None)


def check_chat_template(template: str | None, source: str) -> None:
    """Compile a chat template now, so that a broken one fails at load and names `source`, where it
    was read from, rather than failing the first chat request."""
    if template is None:
        return
    try:
        compile_template(template)
    except jinja2.TemplateSyntaxError as err:
        raise CheckpointError(f"{source}: the chat template does not parse "
                              f"(line {err.lineno}: {err.message})") from None


# The named special tokens a chat template sees, as transformers passes them.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class Tokenizer:
    """tokenizer.json through `tokenizers`, and the chat template (easyspec.model.chat_template)."""

    def __init__(self, tokenizer: _HFTokenizer, chat_template: str | None,
                 bos_token: str | None, eos_token: str | None, source: str,
                 special_tokens: dict[str, str] | None = None) -> None:
        self._tok = tokenizer
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.source = source
        named = {"bos_token": bos_token, "eos_token": eos_token, **(special_tokens or {})}
        self.special_tokens = {name: value for name, value in named.items() if value is not None}

    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer | None:
        """The folder's tokenizer, or None when it has no tokenizer.json."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.exists():
            return None
        try:
            tok = _HFTokenizer.from_file(str(path))
        except Exception as err:  # the tokenizers library raises a bare Exception
            raise CheckpointError(f"{path}: cannot be read by the tokenizers library ({err})") from None
        config_path = folder / "tokenizer_config.json"
        config = read_json(config_path) if config_path.exists() else {}
        template, template_path = _chat_template(config.get("chat_template"), config_path), config_path
        jinja_path = folder / "chat_template.jinja"
        if template is None and jinja_path.exists():
            template, template_path = read_text(jinja_path), jinja_path
        special = {name: _special_text(config.get(name)) for name in SPECIAL_TOKEN_NAMES}
        check_chat_template(template, str(template_path))
        return cls(tok, template, special["bos_token"], special["eos_token"], str(folder),
                   {name: value for name, value in special.items() if value is not None})

    def save(self, folder: str | Path, settings: dict[str, Any] | None = None) -> None:
        """Write tokenizer.json and tokenizer_config.json (BOS and EOS tokens, chat template, and any
        further tokenizer_config `settings`), which `from_folder` and transformers both read back."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(folder / "tokenizer.json"))
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
        for key, value in (("bos_token", self.bos_token), ("eos_token", self.eos_token)):
            if value is not None:
                config[key] = value
        config.update(settings or {})
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> _HFTokenizer:
        """The `tokenizers` Tokenizer itself."""
        return self._tok

    @cached_property
    def special_ids(self) -> frozenset[int]:
        """Ids that decoding with skip_special_tokens leaves out."""
        return frozenset(i for i, token in self._tok.get_added_tokens_decoder().items() if token.special)

    @cached_property
    def byte_ids(self) -> frozenset[int]:
        """SentencePiece byte-fallback tokens (<0x00>..<0xFF>) when the decoder joins them into text
        (its ByteFallback step), else none. A run of them decodes as a whole: a byte that is not
        valid UTF-8 turns every byte of its run into U+FFFD, the ones already valid too."""
        if '"ByteFallback"' not in json.dumps(json.loads(self._tok.to_str()).get("decoder")):
            return frozenset()
        names = (f"<0x{b:02X}>" for b in range(256))
        return frozenset(i for i in map(self._tok.token_to_id, names) if i is not None)

    def token_id(self, text: str) -> int | None:
        return self._tok.token_to_id(text)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """encode() of each text, the texts spread over the CPU cores."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
                    documents: list[dict] | None = None, continue_final_message: bool = False,
                    **chat_template_kwargs: object) -> str:
        """The text transformers' apply_chat_template(..., tokenize=False) gives for the same arguments;
        `continue_final_message` leaves the last message open for the model to continue (with
        add_generation_prompt=False); `chat_template_kwargs` are extra template variables (e.g.
        enable_thinking=False for Qwen3)."""
        if self.chat_template is None:
            raise CheckpointError(f"{self.source}: the tokenizer has no chat template; pass raw text instead "
                                  "(or a template with --chat-template FILE)")
        return render_template(self.chat_template, messages, self.special_tokens, add_generation_prompt,
                               tools, documents, continue_final_message, **chat_template_kwargs)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
                    documents: list[dict] | None = None, continue_final_message: bool = False,
                    **chat_template_kwargs: object) -> list[int]:
        # The template writes any BOS itself, so no special tokens are added again (as transformers does).
        text = self.render_chat(messages, add_generation_prompt, tools, documents, continue_final_message,
                                **chat_template_kwargs)
        return self.encode(text, add_special_tokens=False)

    def encode_prompt(self, text: str, raw: bool = False) -> list[int]:
        """A user's prompt as token ids: through the chat template unless `raw` or there is none."""
        if raw or self.chat_template is None:
            return self.encode(text)
        return self.encode_chat([{"role": "user", "content": text}])


class StreamDecoder:
    """Turns committed token ids into text pieces as they arrive; the pieces add up to the
    decoded text of all the ids.

    Text is released only once later tokens cannot change it: not while it ends in an unfinished
    character (U+FFFD until its last byte arrives), and, with a byte-fallback vocabulary, not while
    the ids end in a run of byte tokens, which decodes as a whole (one invalid byte turns the whole
    run into U+FFFD; special tokens, when skipped, do not end a run). Only a short window is decoded per
    step (the unread tokens plus a few already read ones, whose text is subtracted), so the cost
    does not grow with the text.
    """

    # Read tokens decoded again in front of new ones, so that spaces and merges at
    # the boundary come out as they do in the whole text.
    CONTEXT = 6

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""
        self._start = 0  # first id of the decoding window
        self._read = 0  # ids before this are already in self.text
        self._head = ""  # the text of ids[_start:_read], decoded once per commit

    def _in_byte_run(self, ids: list[int]) -> bool:
        """Whether the last id that decoding keeps is a byte-fallback token (its run may go on)."""
        byte_ids = self.tokenizer.byte_ids
        if not byte_ids:
            return False
        special = self.tokenizer.special_ids if self.skip_special_tokens else frozenset()
        last = next((i for i in reversed(ids) if i not in special), None)
        return last in byte_ids

    def _unread_text(self, extra: list[int], allow_partial: bool = False) -> str | None:
        """Text of ids[_read:] + extra, or None while later tokens could still change it."""
        window = self.ids[self._start :] + extra
        if not allow_partial and self._in_byte_run(window):
            return None
        full = self.tokenizer.decode(window, self.skip_special_tokens)
        if not full.startswith(self._head) or (full.endswith("\ufffd") and not allow_partial):
            return None
        return full[len(self._head) :]

    def peek(self, token_ids: list[int]) -> str | None:
        """The text `token_ids` would release if pushed now, without pushing them."""
        return self._unread_text(token_ids)

    def push(self, token_ids: list[int]) -> str:
        self.ids.extend(token_ids)
        piece = self._unread_text([])
        return "" if piece is None else self._commit(piece)

    def flush(self) -> str:
        """At the end of a request: whatever is still held back, unfinished characters included."""
        piece = self._unread_text([], allow_partial=True)
        return "" if piece is None else self._commit(piece)

    def _commit(self, piece: str) -> str:
        self.text += piece
        self._read = len(self.ids)
        self._start = max(0, self._read - self.CONTEXT)
        self._head = self.tokenizer.decode(self.ids[self._start : self._read], self.skip_special_tokens)
        return piece
