#!/usr/bin/env bash
# The GPU benchmark suite behind BENCHMARKS.md, for a 2-GPU H100 machine with no network.
#
#   scripts/bench-gpu.sh train   # train the demo pair on both GPUs (~5 min; the repo bundles its result)
#   scripts/bench-gpu.sh demo    # the bundled demo pair end to end, then 8B/1B random-weight shapes (~10 min)
#   scripts/bench-gpu.sh shapes  # random-weight real shapes alone: per-stage latency only
#
# Results (markdown tables, bench.json, bench.png, the trained pair as a tarball) go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
out="${OUT:-out}"
work="${WORK:-/tmp/easyspec}"
mkdir -p "$out" "$work"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpus.txt"
bench() { python3 -m easyspec bench --device cuda "$@"; }

case "${1:-demo}" in
train)
    # The demo pair: base and draft trained at once, one per GPU; packed in pieces small enough to fetch.
    timeout 330 python3 -m easyspec.zoo train-pair --pair demo --out "$work/demo" --minutes "${MINUTES:-1.5}" \
        --devices cuda:0,cuda:1 --site-packages 2>&1 | tail -n 25
    tar -czf - -C "$work/demo" base draft prompts.jsonl pair.json | split -b 15M - "$out/demo-pair.tgz."
    ;;
demo)
    # End to end on the bundled demo pair and its held-out prompts, float32 so outputs must equal vanilla exactly.
    pair=easyspec/models/demo
    timeout 300 python3 -m easyspec bench --device cuda --devices 2 --model $pair/base --draft $pair/draft \
        --prompts $pair/prompts.jsonl --num-prompts 12 --max-new-tokens 128 --repeats 2 --dtype float32 \
        --title "demo pair, 2 GPUs, float32, greedy" --out "$out/demo" \
        --methods vanilla,sd-tp1,sd-tpN,ngram,easyspec,easyspec:attention+tp-mlp,easyspec:attention:on-mismatch,easyspec:layer \
        2>"$out/demo-bench.log" | tee "$out/demo.md"
    tail -n 5 "$out/demo-bench.log"
    "$0" shapes
    ;;
shapes)
    # Random weights at real shapes: latency per stage only; acceptance means nothing here.
    common=(--dtype bfloat16 --num-prompts 2 --prompt-len 512 --max-new-tokens 64 --repeats 2 --max-context 2048)
    timeout 250 python3 -m easyspec bench --device cuda --devices 2 --preset llama-3.1-8b --draft-preset llama-3.2-1b \
        "${common[@]}" --methods vanilla,sd-tp1,sd-tpN,easyspec,easyspec:attention+tp-mlp \
        --title "8B base / 1B draft, 2 GPUs" --out "$out/shapes2" --workdir "$work" \
        2>"$out/shapes2.log" | tee "$out/shapes2.md"
    tail -n 3 "$out/shapes2.log"
    ;;
*)
    echo "usage: scripts/bench-gpu.sh train|demo|shapes" >&2
    exit 2
    ;;
esac
