#!/usr/bin/env bash
# Table 10: InternVL3-8B at 896 x 896 (2 x 2 tiles + thumbnail = 5 x 256 = 1,280 tokens) on AI2D, TextVQA,
# ChartQA, OCRBench, HallusionBench, MME, MMBench-EN / CN, through lmms-eval and the plugin (llava.lmms).
# Usage: [METHOD=script] [BATCH=1] [CUDA_VISIBLE_DEVICES=0,1,...] bash scripts/internvl3/eval.sh TOKENS
#   TOKENS: visual tokens per image, 256 or 128 as the paper (TOKENS / 5 per tile: 51 and 25, i.e. 255 and 125
#   in all); METHOD=none ... 1280 is the unpruned row.
# Other settings and the data: scripts/lib/lmms_eval.sh and EVAL.md ("lmms-eval").
source "$(dirname "${BASH_SOURCE[0]}")/../lib/lmms_eval.sh"
if [ $# -ne 1 ] || ! [[ "$1" =~ ^[1-9][0-9]*$ ]] || [ "$1" -lt 5 ]; then
    echo "usage: bash scripts/internvl3/eval.sh TOKENS   (>= 5, e.g. 256; METHOD=none with 1280 = unpruned)" >&2
    exit 2
fi
run_lmms internvl3 script_internvl "${CKPT:-OpenGVLab/InternVL3-8B-hf}" \
    ai2d,textvqa_val,chartqa,ocrbench,hallusion_bench_image,mme,mmbench_en_dev,mmbench_cn_dev \
    "$1" "$(( $1 / 5 ))" 1280 "image_size=896"
