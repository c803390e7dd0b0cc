#!/usr/bin/env bash
# On a 2-GPU machine: serve the demo pair with EasySpec over both GPUs, stream one completion,
# then measure greedy first-divergence from vanilla in bfloat16 over the demo prompts.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
out="${OUT:-out}"
mkdir -p "$out"
python3 -m easyspec serve --device cuda --devices 2 --method easyspec --dtype bfloat16 --port 8411 \
    >"$out/serve.log" 2>&1 &
server=$!
for _ in $(seq 120); do curl -sf localhost:8411/health >/dev/null && break; sleep 1; done
curl -sN localhost:8411/v1/completions \
    -d '{"prompt": "def fibonacci(n):", "max_tokens": 48, "temperature": 0, "stream": true}' | tee "$out/stream.txt"
curl -s localhost:8411/metrics | grep -E "spec_decode|requests_total" | tee "$out/metrics.txt"
kill $server; sleep 3; kill -9 $server 2>/dev/null
pair=easyspec/models/demo
timeout 200 python3 -m easyspec bench --device cuda --devices 2 --model $pair/base --draft $pair/draft \
    --prompts $pair/prompts.jsonl --num-prompts 24 --max-new-tokens 128 --repeats 1 --dtype bfloat16 \
    --methods vanilla,sd-tp1,easyspec --title "demo pair, 2 GPUs, bfloat16, greedy" --out "$out/bf16" \
    2>"$out/bf16.log" | tee "$out/bf16.md"
python3 - "$out/bf16/bench.json" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1]))["results"][1:]:
    d = r["divergence"]
    firsts = sorted(x for x in d if x is not None)
    print(f"{r['label']}: identical {d.count(None)}/{len(d)}; first divergence positions {firsts}")
PY
