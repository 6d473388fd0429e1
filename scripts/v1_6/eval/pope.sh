#!/usr/bin/env bash
# pope on LLaVA-NeXT (1.6). Usage: [CUDA_VISIBLE_DEVICES=0,1,...] bash scripts/v1_6/eval/pope.sh BUDGET [extra args]
# BUDGET: visual tokens kept per crop (576 = unpruned; nominal total = BUDGET x 5). Environment overrides and data layout: EVAL.md.
source "$(dirname "${BASH_SOURCE[0]}")/../../lib/eval_common.sh"
run_benchmark v1_6 pope "$@"
