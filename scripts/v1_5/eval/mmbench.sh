#!/usr/bin/env bash
# mmbench on LLaVA-1.5. Usage: [CUDA_VISIBLE_DEVICES=0,1,...] bash scripts/v1_5/eval/mmbench.sh BUDGET [extra args]
# BUDGET: visual tokens kept per image (576 = unpruned). Environment overrides and data layout: EVAL.md.
source "$(dirname "${BASH_SOURCE[0]}")/../../lib/eval_common.sh"
run_benchmark v1_5 mmbench "$@"
