"""Penalties, min_tokens and log-probabilities on the GPU (issue 21 item 2), on the bundled demo pair.

    python scripts/check_fields.py [--device cuda] [--tokens 96] [--out DIR] [--correctness-only]

Every method (vanilla, sd, an sd tree, ngram) decodes the same prompts greedily in float32 with CUDA
graphs, with repetition/presence/frequency penalties, min_tokens and logprobs set: the tokens must
equal vanilla's and the log-probabilities match vanilla's. Then tokens/s and the mean accepted
length with those settings and without them (their cost; --correctness-only skips the runs without
them). Prints a line per method as it is checked and a table (last), writes DIR/check_fields.json,
and exits 1 when a method's tokens differ from vanilla's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from easyspec import Engine, EngineOptions, SamplingParams
from easyspec.options import DEFAULT_MODEL_DIR

PROMPTS = ["def fibonacci(n):", "class Stack:\n", "import os\n"]
METHODS = {"vanilla": {}, "sd": {"method": "sd"}, "sd-tree4x4": {"method": "sd", "tree_width": 4, "tree_depth": 4},
           "ngram": {"method": "ngram"}}


def run(config: dict, params: SamplingParams, device: str) -> list[dict]:
    """Each prompt's tokens, log-probabilities, tokens/s (after a warm-up pass) and mean accepted length."""
    draft = {"draft": str(DEFAULT_MODEL_DIR / "draft")} if config.get("method") == "sd" else {}
    options = EngineOptions(model=str(DEFAULT_MODEL_DIR / "base"), device=device, dtype="float32", progress=False,
                            **config, **draft)
    out = []
    with Engine(options) as engine:
        for prompt in PROMPTS:
            ids = engine.encode_prompt(prompt, raw=True)
            list(engine.generate(ids, params))  # captures the graphs
            start = time.perf_counter()
            chunks = list(engine.generate(ids, params))
            seconds = time.perf_counter() - start
            tokens = [t for c in chunks for t in c.token_ids]
            out.append({"tokens": tokens, "logprobs": [e.logprob for c in chunks for e in c.logprobs or ()],
                        "tokens_per_s": len(tokens) / seconds, "mean_accepted": chunks[-1].stats.mean_accepted_length})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--correctness-only", action="store_true",
                        help="only the runs with the fields set: no 'none' rows, so no cost figures")
    args = parser.parse_args()
    n = args.tokens
    penalized = SamplingParams(max_new_tokens=n, ignore_eos=True, repetition_penalty=1.3, presence_penalty=0.3,
                               frequency_penalty=0.2, min_tokens=n // 2, logprobs=2)
    plain = SamplingParams(max_new_tokens=n, ignore_eos=True)
    reference = run({}, penalized, args.device)
    rows, ok = [], True
    for name, config in METHODS.items():
        settings = (("penalized", penalized),) if args.correctness_only else (("penalized", penalized), ("none", plain))
        for label, params in settings:
            results = run(config, params, args.device)
            row = {"method": name, "settings": label,
                   "tokens_per_s": sum(r["tokens_per_s"] for r in results) / len(results),
                   "mean_accepted": sum(r["mean_accepted"] for r in results) / len(results)}
            if label == "penalized":
                row["equal"] = all(r["tokens"] == v["tokens"] for r, v in zip(results, reference, strict=True))
                row["max_logprob_diff"] = max(abs(a - b) for r, v in zip(results, reference, strict=True)
                                              for a, b in zip(r["logprobs"], v["logprobs"], strict=True))
                ok &= row["equal"]
                print(f"{name}: tokens == vanilla {row['equal']}, max logprob diff {row['max_logprob_diff']:.1e}",
                      flush=True)
            rows.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "check_fields.json").write_text(json.dumps(rows, indent=2))
    print("method | settings | tokens == vanilla | max logprob diff | tokens/s | mean accepted length")
    for row in rows:
        diff = f"{row['max_logprob_diff']:.1e}" if "equal" in row else "-"
        print(f"{row['method']} | {row['settings']} | {row.get('equal', '-')} | {diff} | {row['tokens_per_s']:.1f} | "
              f"{row['mean_accepted']:.2f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
