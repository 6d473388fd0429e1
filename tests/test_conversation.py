"""Golden tests for llava.conversation: prompts written out by hand from LLaVA's known formats."""

from __future__ import annotations

import pytest

from llava.conversation import (
    Conversation,
    SeparatorStyle,
    conv_mode_for_model,
    conv_templates,
    default_conversation,
    get_conv_template,
)

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)
HUMAN_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions."
)
QUESTION = "<image>\nWhat is the man holding?\nAnswer the question using a single word or phrase."


def _single_turn(name: str, question: str = QUESTION) -> str:
    conv = conv_templates[name].copy()
    conv.append_message(conv.roles[0], question)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def _two_turns(name: str) -> str:
    conv = conv_templates[name].copy()
    conv.append_message(conv.roles[0], "<image>\nHi?")
    conv.append_message(conv.roles[1], "Hello.")
    conv.append_message(conv.roles[0], "Color?")
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def test_vicuna_v1_eval_prompt_is_llava_eval_format():
    expected = (
        VICUNA_SYSTEM
        + " USER: <image>\nWhat is the man holding?\nAnswer the question using a single word or phrase. ASSISTANT:"
    )
    assert _single_turn("vicuna_v1") == expected
    assert _single_turn("v1") == expected


def test_vicuna_v1_multi_turn_closes_assistant_with_eos_string():
    expected = VICUNA_SYSTEM + " USER: <image>\nHi? ASSISTANT: Hello.</s>USER: Color? ASSISTANT:"
    assert _two_turns("vicuna_v1") == expected


def test_llava_v1_uses_human_system_with_user_roles():
    assert _single_turn("llava_v1", "<image>\nQ") == HUMAN_SYSTEM + " USER: <image>\nQ ASSISTANT:"


def test_llava_v0_single_separator_style():
    expected = HUMAN_SYSTEM + "###Human: <image>\nHi?###Assistant: Hello.###Human: Color?###Assistant:"
    assert _two_turns("llava_v0") == expected


def test_plain_template_is_message_plus_newline():
    assert _single_turn("plain", "<image>\nQ") == "<image>\nQ\n"
    conv = conv_templates["plain"].copy()
    conv.append_message(conv.roles[0], "<image>")
    conv.append_message(conv.roles[1], "a caption")
    # LLaVA's plain template has no sep2: closing an assistant turn is a configuration error
    with pytest.raises(ValueError, match="sep2"):
        conv.get_prompt()


def test_mistral_instruct_has_no_system_block_and_no_leading_bos_string():
    assert _single_turn("mistral_instruct", "<image>\nQ") == "[INST] <image>\nQ [/INST]"
    assert _two_turns("mistral_instruct") == "[INST] <image>\nHi? [/INST] Hello. </s>[INST] Color? [/INST]"


def test_llava_llama_2_wraps_system_and_strips_leading_sep():
    system = (
        "You are a helpful language and vision assistant. You are able to understand the visual content that "
        "the user provides, and assist the user with a variety of tasks using natural language."
    )
    expected = (
        "[INST] <<SYS>>\n" + system + "\n<</SYS>>\n\n<image>\nHi? [/INST] Hello. </s><s>[INST] Color? [/INST]"
    )
    assert _two_turns("llava_llama_2") == expected


def test_llama_2_style_rejects_missing_or_assistant_first_message():
    conv = conv_templates["mistral_instruct"].copy()
    conv.append_message(conv.roles[1], "x")
    with pytest.raises(ValueError, match="user role"):
        conv.get_prompt()
    empty = conv_templates["mistral_instruct"].copy()
    with pytest.raises(ValueError, match="first message"):
        empty.get_prompt()


def test_chatml_direct_prompt():
    expected = (
        "<|im_start|>system\nAnswer the questions.<|im_end|>"
        "<|im_start|>user\n<image>\nQ<|im_end|><|im_start|>assistant\n"
    )
    assert _single_turn("chatml_direct", "<image>\nQ") == expected
    assert conv_templates["mistral_direct"] is conv_templates["chatml_direct"]


def test_mpt_prompt():
    expected = (
        "<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. The assistant gives "
        "helpful and honest answers.<|im_end|><|im_start|>user\nQ<|im_end|><|im_start|>assistant\nA<|im_end|>"
    )
    conv = conv_templates["mpt"].copy()
    conv.append_message(conv.roles[0], "Q")
    conv.append_message(conv.roles[1], "A")
    assert conv.get_prompt() == expected


def test_template_fields_match_llava():
    vicuna = conv_templates["vicuna_v1"]
    assert (vicuna.system, vicuna.roles, vicuna.sep, vicuna.sep2) == (VICUNA_SYSTEM, ("USER", "ASSISTANT"), " ", "</s>")
    assert vicuna.sep_style is SeparatorStyle.TWO and vicuna.version == "v1"
    mistral = conv_templates["mistral_instruct"]
    assert (mistral.system, mistral.sep, mistral.sep2, mistral.sep_style) == ("", "", "</s>", SeparatorStyle.LLAMA_2)
    assert conv_templates["plain"].sep == "\n" and conv_templates["plain"].sep2 is None
    assert default_conversation is conv_templates["vicuna_v1"]


def test_demo_tuple_message_moves_image_tag_to_front():
    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], ("Describe <image> this.", None, "Default"))
    conv.append_message(conv.roles[1], None)
    assert conv.get_prompt() == VICUNA_SYSTEM + " USER: <image>\nDescribe  this. ASSISTANT:"


def test_demo_tuple_with_mmtag_inserts_image_exchange():
    conv = conv_templates["v1_mmtag"].copy()
    conv.append_message(conv.roles[0], ("<image>\nQ", None, "Default"))
    conv.append_message(conv.roles[1], None)
    prompt = conv.get_prompt()
    assert prompt.endswith(" USER: <Image><image></Image> ASSISTANT: Received.</s>USER: Q ASSISTANT:")
    assert prompt.startswith("A chat between a curious user and an artificial intelligence assistant. The assistant is able")


def test_copy_is_independent_of_template():
    template = conv_templates["vicuna_v1"]
    conv = template.copy()
    conv.append_message("USER", "x")
    assert template.messages == [] and conv.messages == [["USER", "x"]]
    again = conv.copy()
    again.messages[0][1] = "changed"
    assert conv.messages[0][1] == "x"


def test_get_conv_template_and_unknown_name():
    conv = get_conv_template("vicuna_v1")
    assert isinstance(conv, Conversation) and conv is not conv_templates["vicuna_v1"]
    with pytest.raises(ValueError, match="conv_mode"):
        get_conv_template("nope")


@pytest.mark.parametrize(
    ("name", "mode"),
    [
        ("llava-v1.5-7b", "llava_v1"),
        ("llava-v1.6-vicuna-13b", "llava_v1"),
        ("llava-v1.6-mistral-7b", "mistral_instruct"),
        ("llava-v1.6-34b", "chatml_direct"),
        ("llava-llama-2-13b-chat", "llava_llama_2"),
        ("LLaVA-Lightning-MPT-7B-preview", "mpt"),
        ("llava-7b", "llava_v0"),
    ],
)
def test_conv_mode_for_model(name, mode):
    assert conv_mode_for_model(name) == mode
