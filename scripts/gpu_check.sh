#!/usr/bin/env bash
# One-command GPU check: every figure of this project that needs a CUDA GPU, measured in under 8 minutes on a
# machine with one CUDA GPU and no network (random weights at real shapes, nothing downloaded).
#
#   bash scripts/gpu_check.sh OUT_DIR
#
# Steps (each under `timeout`, all within GPU_CHECK_BUDGET_S seconds, default 450; a step that would not fit
# is skipped and reported):
#   cuda_tests        the CUDA tests (pytest -k cuda on tests/test_fused.py, tests/test_select.py)
#   bench_torch       script_prune.bench --device cuda at the paper's shapes (one LLaVA-1.5 image: 1x576x4096,
#                     k 64; five NeXT crops: 5x576x4096; 64 LLaVA-Video frames: 64x169x3584): the validating
#                     call with the torch greedy walk, float32
#   bench_fused       the same with the fused Triton greedy walk, validate=False (no host sync), float16
#   efficiency_sdpa   llava.eval.efficiency at LLaVA-NeXT-7B shape, random weights, float16, all 32 layers:
#                     prefill 2880 vs 320 visual tokens, decode ms/token, KV cache, peak memory per method
#   efficiency_flash  the same with flash_attention_2 (only when flash_attn is importable)
#   toy_throughput    llava.toy.throughput on cuda: questions/s of the toy model at batch 1, 8, 32
# then scripts/gpu_check_report.py writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md (logs: OUT_DIR/*.log).
#
# Without CUDA (or with GPU_CHECK_DRY_RUN=1) it is a dry run: it prints the commands it would run and exits 0.
# Environment: PYTHON (default python), GPU_CHECK_BUDGET_S (default 450), GPU_CHECK_DRY_RUN (1 = dry run).
set -uo pipefail

if [ $# -ne 1 ] || [ -z "$1" ]; then
    echo "usage: bash scripts/gpu_check.sh OUT_DIR" >&2
    exit 2
fi
OUT=$1
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PYTHON=${PYTHON:-python}
BUDGET_S=${GPU_CHECK_BUDGET_S:-450}
[[ "$BUDGET_S" =~ ^[1-9][0-9]*$ ]] || { echo "error: GPU_CHECK_BUDGET_S must be a positive integer (seconds), got '$BUDGET_S'" >&2; exit 2; }
REPORT_RESERVE_S=15   # kept for the report

# one interpreter start for both probes: "<cuda available> <flash_attn importable>", 0 or 1 each
read -r HAVE_CUDA HAVE_FLASH < <("$PYTHON" -c 'import importlib.util, torch
print(int(torch.cuda.is_available()), int(importlib.util.find_spec("flash_attn") is not None))' 2>/dev/null || echo "0 0")
DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
if [ "$DRY_RUN" != 1 ] && [ "${HAVE_CUDA:-0}" != 1 ]; then
    DRY_RUN=1
    echo "[gpu_check] no CUDA device: dry run (nothing is measured, nothing written). On a CUDA machine it runs:"
fi

# ----------------------------------------------------------------------------- the command lines
# The paper's shapes in script_prune.bench: case 0 = (1, 576, 4096, 64), 2 = (5, 576, 4096, 64), 3 = (64, 169, 3584, 16).
BENCH_COMMON=(-m script_prune.bench --device cuda --methods script --cases 0 2 3 --min-repeats 10 --budget-s 1)

# The efficiency tool: its command line lives here only.
# $1 = attention implementation (sdpa | flash_attention_2), $2 = JSON file.
efficiency_cmd() {
    EFF_CMD=("$PYTHON" -m llava.eval.efficiency --random-weights --shape llava-v1.6-vicuna-7b --device cuda
             --dtype float16 --methods script,cdpruner,divprune,visionzip,trim,fastv,sparsevlm,pdrop --budgets 64
             --param "pdrop:layers=[2,6,12]" --repeats 3 --warmup 1 --json "$2")
    if [ -z "${EFF_HELP+set}" ]; then EFF_HELP=$("$PYTHON" -m llava.eval.efficiency --help 2>/dev/null); fi
    if grep -q -- "--attn-implementation" <<< "$EFF_HELP"; then
        EFF_CMD+=(--attn-implementation "$1")
        EFF_ATTN_NOTE=""
    elif [ "$1" = sdpa ]; then
        EFF_ATTN_NOTE=""          # the tool builds its models with sdpa
    else
        EFF_ATTN_NOTE="the efficiency tool has no --attn-implementation flag (it always runs sdpa)"
    fi
}

# ----------------------------------------------------------------------------- running a step
START=$SECONDS
STEPS_TSV=$OUT/steps.tsv
if [ "$DRY_RUN" != 1 ]; then
    mkdir -p "$OUT" || exit 1
    printf 'step\tstatus\trc\tseconds\tlog\tnote\n' > "$STEPS_TSV"
fi

# show_cmd ARGS...: the command as one line to paste (arguments with spaces or quotes single-quoted)
show_cmd() {
    local a line=""
    for a in "$@"; do
        if [[ "$a" =~ ^[A-Za-z0-9_./:,=+-]+$ ]]; then line+=" $a"; else line+=" '${a//\'/\'\\\'\'}'"; fi
    done
    echo "${line# }"
}

# step NAME TIMEOUT_S NOTE -- CMD...: run CMD under timeout (capped by what is left of the budget), log to
# OUT/NAME.log, one line in OUT/steps.tsv; a NOTE makes the step a skip (the note says why). Dry run: print it.
step() {
    local name=$1 limit=$2 note=$3; shift 4
    if [ "$DRY_RUN" = 1 ]; then
        echo "  [$name] timeout ${limit}s: $(show_cmd "$@")"
        [ -z "$note" ] || echo "      ($note)"
        return 0
    fi
    local left=$((BUDGET_S - REPORT_RESERVE_S - (SECONDS - START)))
    if [ -n "$note" ]; then
        printf '%s\tskipped\t\t0\t\t%s\n' "$name" "$note" >> "$STEPS_TSV"
        echo "[gpu_check] $name: skipped ($note)" >&2
        return 0
    fi
    if [ "$left" -lt 10 ]; then
        printf '%s\tskipped\t\t0\t\tno time left in the %ss budget\n' "$name" "$BUDGET_S" >> "$STEPS_TSV"
        echo "[gpu_check] $name: skipped (no time left in the ${BUDGET_S}s budget)" >&2
        return 0
    fi
    [ "$limit" -le "$left" ] || limit=$left
    echo "[gpu_check] $name (timeout ${limit}s): $*" >&2
    local t0=$SECONDS rc status
    timeout --kill-after=5 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    case $rc in 0) status=ok ;; 124|137) status=timeout ;; *) status=failed ;; esac
    printf '%s\t%s\t%s\t%s\t%s\t\n' "$name" "$status" "$rc" "$((SECONDS - t0))" "$name.log" >> "$STEPS_TSV"
    echo "[gpu_check] $name: $status (rc $rc, $((SECONDS - t0)) s)" >&2
}

FLASH_NOTE=""
if [ "$DRY_RUN" = 1 ]; then
    FLASH_NOTE="runs only when flash_attn is importable; here it is $([ "$HAVE_FLASH" = 1 ] || echo "not ")installed"
elif [ "$HAVE_FLASH" != 1 ]; then
    FLASH_NOTE="flash_attn is not installed"
fi

step env 30 "" -- "$PYTHON" "$REPO_ROOT/scripts/gpu_check_report.py" --env "$OUT/env.json"
step cuda_tests 90 "" -- "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_fused.py tests/test_select.py -k cuda \
    --junitxml "$OUT/cuda_tests.xml"
step bench_torch 45 "" -- "$PYTHON" "${BENCH_COMMON[@]}" --greedy torch --dtype float32 --json "$OUT/bench_torch.json"
step bench_fused 45 "" -- "$PYTHON" "${BENCH_COMMON[@]}" --greedy auto --trusted --dtype float16 --json "$OUT/bench_fused.json"
efficiency_cmd sdpa "$OUT/efficiency_sdpa.json"
step efficiency_sdpa 150 "$EFF_ATTN_NOTE" -- "${EFF_CMD[@]}"
step toy_throughput 60 "" -- "$PYTHON" -m llava.toy.throughput --device cuda --dtype float16 \
    --methods script,divprune,fastv --batch-sizes 1,8,32 --questions 64 --repeats 2 \
    --data "$OUT/toy_data" --json "$OUT/toy_throughput.json"
efficiency_cmd flash_attention_2 "$OUT/efficiency_flash.json"
if [ -n "$EFF_ATTN_NOTE" ]; then FLASH_NOTE="${FLASH_NOTE:+$FLASH_NOTE; }$EFF_ATTN_NOTE"; fi
step efficiency_flash 150 "$FLASH_NOTE" -- "${EFF_CMD[@]}"

if [ "$DRY_RUN" = 1 ]; then
    echo "  [report] $(show_cmd "$PYTHON" "$REPO_ROOT/scripts/gpu_check_report.py" "$OUT")"
    echo "[gpu_check] it would write $OUT/gpu_check.json and $OUT/gpu_check.md (budget ${BUDGET_S}s in all)."
    exit 0
fi
"$PYTHON" "$REPO_ROOT/scripts/gpu_check_report.py" "$OUT"
rc=$?   # 1: a step failed or timed out (the report is written all the same)
echo "[gpu_check] $((SECONDS - START)) s; table: $OUT/gpu_check.md, data: $OUT/gpu_check.json" >&2
exit $rc
