"""A GGUF model on the GPU against transformers' own GGUF loading of the same file (issue 15).

    python scripts/gguf_gpu_check.py FILE.gguf [--tokens 48] [--out DIR]

Greedy ids of easyspec (vanilla, float32) and of transformers (the same file dequantized by its GGUF
loader, float32, its KV cache), both on the GPU, for chat prompts through the file's chat template and raw
prompts; then easyspec in bfloat16 (tokens/s, text). Prints a table, writes DIR/gguf_gpu_check.json,
and exits 1 when a float32 continuation differs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from easyspec import Engine, EngineOptions, SamplingParams
from easyspec.model.loader import load_tokenizer

CHATS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain recursion to a child."]
RAW = ["def fibonacci(n):", "The three primary colors are"]


def transformers_greedy(path: Path, prompts: list[list[int]], n: int, device: str) -> list[list[int]]:
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    model = model.to(device).eval()
    outputs = []
    with torch.no_grad():
        for ids in prompts:
            out: list[int] = []
            step = model(torch.tensor([ids], device=device), use_cache=True)
            for _ in range(n):
                out.append(int(step.logits[0, -1].argmax()))
                step = model(torch.tensor([out[-1:]], device=device), past_key_values=step.past_key_values,
                             use_cache=True)
            outputs.append(out)
    return outputs


def easyspec_greedy(path: Path, prompts: list[list[int]], n: int, device: str,
                    dtype: str) -> tuple[list[list[int]], float]:
    """Greedy ids per prompt, and tokens/s of a second pass (the first captures the CUDA graphs)."""
    params = SamplingParams(max_new_tokens=n, ignore_eos=True)
    with Engine(EngineOptions(model=str(path), device=device, dtype=dtype)) as engine:
        for ids in prompts:
            list(engine.generate(ids, params))
        start = time.perf_counter()
        outputs = [[t for chunk in engine.generate(ids, params) for t in chunk.token_ids] for ids in prompts]
        elapsed = time.perf_counter() - start
    return outputs, n * len(prompts) / elapsed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", type=Path)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--out", type=Path, default=Path("."))
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run")
    args = p.parse_args()
    tok = load_tokenizer(args.file)
    prompts = [tok.encode_chat([{"role": "user", "content": c}]) for c in CHATS]
    prompts += [tok.encode(r, add_special_tokens=False) for r in RAW]
    ours, _ = easyspec_greedy(args.file, prompts, args.tokens, args.device, "float32")
    theirs = transformers_greedy(args.file, prompts, args.tokens, args.device)
    bf16, tokens_per_s = easyspec_greedy(args.file, prompts, args.tokens, args.device, "bfloat16")
    rows = []
    for label, a, b, c in zip(CHATS + RAW, ours, theirs, bf16, strict=True):
        first = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
        rows.append({"prompt": label, "float32_equal": a == b, "first_difference": first,
                     "bf16_equal_to_float32": c == a, "text": tok.decode(a)})
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    result = {"file": str(args.file), "device": device, "tokens": args.tokens,
              "bf16_tokens_per_s": tokens_per_s, "rows": rows}
    (args.out / "gguf_gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.file.name} on {device}: {args.tokens} greedy tokens per prompt, "
          f"easyspec bfloat16 {tokens_per_s:.1f} tokens/s")
    print(f"{'prompt':40} {'fp32 = HF':>9} {'1st diff':>8} {'bf16 = fp32':>11}  text")
    for r in rows:
        text = r["text"].replace("\n", " ")[:60]
        print(f"{r['prompt'][:40]:40} {str(r['float32_equal']):>9} {str(r['first_difference']):>8} "
              f"{str(r['bf16_equal_to_float32']):>11}  {text}")
    return 0 if all(r["float32_equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
