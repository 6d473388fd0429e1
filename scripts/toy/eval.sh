#!/usr/bin/env bash
# Accuracy of every script_prune method on the toy test split, at 100%, 1/3, 1/9, 1/18 and 1/36 of the
# 144 visual tokens (144, 48, 16, 8, 4), through llava.eval.model_vqa_loader + the POPE / exact-match scorers.
# Prints the table in the paper's layout and writes toy_bench/results.json. CPU, no download.
#
#   [BATCH=N] bash scripts/toy/eval.sh [extra llava.toy.bench flags, e.g. --methods script,divprune --limit 10]
# BATCH: questions per generate call (default 1; the answers do not depend on it).
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1
PYTHON="${PYTHON:-python}"
OUT="${TOY_BENCH_OUT:-toy_bench}"
BATCH="${BATCH:-1}"
[[ "$BATCH" =~ ^[1-9][0-9]*$ ]] || { echo "error: BATCH must be a positive integer, got '$BATCH'" >&2; exit 1; }
"$PYTHON" -m llava.toy.bench \
    --model-path llava/toy/checkpoint \
    --out "$OUT" \
    --fractions 1,1/3,1/9,1/18,1/36 \
    --batch-size "$BATCH" \
    "$@"
