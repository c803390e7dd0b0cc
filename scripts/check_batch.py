"""Batched decoding on the GPU (issue 22), on the bundled demo pair: correctness through CUDA graphs.

    python scripts/check_batch.py [--device cuda] [--tokens 64] [--out DIR]

For every method (vanilla, sd, adaptive sd, an sd tree, ngram) in float32 with CUDA graphs: 8 prompts
of different lengths with different max_new_tokens, each decoded alone and then all together
(generate_many, --max-num-seqs 8); every request's tokens must be the same both ways and equal plain
decoding's. Then a seeded sampled batch against the same requests alone. Prints a line per method as
it is checked and a table (last), writes DIR/check_batch.json, exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from easyspec import Engine, EngineOptions, SamplingParams
from easyspec.options import DEFAULT_MODEL_DIR

PROMPTS = ["def fibonacci(n):", "class Stack:\n", "import os\n", "for i in range(10):", "# sort a list\n",
           "def add(a, b):\n    return", "x = [", "while True:"]
DRAFT = str(DEFAULT_MODEL_DIR / "draft")
METHODS = {"vanilla": {}, "sd": {"method": "sd", "draft": DRAFT},
           "sd-adaptive": {"method": "sd", "draft": DRAFT, "adaptive_draft": True},
           "sd-tree2x3": {"method": "sd", "draft": DRAFT, "tree_width": 2, "tree_depth": 3, "draft_token_budget": 64},
           "ngram": {"method": "ngram"}}


def run(config: dict, device: str, tokens: int) -> dict:
    options = EngineOptions(model=str(DEFAULT_MODEL_DIR / "base"), device=device, dtype="float32", progress=False,
                            max_num_seqs=len(PROMPTS), **config)
    greedy = [SamplingParams(max_new_tokens=tokens - 3 * i, ignore_eos=True) for i in range(len(PROMPTS))]
    sampled = [SamplingParams(max_new_tokens=tokens, temperature=0.8, seed=i, ignore_eos=True)
               for i in range(len(PROMPTS))]
    with Engine(options) as engine:
        ids = [engine.encode_prompt(p, raw=True) for p in PROMPTS]
        alone = [[t for c in engine.generate(p, s) for t in c.token_ids] for p, s in zip(ids, greedy, strict=True)]
        start = time.perf_counter()
        batched = engine.generate_many(ids, greedy, progress=False)
        seconds = time.perf_counter() - start
        sampled_alone = [[t for c in engine.generate(p, s) for t in c.token_ids]
                         for p, s in zip(ids, sampled, strict=True)]
        sampled_batch = [r.token_ids for r in engine.generate_many(ids, sampled, progress=False)]
    return {"alone": alone, "batched": [r.token_ids for r in batched],
            "tokens_per_s": sum(len(r.token_ids) for r in batched) / seconds,
            "sampled_equal": sampled_alone == sampled_batch}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    rows, plain, ok = [], None, True
    for name, config in METHODS.items():
        result = run(config, args.device, args.tokens)
        plain = plain or result["alone"]
        row = {"method": name, "batched == alone": result["batched"] == result["alone"],
               "== vanilla": result["batched"] == plain, "sampled batched == alone": result["sampled_equal"],
               "batched tokens/s": round(result["tokens_per_s"], 1)}
        ok &= row["batched == alone"] and row["== vanilla"]
        print(json.dumps(row), flush=True)
        rows.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "check_batch.json").write_text(json.dumps(rows, indent=2))
    print("method | batched == alone | == vanilla | sampled batched == alone | batched tokens/s")
    for row in rows:
        print(" | ".join(str(v) for v in row.values()))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
