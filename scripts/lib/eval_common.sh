#!/usr/bin/env bash
# Shared body of scripts/v1_5/eval/*.sh and scripts/v1_6/eval/*.sh (sourced, not run).
#
#   bash scripts/v1_5/eval/<benchmark>.sh BUDGET [extra args for the answer generator]
#
# BUDGET = visual tokens kept per image row (LLaVA-1.5) or per crop (LLaVA-NeXT, 5 crops: the results are
# named by the nominal total BUDGET x 5). Environment overrides:
#   CKPT_DIR (default liuhaotian)  CKPT (default llava-v1.5-7b / llava-v1.6-vicuna-7b)  -> model CKPT_DIR/CKPT
#   DATA_DIR (default ./playground/data/eval)   METHOD (default script; "none" = unpruned)
#   CHUNKS (number of shards; default: one per GPU in CUDA_VISIBLE_DEVICES, else 1)
#   RESULTS_DIR (default ./results; rows go to RESULTS_DIR/summary.csv)  PYTHON (default python)
#   CONV_MODE (default vicuna_v1)
#   BATCH (questions per generate call, default 1; greedy answers do not depend on it, see EVAL.md)
#   RUN_TAG (results folder name; default METHOD_NOMINAL; set it when you change any other setting, e.g.
#            --pruning-param, --no-negate-relevance, --max_new_tokens: an answers file holds one run, resuming it
#            with other settings is refused; a set RUN_TAG also gets its own row in the summarize table)
# Extra args reach the generator, e.g. --on-image-error record. See EVAL.md for the data layout, the run
# fingerprint, the lock and the merge.

set -euo pipefail

EVAL_LIB_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$EVAL_LIB_DIR/../.." && pwd)"
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"

die() { echo "error: $*" >&2; exit 1; }

# eval_setup VERSION BENCH BUDGET [extra...]
eval_setup() {
    VERSION=$1; BENCH=$2; shift 2
    if [ $# -lt 1 ] || ! [[ "$1" =~ ^[1-9][0-9]*$ ]]; then
        echo "usage: bash scripts/$VERSION/eval/$BENCH.sh BUDGET [extra args]   (BUDGET: visual tokens per image row / crop, e.g. 64)" >&2
        exit 2
    fi
    BUDGET=$1; shift
    EXTRA_ARGS=("$@")
    local a
    for a in "${EXTRA_ARGS[@]}"; do   # sharding is the script's: an extra --num-chunks would answer only part of the questions
        case "$a" in
            --num-chunks|--num-chunks=*|--chunk-idx|--chunk-idx=*) die "$a is set by the script; use CHUNKS=N instead (see EVAL.md)" ;;
            --batch-size|--batch-size=*) die "$a is set by the script; use BATCH=N instead (see EVAL.md)" ;;
        esac
    done
    PYTHON=${PYTHON:-python}
    DATA_DIR=${DATA_DIR:-./playground/data/eval}
    METHOD=${METHOD:-script}
    CKPT_DIR=${CKPT_DIR:-liuhaotian}
    CONV_MODE=${CONV_MODE:-vicuna_v1}
    RESULTS_DIR=${RESULTS_DIR:-./results}
    BATCH=${BATCH:-1}
    [[ "$BATCH" =~ ^[1-9][0-9]*$ ]] || die "BATCH must be a positive integer (questions per generate call), got '$BATCH'"
    SUMMARY_CSV=$RESULTS_DIR/summary.csv
    case "$VERSION" in
        v1_5) CKPT=${CKPT:-llava-v1.5-7b}; NOMINAL=$BUDGET ;;
        v1_6) CKPT=${CKPT:-llava-v1.6-vicuna-7b}; NOMINAL=$((BUDGET * 5)) ;;
        *) die "unknown version $VERSION" ;;
    esac
    MODEL_PATH=$CKPT_DIR/$CKPT
    TAG=${RUN_TAG:-${METHOD}_${NOMINAL}}
    GEN_ARGS=(--model-path "$MODEL_PATH" --conv-mode "$CONV_MODE" --temperature 0
              --visual-token-num "$BUDGET" --pruning-method "$METHOD" --batch-size "$BATCH")
    echo "[$BENCH] checkpoint=$MODEL_PATH method=$METHOD budget=$BUDGET per row (nominal $NOMINAL) batch=$BATCH data=$DATA_DIR" >&2
}

# require_data PATH...: one clear message per missing file/folder, then exit
require_data() {
    local missing=() p
    for p in "$@"; do [ -e "$p" ] || missing+=("$p"); done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "error: missing $BENCH data: ${missing[*]} -- see EVAL.md for the download and the folder layout under DATA_DIR=$DATA_DIR" >&2
        exit 1
    fi
}

# Workers die with their driver: on TERM/INT/HUP the trap stops them at once, and each worker also ends
# itself when this shell is gone however it died (LLAVA_EVAL_DRIVER_PID, watched by llava.eval.common).
WORKER_PIDS=()
stop_workers() {
    local pid
    for pid in "${WORKER_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    echo "error: interrupted: stopped ${#WORKER_PIDS[@]} answer generator(s) (rerun to resume)" >&2
    exit 143
}

# run_sharded MODULE OUTDIR [module args...]: one process per shard, then merge in question order -> $MERGED
run_sharded() {
    local module=$1 outdir=$2; shift 2
    local gpus=()
    if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then IFS=',' read -ra gpus <<< "$CUDA_VISIBLE_DEVICES"; fi
    local chunks=${CHUNKS:-${#gpus[@]}}
    [ "$chunks" = 0 ] && chunks=1
    [[ "$chunks" =~ ^[1-9][0-9]*$ ]] || die "CHUNKS must be a positive integer, got '$chunks'"
    mkdir -p "$outdir"
    export LLAVA_EVAL_DRIVER_PID=$$
    trap stop_workers TERM INT HUP
    WORKER_PIDS=()
    local files=() i
    for ((i = 0; i < chunks; i++)); do
        files+=("$outdir/${chunks}_${i}.jsonl")
        if [ ${#gpus[@]} -gt 0 ]; then
            CUDA_VISIBLE_DEVICES=${gpus[$((i % ${#gpus[@]}))]} "$PYTHON" -m "$module" "$@" "${GEN_ARGS[@]}" \
                --answers-file "${files[$i]}" --num-chunks "$chunks" --chunk-idx "$i" "${EXTRA_ARGS[@]}" &
        else
            "$PYTHON" -m "$module" "$@" "${GEN_ARGS[@]}" \
                --answers-file "${files[$i]}" --num-chunks "$chunks" --chunk-idx "$i" "${EXTRA_ARGS[@]}" &
        fi
        WORKER_PIDS+=($!)
    done
    local failed=0 pid
    for pid in "${WORKER_PIDS[@]}"; do wait "$pid" || failed=1; done
    trap - TERM INT HUP
    WORKER_PIDS=()
    [ $failed -eq 0 ] || die "answer generation failed in at least one of $chunks chunks (rerun to resume)"
    MERGED=$outdir/merge.jsonl
    # the generator itself merges: same question set and run fingerprint, question order, nothing missing or extra
    "$PYTHON" -m "$module" "$@" "${GEN_ARGS[@]}" "${EXTRA_ARGS[@]}" --answers-file "$MERGED" --merge-from "${files[@]}" \
        || die "merging the $chunks chunk file(s) of $outdir failed"
    echo "[$BENCH] merged $chunks chunk(s) into $MERGED" >&2
}

# json_get FILE KEY: print a top-level value of a metrics json
json_get() { "$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"; }

# append_summary METRIC VALUE [METRICS_JSON]: the row of this run in $SUMMARY_CSV (a rerun of the same run
# fingerprint, read from $MERGED, replaces its row; the scorer's answered/questions/subset come from METRICS_JSON)
append_summary() {
    local extra=()
    [ $# -ge 3 ] && extra+=(--metrics-json "$3")
    [ -n "${RUN_TAG:-}" ] && extra+=(--run "$RUN_TAG")
    "$PYTHON" -m llava.eval.summarize add --csv "$SUMMARY_CSV" --benchmark "$BENCH" --checkpoint "$CKPT" \
        --method "$METHOD" --budget "$NOMINAL" --metric "$1" --value "$2" --answers-file "$MERGED" "${extra[@]}" >&2
}

# ----------------------------------------------------------------------------- benchmarks
bench_gqa() {
    local d=$DATA_DIR/gqa
    require_data "$d/llava_gqa_testdev_balanced.jsonl" "$d/data/images" "$d/data/testdev_balanced_questions.json"
    local out=$d/answers/llava_gqa_testdev_balanced/$CKPT/$TAG
    run_sharded llava.eval.model_vqa_loader "$out" --question-file "$d/llava_gqa_testdev_balanced.jsonl" --image-folder "$d/data/images"
    "$PYTHON" -m llava.eval.eval_gqa --answers-file "$MERGED" --predictions-out "$out/testdev_balanced_predictions.json" \
        --questions-file "$d/data/testdev_balanced_questions.json" --json "$out/metrics.json"
    append_summary accuracy "$(json_get "$out/metrics.json" accuracy)" "$out/metrics.json"
}

_bench_mmbench() {  # $1 = folder, $2 = tsv name, $3 = lang
    local d=$DATA_DIR/$1
    require_data "$d/$2"
    local split=${2%.tsv}
    local out=$d/answers/$split/$CKPT/$TAG
    run_sharded llava.eval.model_vqa_mmbench "$out" --question-file "$d/$2" --single-pred-prompt --lang "$3"
    local upload=$d/answers_upload/$split/$CKPT/$TAG.xlsx
    "$PYTHON" -m llava.eval.convert_mmbench_for_submission --annotation-file "$d/$2" --result-file "$MERGED" \
        --out "$upload" --json "$out/metrics.json"
    if grep -q accuracy_local "$out/metrics.json"; then
        append_summary accuracy_local "$(json_get "$out/metrics.json" accuracy_local)" "$out/metrics.json"
    else
        append_summary submission "$upload"
    fi
    echo "[$BENCH] submit $upload to the MMBench evaluation server (see EVAL.md)" >&2
}
bench_mmbench() { _bench_mmbench mmbench mmbench_dev_20230712.tsv en; }
bench_mmbench_cn() { _bench_mmbench mmbench_cn mmbench_dev_cn_20231003.tsv cn; }

bench_mme() {
    local d=$DATA_DIR/MME
    require_data "$d/llava_mme.jsonl" "$d/MME_Benchmark_release_version"
    local out=$d/answers/$CKPT/$TAG
    run_sharded llava.eval.model_vqa_loader "$out" --question-file "$d/llava_mme.jsonl" --image-folder "$d/MME_Benchmark_release_version"
    "$PYTHON" -m llava.eval.eval_mme --answers-file "$MERGED" --gt-dir "$d/MME_Benchmark_release_version" \
        --results-dir "$d/eval_tool/answers/$CKPT/$TAG" --json "$out/metrics.json"
    append_summary perception "$(json_get "$out/metrics.json" perception)" "$out/metrics.json"
}

bench_mmvet() {
    local d=$DATA_DIR/mm-vet
    require_data "$d/llava-mm-vet.jsonl" "$d/images"
    local out=$d/answers/$CKPT/$TAG
    run_sharded llava.eval.model_vqa "$out" --question-file "$d/llava-mm-vet.jsonl" --image-folder "$d/images"
    local upload=$d/results/$CKPT/$TAG.json
    "$PYTHON" -m llava.eval.convert_mmvet_for_eval --src "$MERGED" --question-file "$d/llava-mm-vet.jsonl" --dst "$upload"
    append_summary submission "$upload"
    echo "[$BENCH] grade $upload with the official MM-Vet evaluator (see EVAL.md)" >&2
}

bench_pope() {
    local d=$DATA_DIR/pope
    require_data "$d/llava_pope_test.jsonl" "$d/val2014" "$d/coco"
    local out=$d/answers/$CKPT/$TAG
    run_sharded llava.eval.model_vqa_loader "$out" --question-file "$d/llava_pope_test.jsonl" --image-folder "$d/val2014"
    "$PYTHON" -m llava.eval.eval_pope --annotation-dir "$d/coco" --question-file "$d/llava_pope_test.jsonl" \
        --result-file "$MERGED" --json "$out/metrics.json"
    append_summary average_f1 "$(json_get "$out/metrics.json" average_f1)" "$out/metrics.json"
}

bench_sqa() {
    local d=$DATA_DIR/scienceqa
    require_data "$d/llava_test_CQM-A.json" "$d/images/test" "$d/problems.json" "$d/pid_splits.json"
    local out=$d/answers/$CKPT/$TAG
    run_sharded llava.eval.model_vqa_science "$out" --question-file "$d/llava_test_CQM-A.json" \
        --image-folder "$d/images/test" --single-pred-prompt
    "$PYTHON" -m llava.eval.eval_science_qa --base-dir "$d" --result-file "$MERGED" --output-file "$out/output.jsonl" \
        --output-result "$out/result.json" --json "$out/metrics.json"
    append_summary img_accuracy "$(json_get "$out/metrics.json" img_accuracy)" "$out/metrics.json"
}

bench_textvqa() {
    local d=$DATA_DIR/textvqa
    require_data "$d/llava_textvqa_val_v051_ocr.jsonl" "$d/train_images" "$d/TextVQA_0.5.1_val.json"
    local out=$d/answers/$CKPT/$TAG
    run_sharded llava.eval.model_vqa_loader "$out" --question-file "$d/llava_textvqa_val_v051_ocr.jsonl" --image-folder "$d/train_images"
    "$PYTHON" -m llava.eval.eval_textvqa --annotation-file "$d/TextVQA_0.5.1_val.json" --result-file "$MERGED" --json "$out/metrics.json"
    append_summary accuracy "$(json_get "$out/metrics.json" accuracy)" "$out/metrics.json"
}

bench_vizwiz() {
    local d=$DATA_DIR/vizwiz
    require_data "$d/llava_test.jsonl" "$d/test"
    local out=$d/answers/$CKPT/$TAG
    run_sharded llava.eval.model_vqa_loader "$out" --question-file "$d/llava_test.jsonl" --image-folder "$d/test"
    local upload=$d/answers_upload/$CKPT/$TAG.json
    "$PYTHON" -m llava.eval.convert_vizwiz_for_submission --question-file "$d/llava_test.jsonl" --answers-file "$MERGED" --out "$upload"
    append_summary submission "$upload"
    echo "[$BENCH] submit $upload to the VizWiz EvalAI server (see EVAL.md)" >&2
}

bench_vqav2() {
    local d=$DATA_DIR/vqav2 split=llava_vqav2_mscoco_test-dev2015
    require_data "$d/$split.jsonl" "$d/llava_vqav2_mscoco_test2015.jsonl" "$d/test2015"
    local out=$d/answers/$split/$CKPT/$TAG
    run_sharded llava.eval.model_vqa_loader "$out" --question-file "$d/$split.jsonl" --image-folder "$d/test2015"
    local upload=$d/answers_upload/$split/$CKPT/$TAG.json
    "$PYTHON" -m llava.eval.convert_vqav2_for_submission --answers-file "$MERGED" --question-file "$d/$split.jsonl" \
        --test-file "$d/llava_vqav2_mscoco_test2015.jsonl" --out "$upload"
    append_summary submission "$upload"
    echo "[$BENCH] submit $upload to the VQAv2 EvalAI server (see EVAL.md)" >&2
}

# run_benchmark VERSION BENCH BUDGET [extra...]
run_benchmark() {
    eval_setup "$@"
    "bench_$BENCH"
}
