#!/usr/bin/env bash
# Shared body of scripts/video/eval.sh and scripts/internvl3/eval.sh (sourced, not run): one lmms-eval run of a
# table's tasks through the plugin (llava.lmms), then the table (llava.lmms.table) and the summary.csv rows.
#
# Environment overrides:
#   METHOD (default script; "none" = unpruned)   BATCH (requests per generate call, default 1)
#   CKPT (hub id or local folder; defaults below)   RESULTS_DIR (default ./results)   PYTHON (default python)
#   NUM_PROCESSES (default: one per GPU in CUDA_VISIBLE_DEVICES, else nvidia-smi's count, else 1)
#   LMMS_CACHE (lmms-eval's response cache, default RESULTS_DIR/lmms/cache: a rerun resumes from it)
#   PARAMS (extra pruning parameters, e.g. "tau=0.1,gamma=0.5")   RUN_TAG (folder name; default METHOD_TOKENS)
#   LIMIT (lmms-eval --limit, for a smoke test)
# Data, offline use and the paper's unpruned rows: EVAL.md, "lmms-eval".

# the LLaVA scripts' preamble: set -euo pipefail, REPO_ROOT on PYTHONPATH, die()
source "$(dirname "${BASH_SOURCE[0]}")/eval_common.sh"

gpu_count() {
    if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
        tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L | grep -c GPU || echo 1
    else
        echo 1
    fi
}

# run_lmms SUITE MODEL CKPT TASKS TOKENS BUDGET UNPRUNED MODEL_ARGS_EXTRA
#   TOKENS: the table's nominal count (per frame / per image); BUDGET: the plugin's per-row budget
run_lmms() {
    local suite=$1 model=$2 ckpt=$3 tasks=$4 tokens=$5 budget=$6 unpruned=$7 extra=$8
    PYTHON=${PYTHON:-python}
    METHOD=${METHOD:-script}
    BATCH=${BATCH:-1}
    RESULTS_DIR=${RESULTS_DIR:-./results}
    NUM_PROCESSES=${NUM_PROCESSES:-$(gpu_count)}
    LMMS_CACHE=${LMMS_CACHE:-$RESULTS_DIR/lmms/cache}
    [[ "$BATCH" =~ ^[1-9][0-9]*$ ]] || die "BATCH must be a positive integer, got '$BATCH'"
    [[ "$NUM_PROCESSES" =~ ^[1-9][0-9]*$ ]] || die "NUM_PROCESSES must be a positive integer, got '$NUM_PROCESSES'"
    "$PYTHON" -c "import lmms_eval" 2>/dev/null || die "lmms-eval is not installed: see EVAL.md, 'lmms-eval'"
    local tag=${RUN_TAG:-${METHOD}_${tokens}}
    local out=$RESULTS_DIR/lmms/$suite/$tag
    local args="pretrained=$ckpt,method=$METHOD"
    [ "$METHOD" = none ] || args+=",budget=$budget"
    [ -n "$extra" ] && args+=",$extra"
    [ -n "${PARAMS:-}" ] && args+=",$PARAMS"
    local limit=()
    [ -n "${LIMIT:-}" ] && limit=(--limit "$LIMIT")
    echo "[$suite] $model $args tasks=$tasks batch=$BATCH processes=$NUM_PROCESSES -> $out" >&2
    "$PYTHON" -m accelerate.commands.launch --num_processes "$NUM_PROCESSES" -m lmms_eval \
        --model "$model" --model_args "$args" --tasks "$tasks" --batch_size "$BATCH" \
        --output_path "$out" --log_samples --use_cache "$LMMS_CACHE" "${limit[@]}"
    local runs=(--run "$METHOD $tokens=$out") reference=()
    local ref_dir=$RESULTS_DIR/lmms/$suite/none_$unpruned
    if [ "$METHOD $tokens" != "none $unpruned" ] && compgen -G "$ref_dir/*/*_results.json" >/dev/null; then
        runs+=(--run "none $unpruned=$ref_dir"); reference=(--reference "none $unpruned")
    elif [ "$METHOD $tokens" = "none $unpruned" ]; then
        reference=(--reference "none $unpruned")
    fi
    "$PYTHON" -m llava.lmms.table --suite "$suite" "${runs[@]}" "${reference[@]}" --out "$out/table.md" \
        --csv "$RESULTS_DIR/summary.csv" --checkpoint "$(basename "$ckpt")"
}
