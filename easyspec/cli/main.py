"""`easyspec` command line: generate (serve, bench, bench-steps, convert, distill and acceptance register
themselves here too)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from easyspec import __version__
from easyspec.cli.args import (
    HelpFormatter,
    add_engine_args,
    add_sampling_args,
    options_from_args,
    parse_ids,
    sampling_from_args,
)

DESCRIPTION = """\
easyspec runs a language model with lossless speculative decoding: a small draft
model proposes tokens and the model verifies them, so the output is the model's
own (token for token at temperature 0, the same distribution when sampling),
only faster. With --devices N the model is tensor-parallel over N processes
(GPUs with --device cuda), and EasySpec's layer-parallel drafting runs the
draft's layers at once on several devices.

Models: Hugging Face folders or GGUF files of Llama, Mistral, Qwen2 and Qwen3;
without --model the bundled demo pair (a small Python code model) is used.

examples:
  easyspec generate --prompt "def fibonacci(n):" --raw
  easyspec generate --model DIR --draft DRAFT --method easyspec --devices 2 --prompt "Hello"
  easyspec serve --model DIR --port 8000        (needs: pip install 'easyspec[serve]')
  easyspec bench --devices 2 --methods vanilla,sd-tp1,easyspec
  easyspec COMMAND --help                       (every flag of a command, with its default)
"""

# Mistakes a user can fix get one line and exit code 2; anything else exit code 1.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError)


def log_to_stderr() -> None:
    """The engine's notes (context length, loading, generation_config settings) as plain lines on stderr."""
    logger = logging.getLogger("easyspec")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def cmd_generate(args: argparse.Namespace) -> int:
    from easyspec.engine.engine import Engine

    if (args.prompt is None) == (args.prompt_ids is None):
        raise ValueError("give exactly one of --prompt TEXT or --prompt-ids 1,2,3")
    settings = sampling_from_args(args)
    options = options_from_args(args)
    prompt_ids = list(parse_ids(args.prompt_ids, "--prompt-ids")) if args.prompt_ids is not None else None
    log_to_stderr()
    with Engine(options) as engine:
        if prompt_ids is None:
            prompt_ids = engine.encode_prompt(args.prompt, raw=args.raw)
        params = engine.sampling_params(len(prompt_ids), **settings)
        token_ids: list[int] = []
        logprobs: list[dict] = []
        text, chunk = "", None
        for chunk in engine.generate(prompt_ids, params):
            token_ids += chunk.token_ids
            text += chunk.text
            logprobs += [entry.to_dict() for entry in chunk.logprobs or ()]
            if engine.is_driver and not args.json:
                print(chunk.text, end="", flush=True)
        if not engine.is_driver:
            return 0
        if args.json:
            stats = chunk.stats.to_dict()
            out = {
                "token_ids": token_ids,
                "text": text,
                "finish_reason": chunk.finish_reason,
                "stop_reason": chunk.stop_reason,
                "prompt_tokens": len(prompt_ids),
                "method": options.method,
                "devices": options.devices,
                "stats": stats,
            }
            if params.logprobs is not None:
                out["logprobs"] = logprobs
            print(json.dumps(out))
        else:
            if engine.tokenizer is None:
                print(" ".join(map(str, token_ids)))
            else:
                print()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="easyspec", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"easyspec {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    gen = sub.add_parser("generate", help="generate a continuation of one prompt",
                         description="Generates a continuation of one prompt and streams it to stdout (with --json, "
                                     "one JSON object with token ids, text and speculation stats at the end).",
                         formatter_class=HelpFormatter)
    gen.add_argument("--prompt", help="prompt text (through the chat template when the model has one, unless --raw)")
    gen.add_argument("--prompt-ids", help="prompt as comma-separated token ids")
    gen.add_argument("--raw", action="store_true", help="encode --prompt as plain text, without the chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object with ids, text and stats")
    add_engine_args(gen, batch=False)
    add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)
    from easyspec.bench.cli import register as register_bench
    from easyspec.bench.cli import register_steps
    from easyspec.cli.convert import register as register_convert
    from easyspec.distill.cli import register as register_distill
    from easyspec.server.cli import register as register_serve

    register_serve(sub)
    register_bench(sub)
    register_steps(sub)
    register_convert(sub)
    register_distill(sub)
    # Listed here for --help; main() hands `easyspec zoo ...` to the zoo's own parser.
    sub.add_parser("zoo", add_help=False, help="train, check and inflate model pairs (easyspec zoo --help)")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["zoo"]:
        from easyspec.zoo.cli import main as zoo_main

        zoo_main(argv[1:], prog="easyspec zoo")  # one-line errors and exit code 2 for user mistakes, as here
        return
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except KeyboardInterrupt:
        code = 130
    except USER_ERRORS as err:
        if os.environ.get("EASYSPEC_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        code = 2
    except Exception as err:  # one line, never a traceback, unless debugging
        if os.environ.get("EASYSPEC_DEBUG"):
            raise
        from easyspec.engine.engine import WorkerFailure, exit_on_failure

        if isinstance(err, WorkerFailure):
            exit_on_failure(str(err))
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        code = 1
    sys.stdout.flush()
    # Exit without waiting on threads or process-group teardown that a failed peer could block.
    os._exit(code)
