"""Constants shared by the LLaVA code paths (token ids, placeholder strings, benchmark instructions).

The values follow LLaVA's conventions so that checkpoints, question files and prompts written for
the original code base work unchanged.
"""

from __future__ import annotations

# --- controller / worker defaults (LLaVA's serving code uses these names) ---------------------
CONTROLLER_HEART_BEAT_EXPIRATION = 30
WORKER_HEART_BEAT_INTERVAL = 15
LOGDIR = "."

# --- token ids ------------------------------------------------------------------------------
IGNORE_INDEX = -100
"""Label value ignored by the cross-entropy loss."""

IMAGE_TOKEN_INDEX = -200
"""Placeholder id that `tokenizer_image_token` puts where an image's visual tokens go."""

# --- placeholder strings ---------------------------------------------------------------------
DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_IMAGE_PATCH_TOKEN = "<im_patch>"
DEFAULT_IM_START_TOKEN = "<im_start>"
DEFAULT_IM_END_TOKEN = "<im_end>"
IMAGE_PLACEHOLDER = "<image-placeholder>"

# --- benchmark instructions appended to questions by LLaVA's evaluation files ---------------
SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
"""Short-answer line (GQA, VQAv2, TextVQA, POPE, MME, VizWiz); it follows the question after a newline."""

MULTIPLE_CHOICE_PROMPT = "Answer with the option's letter from the given choices directly."
"""Multiple-choice line (ScienceQA, MMBench)."""

MULTIPLE_CHOICE_PROMPT_CN = "请直接回答选项字母。"
"""Multiple-choice line of MMBench-CN."""

BENCHMARK_INSTRUCTIONS: tuple[str, ...] = (
    SHORT_ANSWER_PROMPT,
    MULTIPLE_CHOICE_PROMPT,
    MULTIPLE_CHOICE_PROMPT_CN,
)
"""Instruction lines that `llava.mm_utils.strip_short_answer_prompt` removes from a question."""
