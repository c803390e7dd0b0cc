#!/usr/bin/env bash
# The GPU benchmark suite behind BENCHMARKS.md, for a 2-GPU H100/H200 machine with no network.
#
#   scripts/bench-gpu.sh full    # the main tables in one run of under 10 minutes: 8B/1B step latencies (TP=1/2,
#                                # HF eager), then the benchmark pair trained and every method run on it
#   scripts/bench-gpu.sh pair    # the benchmark pair alone (~8 min)
#   scripts/bench-gpu.sh steps   # step latencies at 8B/1B, then 1B and 32B bases alone (~4 min)
#   scripts/bench-gpu.sh demo    # the bundled demo pair end to end, float32 (~3 min)
#   scripts/bench-gpu.sh train   # retrain the bundled demo pair (~5 min)
#   scripts/bench-gpu.sh real [BASE DRAFT [PROMPTS]]
#                                # a trained pair inflated to the 8B/1B shapes, every method end to end (~8 min)
#   scripts/bench-gpu.sh kernels # ONE GPU (~6 min): the fused kernels' CUDA tests, float32 greedy equality of
#                                # every method on the demo pair with them, 8B/1B step latencies with and without,
#                                # each kernel alone
#   scripts/bench-gpu.sh concurrency [BASE DRAFT [PROMPTS]]
#                                # ONE GPU (~8 min): the pair inflated as `real` does, every one-GPU method served
#                                # at 1, 2, 4, 8 and 16 requests in flight (easyspec bench --concurrency)
#
# Results (markdown tables, bench.json, bench.png) go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1  # keeps a gguf installed beside it
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
out="${OUT:-out}"
work="${WORK:-/tmp/easyspec}"
if ! nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >/dev/null 2>&1; then
    echo "error: scripts/bench-gpu.sh needs NVIDIA GPUs and nvidia-smi finds none; run it on a GPU machine" >&2
    exit 2
fi
mkdir -p "$out" "$work"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpus.txt"
# End-to-end rows: every method on the same prompts (trees once per drafter kind).
E2E_METHODS="${METHODS:-vanilla,sd-tp1,sd-tpN,ngram,easyspec,easyspec:attention+tp-mlp,sd-tp1:tree=4x4,easyspec:attention:every-round:2:tree=4x4}"
# inflate_pair BASE DRAFT DIR DTYPE...: a trained pair at real shapes (easyspec zoo inflate), DIR/base-DTYPE and
# DIR/draft-DTYPE per dtype: the base at BASE_SHAPE (Llama-3.1-8B's), the draft at DRAFT_SHAPE's width
# (Llama-3.2-1B's) with its own layers.
inflate_pair() {
    local base=$1 draft=$2 dir=$3 dtype
    shift 3
    for dtype in "$@"; do
        python3 -m easyspec zoo inflate --model "$base" --shape "${BASE_SHAPE:-llama-3.1-8b}" \
            --out "$dir/base-$dtype" --dtype "$dtype" --overwrite
        python3 -m easyspec zoo inflate --model "$draft" --shape "${DRAFT_SHAPE:-llama-3.2-1b}" --draft \
            --out "$dir/draft-$dtype" --dtype "$dtype" --overwrite
    done
}
# bench_until DIR NAME ARGS...: one quiet `easyspec bench` run into DIR/NAME (tables in DIR/NAME.md, log in
# DIR/NAME.log), cut off at $deadline seconds after the script started.
bench_until() {
    local dir=$1 name=$2 left=$((deadline - SECONDS))
    shift 2
    if [ $left -le 10 ]; then echo "$name: not run, the deadline has passed" | tee -a "$dir/skipped.txt"; return; fi
    echo "== $name ($left s left)"
    timeout $left python3 -m easyspec bench --quiet --out "$dir/$name" "$@" 2>"$dir/$name.log" | tee "$dir/$name.md"
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 124 ] && echo "$name: cut off at the deadline, after $left s" | tee -a "$dir/skipped.txt"
    [ "$rc" = 0 ] || [ "$rc" = 124 ] || echo "$name: failed (exit $rc), see $name.log" | tee -a "$dir/skipped.txt"
    tail -n 2 "$dir/$name.log"
}
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
    ;;
pair)
    # The benchmark pair (214M base, 88M draft), base and draft trained at once, one per GPU, on the
    # same batches; everything ends by DEADLINE seconds after the script started (default 570).
    deadline="${DEADLINE:-570}"
    timeout $((deadline - SECONDS - 240)) python3 -m easyspec.zoo train-pair --pair bench --out "$work/bench" \
        --minutes "${MINUTES:-2}" --devices cuda:0,cuda:1 --site-packages 2>&1 | tail -n 12
    cp "$work/bench/pair.json" "$out/bench-pair.json" 2>/dev/null
    echo "trained by $SECONDS s"
    timeout $((deadline - SECONDS)) python3 -m easyspec bench --device cuda --devices 2 --model "$work/bench/base" \
        --draft "$work/bench/draft" --prompts "$work/bench/prompts.jsonl" --num-prompts "${PROMPTS:-8}" \
        --max-new-tokens 128 --repeats 1 --dtype bfloat16 --quiet --methods "$E2E_METHODS" \
        --title "benchmark pair, 2 GPUs, bfloat16, greedy" --out "$out/pair" 2>"$out/pair-bench.log" | tee "$out/pair.md"
    tail -n 3 "$out/pair-bench.log"
    ;;
steps-main)
    # Random weights at real shapes: latency per stage only; acceptance means nothing here.
    timeout 150 python3 -m easyspec bench-steps --devices 2 --preset llama-3.1-8b --draft-preset llama-3.2-1b \
        --contexts 512,4096 --out "$out/steps-8b-1b.json" 2>"$out/steps.log" | tee "$out/steps-8b-1b.md"
    ;;
steps)
    "$0" steps-main
    for preset in llama-3.2-1b qwen2.5-32b; do
        timeout 90 python3 -m easyspec bench-steps --devices 2 --preset $preset --draft-preset none --no-hf \
            --contexts 512 --out "$out/steps-$preset.json" 2>>"$out/steps.log" | tee "$out/steps-$preset.md"
    done
    tail -n 3 "$out/steps.log"
    ;;
full)
    # 550 s on 2 H100s: steps ~75 s, data and training ~175 s, eight end-to-end methods ~300 s.
    "$0" steps-main
    DEADLINE=$((570 - SECONDS)) "$0" pair
    # Projected, not measured: the step latencies with the pair's measured acceptance.
    python3 -m easyspec.bench.project "$out/steps-8b-1b.json" "$out/pair/bench.json" | tee "$out/projected.md"
    # The device tool brings back at most 8 files: the printed tables and logs travel as one archive.
    text="gpus.txt steps.log pair-bench.log steps-8b-1b.md pair.md projected.md"
    (cd "$out" && tar -czf tables-and-logs.tgz $text && rm -f $text)
    ;;
real)
    # A trained pair inflated to real shapes (easyspec zoo inflate: the same function, zero-padded): the base to
    # the Llama-3.1-8B shape, the draft to Llama-3.2-1B's width with its own layers. BASE and DRAFT are
    # checkpoint folders (or GGUF files, through `easyspec convert`), PROMPTS held-out prompts in Spec-Bench
    # jsonl; default: the bundled demo pair. First float32 equality on a few prompts (inflated against the
    # original pair, and every method against vanilla), then the bfloat16 timings, on GPUS devices (default:
    # every GPU; one GPU runs the one-GPU methods). Environment: GPUS, BASE_SHAPE, DRAFT_SHAPE, METHODS,
    # PROMPTS_N (8 on one GPU, 6 on N), NEW_TOKENS (128), CHECK_PROMPTS (3, 0 skips the check), DEVICE (cuda;
    # cpu for a dry run), DEADLINE (540 s after the script started). Tables come back in real.md, everything
    # (JSON, logs, plots) in real.tgz.
    base_src="${2:-easyspec/models/demo/base}" draft_src="${3:-easyspec/models/demo/draft}"
    prompts="${4:-easyspec/models/demo/prompts.jsonl}"
    device="${DEVICE:-cuda}" deadline="${DEADLINE:-540}"
    gpus="${GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}"
    [ "$gpus" -ge 1 ] 2>/dev/null || gpus=1
    # The original pair runs on one GPU (a trained model's heads need not divide by N), with the methods
    # whose rows the inflated runs share: `python -m easyspec.bench.compare` matches rows by label.
    original="vanilla,sd-tp1"
    # Eight 8B-shape rows on N GPUs take about as long as five on one: fewer prompts keep both in one call.
    if [ "$gpus" -gt 1 ]; then
        methods="${METHODS:-vanilla,sd-tp1,sd-tpN,easyspec,easyspec:attention+tp-mlp,easyspec:layer,easyspec:attention:on-mismatch,easyspec:attention:never}"
        check="vanilla,sd-tp1,easyspec" n_prompts="${PROMPTS_N:-6}"
    else
        methods="${METHODS:-vanilla,sd-tp1,sd-tp1:adaptive,ngram,sd-tp1:tree=4x4}"
        check="vanilla,sd-tp1,sd-tp1:tree=4x4" n_prompts="${PROMPTS_N:-8}"
    fi
    r="$out/real" w="$work/real"
    mkdir -p "$r" "$w"
    # bench NAME ARGS...: one `easyspec bench` run into $r/NAME, cut off at the deadline.
    bench() {
        local name=$1
        shift
        bench_until "$r" "$name" --device "$device" --prompts "$prompts" "$@"
    }
    dtypes=bfloat16
    [ "${CHECK_PROMPTS:-3}" = 0 ] || dtypes="float32 bfloat16"
    inflate_pair "$base_src" "$draft_src" "$w" $dtypes 2>&1 | tee "$r/inflate.log"
    echo "inflated by $SECONDS s"
    if [ "${CHECK_PROMPTS:-3}" != 0 ]; then
        quick=(--dtype float32 --num-prompts "${CHECK_PROMPTS:-3}" --max-new-tokens 64 --repeats 1 --warmup 0)
        bench f32-original --model "$base_src" --draft "$draft_src" "${quick[@]}" --devices 1 --methods "$original" \
            --title "original pair, 1 GPU, float32"
        bench f32-inflated --model "$w/base-float32" --draft "$w/draft-float32" "${quick[@]}" --devices "$gpus" \
            --methods "$check" --title "inflated pair, $gpus GPU(s), float32"
        python3 -m easyspec.bench.compare "$r/f32-original/bench.json" "$r/f32-inflated/bench.json" \
            --require-equal | tee "$r/f32-compare.md"
    fi
    timed=(--dtype bfloat16 --num-prompts "$n_prompts" --max-new-tokens "${NEW_TOKENS:-128}" --repeats 1)
    shape="${BASE_SHAPE:-llama-3.1-8b} base / ${DRAFT_SHAPE:-llama-3.2-1b}-wide draft"
    bench bf16-inflated --model "$w/base-bfloat16" --draft "$w/draft-bfloat16" "${timed[@]}" --devices "$gpus" \
        --methods "$methods" --title "inflated pair ($shape), $gpus GPU(s), bfloat16, greedy"
    # The acceptance the inflated run must reproduce (same function, bfloat16 noise only).
    bench bf16-original --model "$base_src" --draft "$draft_src" "${timed[@]}" --devices 1 --methods "$original" \
        --title "original pair, 1 GPU, bfloat16, greedy"
    python3 -m easyspec.bench.compare "$r/bf16-original/bench.json" "$r/bf16-inflated/bench.json" \
        | tee "$r/bf16-compare.md"
    echo "done by $SECONDS s"
    # At most 8 files come back: the tables in one file, everything (JSON, logs, plots) in one archive.
    (cd "$r" && cat inflate.log f32-compare.md f32-original.md f32-inflated.md bf16-original.md bf16-inflated.md \
        bf16-compare.md skipped.txt 2>/dev/null) > "$out/real.md"
    mv "$out/gpus.txt" "$r/" 2>/dev/null
    tar -czf "$out/real.tgz" -C "$out" real && rm -rf "$r"
    ;;
kernels)
    # One GPU. Correctness first: every fused kernel against its reference at real shapes, bitwise decode ==
    # verify, engine greedy equality; then the demo pair end to end in float32 with the fused kernels (the
    # 'equal to vanilla' column must read n/n everywhere); then step latencies with the fused kernels and
    # with the reference formulas (each run also prints the per-layer ablation); then each kernel alone.
    # Everything ends by DEADLINE seconds (default 570); tables last. DEMO=0 leaves out the demo pair.
    k="$out/kernels"
    mkdir -p "$k"
    deadline="${DEADLINE:-570}"
    budget() { # budget CAP RESERVE: at most CAP seconds, leaving RESERVE for the steps after this one
        local left=$((deadline - SECONDS - $2))
        echo $(($1 < left ? $1 : (left > 10 ? left : 10)))
    }
    timeout "$(budget 240 330)" python3 -m pytest tests/test_kernels.py -q --maxfail=10 -p no:cacheprovider \
        -W ignore::DeprecationWarning > "$k/kernel-tests.txt" 2>&1
    echo "kernel tests: exit $? by $SECONDS s"
    pair=easyspec/models/demo
    # DEMO=0 skips the demo pair (when the round-loop checks, `rounds`, run in the same call).
    [ "${DEMO:-1}" = 0 ] || timeout "$(budget 180 240)" python3 -m easyspec bench --device cuda --devices 1 --model $pair/base \
        --draft $pair/draft --prompts $pair/prompts.jsonl --num-prompts 6 --max-new-tokens 64 --repeats 1 \
        --dtype float32 --quiet --title "demo pair, 1 GPU, float32, greedy, fused kernels" --out "$k/demo" \
        --methods vanilla,sd-tp1,ngram,easyspec,easyspec:attention:on-mismatch,sd-tp1:tree=4x4,easyspec:attention:every-round:1:tree=4x4 \
        > "$k/demo.md" 2>"$k/demo-bench.log"
    echo "demo equality: exit $? by $SECONDS s"
    for mode in fused reference; do
        flag=""
        reserve=130
        [ "$mode" = reference ] && flag="--no-fused-kernels" && reserve=20
        timeout "$(budget 130 $reserve)" python3 -m easyspec bench-steps --devices 1 --preset llama-3.1-8b \
            --draft-preset llama-3.2-1b --contexts 512,4096 --no-hf $flag --out "$k/steps-$mode.json" \
            > "$k/steps-$mode.md" 2>>"$k/steps.log"
        echo "bench-steps $mode: exit $? by $SECONDS s"
    done
    # Each fused kernel alone at the 1B and 8B layer shapes: which one holds a layer back from its floor.
    timeout "$(budget 90 5)" python3 -m easyspec.bench.kernels > "$k/kernels.md" 2>>"$k/steps.log"
    echo "kernel bench: exit $? by $SECONDS s"
    (cd "$out" && tar -czf kernels-logs.tgz kernels)
    tail -n 25 "$k/kernel-tests.txt"
    grep -i "warn\|fall" "$k/steps.log" "$k/demo-bench.log" | head -n 5
    cat "$k/demo.md" "$k/kernels.md" "$k/steps-fused.md" "$k/steps-reference.md" 2>/dev/null
    ;;
concurrency)
    # ONE GPU. `easyspec bench --concurrency` on the pair inflated as `real` does it (BASE DRAFT [PROMPTS]; default:
    # the bundled demo pair): each method's one engine serves the prompts at every level, keeping that many
    # requests in flight. Correctness first, in float32 on CHECK_PROMPTS prompts at levels 1 and CHECK_PROMPTS:
    # every 'equal to alone' cell must read n/n (each output at a level equals the method's output served
    # alone) and every 'equal to vanilla' cell too. Then the bfloat16 timings at LEVELS; in bfloat16 a batch
    # may round differently from a single request, so only the float32 check asks for equality. Environment:
    # METHODS, LEVELS (1,2,4,8,16), PROMPTS_N (16: the largest level, each level serves all of them),
    # NEW_TOKENS (128), CHECK_PROMPTS (4; 0 skips the check), CHECK_METHODS (vanilla,sd-tp1,sd-tp1:tree=4x4,
    # easyspec: a chain, a tree, layer-parallel; scripts/check_batch.py checks more on the demo pair),
    # CHECK_S (150: the check's share of the time), DEVICE (cuda; cpu for a dry run), DEADLINE (540 s after the
    # script started). Tables come back in concurrency.md (the timing tables last), everything (JSON, logs) in
    # concurrency.tgz.
    base_src="${2:-easyspec/models/demo/base}" draft_src="${3:-easyspec/models/demo/draft}"
    prompts="${4:-easyspec/models/demo/prompts.jsonl}"
    device="${DEVICE:-cuda}" deadline="${DEADLINE:-540}"
    methods="${METHODS:-vanilla,sd-tp1,ngram,sd-tp1:tree=4x4,easyspec}"
    check_n="${CHECK_PROMPTS:-4}"
    c="$out/concurrency" w="$work/concurrency"
    mkdir -p "$c" "$w"
    dtypes=bfloat16
    [ "$check_n" = 0 ] || dtypes="float32 bfloat16"
    inflate_pair "$base_src" "$draft_src" "$w" $dtypes > "$c/inflate.log" 2>&1
    echo "inflated ($dtypes) by $SECONDS s: $(grep -c "inflated to" "$c/inflate.log") of 4 models"
    on_one_gpu=(--device "$device" --devices 1 --prompts "$prompts" --repeats 1)
    shape="${BASE_SHAPE:-llama-3.1-8b} base / ${DRAFT_SHAPE:-llama-3.2-1b}-wide draft"
    if [ "$check_n" != 0 ]; then
        # At most CHECK_S seconds, so that the timings keep the rest (about 350 s for the five default methods).
        check_end=$((SECONDS + ${CHECK_S:-150}))
        check_levels="$([ "$check_n" -gt 1 ] && echo "1,")$check_n"
        deadline=$((check_end < deadline ? check_end : deadline)) bench_until "$c" f32-check \
            --model "$w/base-float32" --draft "$w/draft-float32" "${on_one_gpu[@]}" --dtype float32 \
            --methods "${CHECK_METHODS:-vanilla,sd-tp1,sd-tp1:tree=4x4,easyspec}" --concurrency "$check_levels" \
            --num-prompts "$check_n" --max-new-tokens 32 --warmup 0 \
            --title "inflated pair ($shape), 1 GPU, float32, greedy: batched against alone"
    fi
    # The main table's runs warm up on 4 prompts; every level warms up on one wave of its own.
    bench_until "$c" bf16-levels --model "$w/base-bfloat16" --draft "$w/draft-bfloat16" "${on_one_gpu[@]}" \
        --dtype bfloat16 --methods "$methods" --concurrency "${LEVELS:-1,2,4,8,16}" \
        --num-prompts "${PROMPTS_N:-16}" --max-new-tokens "${NEW_TOKENS:-128}" --warmup 4 \
        --title "inflated pair ($shape), 1 GPU, bfloat16, greedy, concurrency"
    echo "done by $SECONDS s"
    mv "$out/gpus.txt" "$c/" 2>/dev/null
    (cd "$c" && cat skipped.txt f32-check.md bf16-levels.md 2>/dev/null) > "$out/concurrency.md"
    tar -czf "$out/concurrency.tgz" -C "$out" concurrency && rm -rf "$c"
    cat "$out/concurrency.md"
    ;;
*)
    echo "usage: scripts/bench-gpu.sh full|pair|steps|steps-main|demo|train|real|kernels|concurrency" >&2
    exit 2
    ;;
esac
