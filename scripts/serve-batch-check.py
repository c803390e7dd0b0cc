"""`easyspec serve` under concurrent clients, on the GPU: correctness first, then throughput.

For each method: start a server (--max-num-seqs 8), answer every prompt alone, then all at once, and
compare the completions token for token (greedy; exact in float32); then stream C clients at once for
each concurrency C and time them (total tokens/s; per request, time to first token and time per output
token after the first, both as medians over the requests). /metrics' batch-size histogram says how many
sequences the steps decoded together, on average.
Results go to $OUT/serve-batch.json; the table is printed last.

    OUT=out python scripts/serve-batch-check.py --device cuda --methods vanilla,sd,easyspec --devices 2
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "easyspec" / "models" / "demo" / "prompts.jsonl"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def stream(url: str, body: dict) -> tuple[float, list[float], int]:
    """Time to first chunk, arrival times of every chunk after it, and tokens generated."""
    request = urllib.request.Request(url, json.dumps({**body, "stream": True}).encode(),
                                     {"Content-Type": "application/json"})
    start, arrivals, generated = time.perf_counter(), [], 0
    with urllib.request.urlopen(request, timeout=600) as response:
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            arrivals.append(time.perf_counter() - start)
            generated = chunk.get("easyspec", {}).get("generated", generated)
    return arrivals[0], arrivals, generated


def at_once(calls: list) -> list:
    results = [None] * len(calls)
    barrier = threading.Barrier(len(calls))

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = calls[i]()
        except Exception as err:  # reported with the results
            results[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def metrics(base: str) -> dict[str, float]:
    with urllib.request.urlopen(base + "/metrics", timeout=30) as response:
        text = response.read().decode()
    return {key: float(value) for key, value in (line.rsplit(" ", 1) for line in text.splitlines()
                                                   if line and not line.startswith("#"))}


def check_method(method: str, args: argparse.Namespace, prompts: list[str], out: Path) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(out / f"serve-{method}.log", "w")
    cmd = [sys.executable, "-m", "easyspec", "serve", "--port", str(port), "--method", method, "--device", args.device,
           "--devices", str(args.devices), "--dtype", args.dtype, "--max-num-seqs", str(max(args.concurrency)),
           "--max-queue", "64", *args.serve_args]
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(base + "/health", timeout=1)
                break
            except OSError:
                if server.poll() is not None:
                    raise SystemExit(f"{method}: the server exited; see {log.name}") from None
                time.sleep(0.5)
        url = base + "/v1/completions"
        body = dict(max_tokens=args.max_tokens, temperature=0, logprobs=0, ignore_eos=True)

        def complete(prompt: str) -> list[str]:
            return post(url, {**body, "prompt": prompt})["choices"][0]["logprobs"]["tokens"]

        alone = [complete(p) for p in prompts]
        together = at_once([lambda p=p: complete(p) for p in prompts])
        mismatches = [i for i, (a, b) in enumerate(zip(alone, together, strict=True)) if a != b]
        row = {"method": method, "prompts": len(prompts), "mismatches": mismatches, "levels": []}
        for level in args.concurrency:
            before = metrics(base)
            chosen = [prompts[i % len(prompts)] for i in range(level)]
            start = time.perf_counter()
            runs = at_once([lambda p=p: stream(url, {"prompt": p, "max_tokens": args.max_tokens, "temperature": 0,
                                                     "ignore_eos": True}) for p in chosen])
            wall = time.perf_counter() - start
            after = metrics(base)
            failed = [r for r in runs if isinstance(r, Exception)]
            if failed:
                raise SystemExit(f"{method} at {level}: {failed[0]}")
            steps = after["easyspec_batch_size_count"] - before.get("easyspec_batch_size_count", 0)
            sequences = after["easyspec_batch_size_sum"] - before.get("easyspec_batch_size_sum", 0)
            tpots = [(a[-1] - a[0]) / (g - 1) for _, a, g in runs if g > 1]
            row["levels"].append({"concurrency": level, "tokens": sum(g for _, _, g in runs), "wall_s": wall,
                                  "tokens_per_s": sum(g for _, _, g in runs) / wall,
                                  "ttft_s": sorted(t for t, _, _ in runs)[len(runs) // 2],
                                  "tpot_s": sorted(tpots)[len(tpots) // 2] if tpots else None,
                                  "mean_batch": sequences / steps if steps else None})
        return row
    finally:
        server.terminate()
        server.wait(30)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="vanilla,sd,easyspec")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--dtype", default="float32", help="float32: greedy batched == alone exactly")
    parser.add_argument("--concurrency", default="1,2,4,8")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("serve_args", nargs="*", help="more `easyspec serve` flags, after --")
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    prompts = [json.loads(line)["turns"][0] for line in PROMPTS.read_text().splitlines()[: args.num_prompts]]
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    rows = [check_method(m, args, prompts, out) for m in args.methods.split(",")]
    (out / "serve-batch.json").write_text(json.dumps(rows, indent=2))
    print(f"\n{args.device} x{args.devices}, {args.dtype}, greedy, {args.max_tokens} tokens per request")
    print("| method | batched == alone | C | tokens/s | TTFT p50 s | TPOT p50 ms | mean batch |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        same = f"{row['prompts'] - len(row['mismatches'])}/{row['prompts']}"
        for lv in row["levels"]:
            tpot = "-" if lv["tpot_s"] is None else f"{lv['tpot_s'] * 1e3:.1f}"
            batch = "-" if lv["mean_batch"] is None else f"{lv['mean_batch']:.2f}"
            print(f"| {row['method']} | {same} | {lv['concurrency']} | {lv['tokens_per_s']:.0f} | {lv['ttft_s']:.3f} "
                  f"| {tpot} | {batch} |")


if __name__ == "__main__":
    main()
