#!/usr/bin/env bash
# Train easyspec's demo base/draft pair on a GPU machine, then measure its greedy acceptance.
#
#   scripts/train-pair.sh [OUT_DIR] [extra train-pair options...]
#
# OUT_DIR defaults to $OUT (the device machine's result folder), else out/demo-pair.
# Environment: PAIR (demo), MINUTES (training minutes per model; 1.1 puts the whole
# demo run near 3 minutes on one H100), STEPS (instead of MINUTES: repeat a run from
# the steps its training.json recorded), SEED (0), DEVICES (cuda:0; give two, e.g.
# cuda:0,cuda:1, to train base and draft at the same time), SITE_PACKAGES (1: add the
# installed packages' sources to the standard library's; 0: stdlib only).
# Needs no network: the corpus is the Python source already on the machine.
set -euo pipefail

cd "$(dirname "$0")/.."
out="${1:-${OUT:-out/demo-pair}}"
shift $(( $# > 0 ? 1 : 0 ))
pair="${PAIR:-demo}"
budget=(--minutes "${MINUTES:-1.1}")
if [[ -n "${STEPS:-}" ]]; then
    budget=(--steps "$STEPS")
fi
devices="${DEVICES:-cuda:0}"

site=()
if [[ "${SITE_PACKAGES:-1}" == 1 ]]; then
    site=(--site-packages)
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

python3 -m easyspec.zoo train-pair --pair "$pair" --out "$out" "${budget[@]}" \
    --seed "${SEED:-0}" --devices "$devices" "${site[@]}" "$@"
python3 -m easyspec.zoo eval-pair "$out" --k 4 --max-new-tokens 128 --device "${devices%%,*}" \
    | tee "$out/acceptance.json"
du -sh "$out/base" "$out/draft"
