#!/usr/bin/env bash
# Drafts distilled for a real base on one GPU, and their acceptance on held-out prompts, in one call.
#
#   DEADLINE=460 scripts/distill-gpu.sh BASE   # BASE: SmolLM2-135M-Instruct.Q4_1.gguf, or a Hugging Face folder
#
# The base first writes its text (greedy and sampled replies to the shipped training prompts, kept in
# WORK/data.pt: what it has written when its share of the time ends, greedy replies first), then three
# drafts of one shape (LAYERS of the base's layers, started from them) train on one GPU, each for a share
# of the time left:
#   distilled    KL to the base + next-token loss on the base's text
#   lp-aware     the same, also trained through the layer-parallel forward at N=2 and N=4
#   corpus-only  next-token loss on Python standard-library source, no text or distributions from the base
# then `easyspec acceptance` on the held-out chat prompts (greedy, k=4, categories in turn, as many as its
# time limit allows): each draft sequential and layer-parallel at N=2 and N=4 (emulated on the one GPU:
# acceptance, not speed), and the ngram drafter. The best draft (highest sequential mean accepted length)
# is named. With ENGINE_CHECK=1, `easyspec generate --json` on the first measured prompt then checks that
# the engine (on BASE itself) reports the rounds the acceptance measurement counted and that sd gives
# plain decoding's text. Both run the reference kernels (float32, no Triton compiling inside the budget).
#
# The drafts stay in WORK (default /tmp/easyspec-distill, emptied first): WORK/distilled, WORK/lp-aware,
# WORK/corpus-only (and WORK/base, a GGUF base converted once). Results under $OUT: acceptance.md (the
# table and the best draft), acceptance.json (every row, per category and per prompt), logs.tgz (each
# run's log and distill.json, the acceptance log, engine-check.txt); both acceptance files are rewritten
# after every prompt. Everything ends by DEADLINE seconds after the start (default 460), training cut short
# first (a stopped run still writes its draft). A missing piece (base, gguf package, CUDA) stops it at once
# with one line.
# Knobs (env): DEVICE (cuda; cpu for a dry run), LAYERS (7), SAMPLES (7), GEN_TOKENS (256), GEN_BATCH
# (1024), BATCH (64), SEQ_LEN (512), LR (distill's default), CHAT_PROMPTS / CODE_PROMPTS (training prompt
# files; default the shipped sets), HELD_OUT (the held-out prompt file), PROMPTS_LIMIT (all), MAX_NEW
# (128), ACCEPT_S (seconds kept for acceptance, 120), ENGINE_CHECK (0), DRAFTS (the drafts to train, of
# "distilled lp-aware corpus-only"; fewer drafts get more time each), GGUF_WHEEL (a gguf wheel installed
# first when the package is missing), WORK.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
base="${1:-}"
out="${OUT:-out}"
work="${WORK:-/tmp/easyspec-distill}"
deadline="${DEADLINE:-460}"
device="${DEVICE:-cuda}"
accept_s="${ACCEPT_S:-120}"  # kept for acceptance (its own loading included)
check_s=$(( ${ENGINE_CHECK:-0} ? 50 : 0 ))  # kept for the engine check (ENGINE_CHECK=1)
final_s=10                   # kept for packing the logs
overhead_s=25                # per training run: start, loading the base, export
logs="$work/logs"

die() { echo "error: $*" >&2; exit 2; }
[ -n "$base" ] || die "usage: scripts/distill-gpu.sh BASE (a .gguf file or a model folder)"
[ -e "$base" ] || die "BASE $base does not exist"
case "$work" in /|"$HOME"|.|"") die "WORK=$work: choose a scratch folder of its own";; esac
case "$(realpath "$base")/" in
    "$(realpath -m "$work")"/*) die "BASE $base lies inside WORK=$work, which is emptied first";;
esac
# The drafts asked for (DRAFTS), in order, each with its share of the training time.
declare -A weight=([distilled]=2 [lp-aware]=2 [corpus-only]=1)
names=()
for name in ${DRAFTS:-distilled lp-aware corpus-only}; do
    [ -n "${weight[$name]:-}" ] || die "DRAFTS: unknown draft $name; choose among distilled lp-aware corpus-only"
    names+=("$name")
done
mkdir -p "$out" || die "cannot create OUT=$out"
rm -rf "$work" && mkdir -p "$logs" || die "cannot create WORK=$work"
pack() { tar -czf "$out/logs.tgz" -C "$work" logs 2>/dev/null; }
trap pack EXIT
left() { echo $((deadline - SECONDS)); }

# Fail fast: the packages, the device and the base itself, each in one line. A GGUF base is converted
# once (float32, the same function and tokenizer) so that each step below loads a folder in a second
# rather than parsing and dequantizing the file again; the engine check at the end runs the file itself.
teacher="$base"
if [[ "$base" == *.gguf ]]; then
    if ! python3 -c "import gguf" 2>/dev/null; then
        [ -n "${GGUF_WHEEL:-}" ] && python3 -m pip install --no-deps --no-index --quiet "$GGUF_WHEEL"
        python3 -c "import gguf" 2>/dev/null \
            || die "python3 cannot import gguf (needed for $base): put it on PYTHONPATH or set GGUF_WHEEL"
    fi
    teacher="$work/base"
    timeout 180 python3 -m easyspec convert "$base" "$teacher" > "$logs/convert.log" 2>&1 \
        || die "easyspec convert $base failed: $(tail -n 1 "$logs/convert.log" | sed 's/^error: //')"
fi
timeout 120 python3 - "$teacher" "$device" <<'PY' 2>&1 | tee "$logs/setup.txt"
import sys
import torch
from easyspec.model.loader import load_config, load_tokenizer

base, device = sys.argv[1:]
if device == "cuda" and not torch.cuda.is_available():
    sys.exit("error: no CUDA device is visible; DEVICE=cpu for a dry run")
try:
    cfg, tok = load_config(base), load_tokenizer(base)
except ValueError as err:
    sys.exit(f"error: {err}")
if tok is None:
    sys.exit(f"error: {base} has no tokenizer; distillation needs the base's tokenizer")
gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
print(f"base {base}: {cfg.num_layers} layers, width {cfg.hidden_size}, vocab {cfg.vocab_size}, "
      f"chat template: {tok.chat_template is not None}; torch {torch.__version__} on {gpu}")
PY
[ "${PIPESTATUS[0]}" = 0 ] || exit 2
stdlib=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
[ -d "$stdlib" ] || die "no Python standard library at $stdlib for the corpus-only draft"

common=(--model "$teacher" --device "$device" --layers "${LAYERS:-7}" --batch-size "${BATCH:-64}"
        --seq-len "${SEQ_LEN:-512}" --samples "${SAMPLES:-7}" --gen-tokens "${GEN_TOKENS:-256}"
        --gen-batch "${GEN_BATCH:-1024}")
[ -n "${CHAT_PROMPTS:-}" ] && common+=(--prompts "$CHAT_PROMPTS")
[ -n "${CODE_PROMPTS:-}" ] && common+=(--code-prompts "$CODE_PROMPTS")
[ -n "${LR:-}" ] && common+=(--lr "$LR")
reserve=$((accept_s + check_s + final_s))

# distill NAME LIMIT ARGS...: one `easyspec distill` run, stopped by SIGTERM after LIMIT seconds (a run
# stopped while training writes its draft first); its log in WORK/logs, the progress lines filtered out.
distill() {
    local name=$1 limit=$2
    shift 2
    timeout -s TERM "$limit" python3 -m easyspec distill "${common[@]}" "$@" 2>&1 \
        | tee "$logs/distill-$name.log" | grep --line-buffered -v "^step "
    grep "^step " "$logs/distill-$name.log" | tail -n 1  # the last progress line: steps, tokens/s, losses
}
# train NAME SHARE SHARES_LEFT RUNS_LEFT ARGS...: training minutes are this run's share of the time left.
train() {
    local name=$1 share=$2 shares_left=$3 runs_left=$4
    shift 4
    local budget=$(( ($(left) - reserve - overhead_s * runs_left) * share / shares_left ))
    if [ "$budget" -lt 6 ]; then echo "!! $name: no time left to train (t=${SECONDS}s)"; return; fi
    local minutes
    minutes=$(python3 -c "print(round($budget / 60, 2))")
    echo "== $name: $minutes min of training (t=${SECONDS}s)"
    distill "$name" $((budget + overhead_s + 15)) --out "$work/$name" --minutes "$minutes" "$@"
    if [ -f "$work/$name/distill.json" ]; then
        cp "$work/$name/distill.json" "$logs/distill-$name.json"
    else
        echo "!! $name wrote no draft (see its log)"
    fi
}

# The base's text (for distilled and lp-aware): a time budget of its own, what is written by then kept
# (greedy replies first).
if [[ " ${names[*]} " == *" distilled "* || " ${names[*]} " == *" lp-aware "* ]]; then
    data_s=$(( ($(left) - reserve) * 2 / 5 ))
    echo "== the base's text, at most ${data_s}s (t=${SECONDS}s)"
    if [ "$data_s" -gt $((overhead_s + 10)) ]; then
        distill data $((data_s + 20)) --data-only --data "$work/data.pt" \
            --gen-minutes "$(python3 -c "print(round(($data_s - $overhead_s) / 60, 2))")"
    fi
    [ -f "$work/data.pt" ] || echo "!! the base wrote no text in time: distilled and lp-aware skipped"
fi
for i in "${!names[@]}"; do
    name=${names[$i]} weights_left=0
    for later in "${names[@]:$i}"; do weights_left=$((weights_left + weight[$later])); done
    case $name in
        distilled) extra=(--data "$work/data.pt");;
        lp-aware) extra=(--data "$work/data.pt" --layer-parallel 2,4);;
        corpus-only) extra=(--corpus-only --corpus "$stdlib" --corpus-max-mb 8);;
    esac
    if [ "$name" != corpus-only ] && [ ! -f "$work/data.pt" ]; then continue; fi
    train "$name" "${weight[$name]}" "$weights_left" $(( ${#names[@]} - i )) "${extra[@]}"
done

drafts=()
for name in distilled lp-aware corpus-only; do
    [ -f "$work/$name/config.json" ] && drafts+=(--draft "$name=$work/$name")
done
held_out="${HELD_OUT:-easyspec/distill/prompts/heldout.jsonl}"
limit=()
[ -n "${PROMPTS_LIMIT:-}" ] && limit=(--limit "$PROMPTS_LIMIT")
budget=$(( $(left) - check_s - final_s ))
echo "== acceptance, ${budget}s (t=${SECONDS}s)"
if [ "$budget" -gt 10 ]; then
    timeout -s KILL $((budget + 20)) python3 -m easyspec acceptance --model "$teacher" "${drafts[@]}" --ngram \
        --layer-parallel 2,4 --device "$device" --prompts "$held_out" --max-new-tokens "${MAX_NEW:-128}" \
        --gen-batch 128 --no-fused-kernels --time-limit "$budget" "${limit[@]}" --out "$out/acceptance.json" \
        --table "$out/acceptance.md" > /dev/null 2>"$logs/acceptance.log"
    tail -n 2 "$logs/acceptance.log"
fi
if [ ! -s "$out/acceptance.json" ]; then
    echo "acceptance measured no prompt in time (t=${SECONDS}s); see logs.tgz" | tee -a "$out/acceptance.md"
    exit 1
fi
python3 - "$out/acceptance.json" "$work" "$base" <<'PY' | tee -a "$out/acceptance.md"
import json, sys
acc, work, base = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3]
rows = [r for r in acc["rows"] if r["method"] == "sd"]
if rows and acc["settings"]["num_prompts"]:
    best = max(rows, key=lambda r: r["mean_accepted_length"])
    print(f"\nbest draft: {work}/{best['draft']} (sequential mean accepted length {best['mean_accepted_length']}, "
          f"{acc['settings']['num_prompts']} held-out prompts)")
    print(f"next: GPUS=1 scripts/bench-gpu.sh real {base} {work}/{best['draft']} "
          f"{acc['settings']['prompts']}")
else:
    print("\nno best draft: no draft was written, or no prompt measured in time")
PY

# The engine itself on the first measured prompt: plain decoding and sd with the best draft, float32 greedy.
best=$(sed -n 's/^best draft: \([^ ]*\) .*/\1/p' "$out/acceptance.md")
if [ -n "$best" ] && [ "$check_s" -gt 0 ] && [ "$(left)" -gt $((check_s - 5)) ]; then
    echo "== engine check (t=${SECONDS}s)"
    prompt=$(python3 - "$out/acceptance.json" "$held_out" <<'PY'
import json, sys
qid = json.load(open(sys.argv[1]))["rows"][0]["per_prompt"][0]["question_id"]
print(next(p["turns"][0] for p in map(json.loads, open(sys.argv[2])) if p["question_id"] == qid))
PY
)
    each=$(( ($(left) - final_s) / 2 ))
    for method in vanilla sd; do
        draft=()
        [ $method = sd ] && draft=(--draft "$best")
        timeout -s KILL "$each" python3 -m easyspec generate --model "$base" "${draft[@]}" \
            --method $method --device "$device" --no-fused-kernels --max-new-tokens "${MAX_NEW:-128}" \
            --prompt "$prompt" --json \
            > "$work/$method.json" 2>"$logs/engine-$method.log"
    done
    python3 - "$work" "$out/acceptance.json" "$(basename "$best")" <<'PY' 2>&1 | tee "$logs/engine-check.txt"
import json, sys
work, acc, name = sys.argv[1], json.load(open(sys.argv[2])), sys.argv[3]
try:
    plain, sd = (json.load(open(f"{work}/{m}.json")) for m in ("vanilla", "sd"))
except (OSError, ValueError):
    sys.exit("engine check: a generate run did not finish in time (see engine-*.log)")
measured = next(r for r in acc["rows"] if r["label"] == f"{name} sd")["per_prompt"][0]
engine = {"rounds": sd["stats"]["rounds"], "accepted": sd["stats"]["accepted"], "generated": len(sd["token_ids"])}
print(f"engine sd == plain decoding: {sd['token_ids'] == plain['token_ids']}")
print(f"engine sd on held-out prompt {measured['question_id']}: {engine}; acceptance measurement: "
      f"{ {k: measured[k] for k in engine} }; equal: {all(engine[k] == measured[k] for k in engine)}")
PY
fi
echo "== done in ${SECONDS}s"
cat "$out/acceptance.md"
