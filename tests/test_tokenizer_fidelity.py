"""Prompt token ids with the real Llama-2 / Vicuna vocabulary vs. sentencepiece itself.

LLaVA-1.5 / 1.6-vicuna load the Llama-2 sentencepiece tokenizer (`use_fast=False`) and
`tokenizer_image_token` encodes the text around each `<image>` tag separately with one BOS in front.
The independent reference here encodes the same chunks with the `sentencepiece` library directly.
The tokenizer model lives in the shared folder beside the repository (not shipped with the repo).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llava.constants import IMAGE_TOKEN_INDEX  # noqa: E402
from llava.conversation import conv_templates  # noqa: E402
from llava.mm_utils import load_sentencepiece_tokenizer, tokenizer_image_token  # noqa: E402

SP_MODEL = Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "llama2" / "tokenizer.model"

pytestmark = pytest.mark.skipif(
    not SP_MODEL.is_file(), reason=f"Llama-2 sentencepiece model not found at {SP_MODEL} (test-only asset)"
)

# tokenizer_config.json as shipped with LLaVA-1.5 / Vicuna-v1.5 checkpoints (the fields that matter)
LLAVA_TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": None,
    "legacy": False,
    "clean_up_tokenization_spaces": False,
    "model_max_length": 2048,
    "padding_side": "right",
}

QUESTIONS = [
    "What is the man holding?\nAnswer the question using a single word or phrase.",
    "what is written on the sign?\nReference OCR token: STOP, Main, St.\nAnswer the question using a single word or phrase.",
    "Is there a dog in the image? Please answer yes or no.",
    "Question: Which of these states is farthest north?\nOptions: (A) Ohio (B) Maine\nA. Ohio\nB. Maine\n"
    "Answer with the option's letter from the given choices directly.",
    "图中有几只猫？\nA. 一只\nB. 两只\n请直接回答选项字母。",
    "Describe the image in detail: colours, objects, text (if any) & mood; e.g. 'sunny', \"calm\" -- 100%?",
]


@pytest.fixture(scope="module")
def sp():
    sentencepiece = pytest.importorskip("sentencepiece")
    return sentencepiece.SentencePieceProcessor(model_file=str(SP_MODEL))


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("llama2_tokenizer")
    shutil.copy(SP_MODEL, folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps(LLAVA_TOKENIZER_CONFIG))
    return folder


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir):
    """transformers 5's tokenizer as LLaVA's builder asks for it: AutoTokenizer(use_fast=False)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir), use_fast=False)


@pytest.fixture(scope="module")
def exact_tokenizer(tokenizer_dir):
    """The sentencepiece-backed tokenizer from llava.mm_utils."""
    return load_sentencepiece_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module", params=["transformers", "sentencepiece"])
def llava_tokenizer(request):
    return request.getfixturevalue("hf_tokenizer" if request.param == "transformers" else "exact_tokenizer")


def _reference_ids(prompt: str, sp) -> list[int]:
    """sentencepiece encoding of each chunk between <image> tags, BOS once, IMAGE_TOKEN_INDEX between."""
    ids = [sp.bos_id()]
    for i, chunk in enumerate(prompt.split("<image>")):
        if i > 0:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(sp.encode(chunk))
    return ids


def _vicuna_prompt(question: str) -> str:
    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], "<image>\n" + question)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def test_special_token_ids(llava_tokenizer, sp):
    assert (llava_tokenizer.bos_token_id, llava_tokenizer.eos_token_id) == (sp.bos_id(), sp.eos_id()) == (1, 2)


@pytest.mark.parametrize("question", QUESTIONS)
def test_vicuna_v1_prompt_ids_equal_sentencepiece(question, llava_tokenizer, sp):
    prompt = _vicuna_prompt(question)
    assert tokenizer_image_token(prompt, llava_tokenizer) == _reference_ids(prompt, sp)


def test_reference_ids_around_the_image(llava_tokenizer):
    ids = tokenizer_image_token(_vicuna_prompt("What is this?"), llava_tokenizer, return_tensors="pt").tolist()
    assert ids[0] == 1 and ids.count(IMAGE_TOKEN_INDEX) == 1
    at = ids.index(IMAGE_TOKEN_INDEX)
    assert ids[at - 4 : at] == [3148, 1001, 29901, 29871]  # "▁US" "ER" ":" "▁"  (from "... USER: ")
    assert ids[at + 1 : at + 4] == [29871, 13, 5618]  # "▁" "<0x0A>" "What"  (from "\nWhat ...")


def test_multi_image_and_trailing_image_prompt(llava_tokenizer, sp):
    prompt = "USER: <image>\nFirst.<image>\nSecond ASSISTANT:<image>"
    ids = tokenizer_image_token(prompt, llava_tokenizer)
    assert ids == _reference_ids(prompt, sp)
    assert ids[-1] == IMAGE_TOKEN_INDEX and ids.count(IMAGE_TOKEN_INDEX) == 3


def test_answer_with_eos_string_maps_to_eos_id(llava_tokenizer, sp):
    # a finished turn ends with the literal "</s>", which the tokenizer must map to the EOS id
    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], "<image>\nQ?")
    conv.append_message(conv.roles[1], "Yes")
    prompt = conv.get_prompt()
    assert prompt.endswith(" ASSISTANT: Yes</s>")
    before, after = prompt.removesuffix("</s>").split("<image>")
    expected = [sp.bos_id()] + sp.encode(before) + [IMAGE_TOKEN_INDEX] + sp.encode(after) + [sp.eos_id()]
    assert tokenizer_image_token(prompt, llava_tokenizer) == expected


@pytest.mark.parametrize("text", ["two  spaces   and three", " ", "  leading", "end  ", "tab\tand\n\nnewlines  x"])
def test_sentencepiece_tokenizer_matches_on_repeated_spaces(text, exact_tokenizer, sp):
    assert exact_tokenizer(text).input_ids == [sp.bos_id()] + sp.encode(text)


@pytest.mark.xfail(
    reason="transformers 5's tokenizers-backed LlamaTokenizer merges runs of spaces differently from "
    "sentencepiece (e.g. 'a  b'); LLaVA prompts use single spaces. See docs/preprocessing.md.",
    strict=False,
)
def test_transformers_tokenizer_repeated_spaces_match_sentencepiece(hf_tokenizer, sp):
    text = "two  spaces   and three"
    assert hf_tokenizer(text).input_ids == [sp.bos_id()] + sp.encode(text)


def test_decode_generated_answers_like_sentencepiece(exact_tokenizer, hf_tokenizer, sp):
    answers = ["Yes", "2 apples\nand  a pear.", "中文 🙂"]
    generated = [sp.encode(a) + [sp.eos_id()] for a in answers]  # what generate() returns after the prompt
    for tokenizer in (exact_tokenizer, hf_tokenizer):
        decoded = tokenizer.batch_decode(generated, skip_special_tokens=True)
        assert [d.strip() for d in decoded] == [sp.decode(ids[:-1]).strip() for ids in generated]
    assert exact_tokenizer.batch_decode(generated, skip_special_tokens=True) == answers


def test_load_sentencepiece_tokenizer_missing_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        load_sentencepiece_tokenizer(tmp_path)
