"""What an Engine settles before any process starts: checks that need only config files (so that
mistakes are one line), the dtype, the context length and batch size, and the request defaults."""

from __future__ import annotations

from pathlib import Path

from easyspec.draft.setup import check_draft
from easyspec.engine.capacity import settle_context
from easyspec.model.checkpoint import read_text
from easyspec.model.loader import generation_defaults, is_gguf, load_config, stored_dtype
from easyspec.model.tokenizer import check_chat_template
from easyspec.options import (
    AUTO_DTYPE,
    VLLM_SAMPLING_DEFAULTS,
    EngineOptions,
    GenerationConfig,
    OptionsError,
    SamplingParams,
    auto_dtype,
)
from easyspec.parallel.tp import check_divisible


def preflight(options: EngineOptions) -> tuple[EngineOptions, str]:
    """Checks that need only config files, done before any process is started; returns the
    options with the dtype and the context length settled, and a line saying what the KV cache takes."""
    options.validate()
    base = load_config(options.model)
    draft = load_config(options.draft) if options.draft else None
    if options.chat_template is not None and not is_gguf(options.model) \
            and not (Path(options.model) / "tokenizer.json").is_file():
        raise OptionsError(f"--chat-template needs a tokenizer, and {options.model} has no tokenizer.json")
    if options.chat_template is not None:
        check_chat_template(read_text(Path(options.chat_template)), options.chat_template)
    if options.dtype == AUTO_DTYPE:
        options = options.replace(dtype=auto_dtype(options.device, stored_dtype(options.model)))
    if options.devices > 1:
        check_divisible(base, options.devices, "base model")
    for name, cfg in (("base model", base), ("draft", draft)):
        window = cfg.sliding_window if cfg is not None else None
        if options.tree and window is not None and window <= options.initial_num_draft:
            # A tree token's key sits at a slot past its position; the mask is exact only for shallower trees.
            raise OptionsError(f"the {name}'s sliding_window ({window}) must be longer than the tree is deep "
                               f"({options.initial_num_draft}); lower --tree-depth")
    if options.tree_width > base.vocab_size:
        raise OptionsError(f"--tree-width {options.tree_width} exceeds the vocabulary "
                           f"({base.vocab_size} tokens); lower it")
    check_device(options.device, options.devices)
    context, rows, line = settle_context(options, base, draft)
    options = options.replace(max_context=context, max_num_seqs=rows)
    if draft is not None:
        check_draft(base, draft, options)
    return options, line


def check_device(device: str, devices: int) -> None:
    """--device cuda needs `devices` visible CUDA devices; the CPU runs any number of processes."""
    if device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        raise OptionsError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
    if torch.cuda.device_count() < devices:
        raise OptionsError(f"--devices {devices} but only {torch.cuda.device_count()} CUDA devices are visible")


def request_defaults(options: EngineOptions) -> dict[str, object]:
    """The SamplingParams fields a request takes unless it sets them (--generation-config)."""
    mode = options.generation_config
    if mode == GenerationConfig.NONE:
        return {}
    if mode == GenerationConfig.VLLM:
        return dict(VLLM_SAMPLING_DEFAULTS)
    defaults = generation_defaults(options.model if mode == GenerationConfig.AUTO else mode)
    SamplingParams(**defaults)  # the file's values pass the same checks as a request's
    return defaults
