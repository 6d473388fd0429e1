#!/usr/bin/env bash
# Table 4: LLaVA-Video-7B, 64 frames, on MLVU (m-avg), MVBench, LongVideoBench val and Video-MME w/o subtitles,
# through lmms-eval and the plugin (llava.lmms).
# Usage: [METHOD=script] [BATCH=1] [CUDA_VISIBLE_DEVICES=0,1,...] bash scripts/video/eval.sh TOKENS_PER_FRAME
#   TOKENS_PER_FRAME: 64, 32 or 16 as the paper; METHOD=none ... 169 is the unpruned row (64 x 169).
# Other settings and the data: scripts/lib/lmms_eval.sh and EVAL.md ("lmms-eval").
source "$(dirname "${BASH_SOURCE[0]}")/../lib/lmms_eval.sh"
if [ $# -ne 1 ] || ! [[ "$1" =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: bash scripts/video/eval.sh TOKENS_PER_FRAME   (e.g. 32; METHOD=none with 169 = unpruned)" >&2
    exit 2
fi
run_lmms video script_llava_video "${CKPT:-llava-hf/LLaVA-Video-7B-Qwen2-hf}" \
    mlvu_dev,mvbench,longvideobench_val_v,videomme "$1" "$1" 169 "max_frames_num=64,video_pooling=average"
