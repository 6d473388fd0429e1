"""Conversation templates that render LLaVA's chat prompts.

A `Conversation` holds a system string, two role names and the turns so far; `get_prompt()` renders
them in one of five layouts (`SeparatorStyle`).  The templates in `conv_templates` carry LLaVA's
system strings, roles and separators, so the rendered prompt (and therefore the token ids the model
sees) is the one the released checkpoints were trained and evaluated with.

Typical use (LLaVA's evaluation loop)::

    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], "<image>\\n" + question)
    conv.append_message(conv.roles[1], None)        # open assistant turn
    prompt = conv.get_prompt()

A message may be a string, `None` (an open turn: only the role header is written) or LLaVA's demo
tuple `(text, PIL.Image, mode)`; for a tuple in the first turn the `<image>` tag is moved to the front
(or, for `*_mmtag` versions, into a separate `<Image><image></Image>` exchange).
"""

from __future__ import annotations

import dataclasses
from enum import Enum, auto
from typing import Any

from llava.constants import DEFAULT_IMAGE_TOKEN

Message = Any  # str | None | tuple[str, PIL.Image.Image, str]


class SeparatorStyle(Enum):
    """How turns are joined in `Conversation.get_prompt`."""

    SINGLE = auto()  # system + sep, then "role: msg" + sep per turn
    TWO = auto()  # system + sep, then "role: msg" + (sep | sep2 alternating)
    MPT = auto()  # system + sep, then role + msg + sep (ChatML-like: roles carry their own markup)
    PLAIN = auto()  # system, then msg + (sep | sep2 alternating); roles are not written
    LLAMA_2 = auto()  # "[INST] <<SYS>>...<</SYS>> msg [/INST] answer </s>" blocks


def _message_text(message: Message) -> str:
    """The text part of a message (LLaVA's demo passes (text, image, mode) tuples)."""
    return message[0] if isinstance(message, tuple) else message


def _require_sep2(conv: "Conversation") -> str:
    if conv.sep2 is None:
        raise ValueError(
            f"Conversation.sep2 is None but style {conv.sep_style.name} needs it after an assistant message; "
            "set sep2 on the template"
        )
    return conv.sep2


@dataclasses.dataclass
class Conversation:
    """A chat transcript plus the formatting rules of one prompt template."""

    system: str
    roles: tuple[str, str]
    messages: list[list[Message]] = dataclasses.field(default_factory=list)
    offset: int = 0
    sep_style: SeparatorStyle = SeparatorStyle.SINGLE
    sep: str = "###"
    sep2: str | None = None
    version: str = "Unknown"
    skip_next: bool = False

    def __post_init__(self) -> None:
        self.roles = tuple(self.roles)
        self.messages = [[role, message] for role, message in self.messages]

    # ------------------------------------------------------------------ editing
    def append_message(self, role: str, message: Message) -> None:
        """Add one turn; `message=None` leaves the turn open for the model to complete."""
        self.messages.append([role, message])

    def copy(self) -> "Conversation":
        """An independent copy (new message list) of this conversation."""
        return dataclasses.replace(
            self, messages=[[role, message] for role, message in self.messages], skip_next=False
        )

    # ------------------------------------------------------------------ rendering
    def _messages_for_prompt(self) -> list[tuple[str, Message]]:
        """Turns to render; a demo tuple in the first turn gets its `<image>` tag normalised."""
        messages = [(role, message) for role, message in self.messages]
        if not messages or not isinstance(messages[0][1], tuple):
            return messages
        first_role, first_message = messages[0]
        text = first_message[0].replace(DEFAULT_IMAGE_TOKEN, "").strip()
        if "mmtag" in self.version:
            messages[0] = (first_role, text)
            messages[0:0] = [(self.roles[0], "<Image><image></Image>"), (self.roles[1], "Received.")]
        else:
            messages[0] = (first_role, DEFAULT_IMAGE_TOKEN + "\n" + text)
        return messages

    def _render_single(self, messages: list[tuple[str, Message]]) -> str:
        out = self.system + self.sep
        for role, message in messages:
            out += f"{role}: {_message_text(message)}{self.sep}" if message else f"{role}:"
        return out

    def _render_two(self, messages: list[tuple[str, Message]]) -> str:
        out = self.system + self.sep
        for i, (role, message) in enumerate(messages):
            if message:
                closing = self.sep if i % 2 == 0 else _require_sep2(self)
                out += f"{role}: {_message_text(message)}{closing}"
            else:
                out += f"{role}:"
        return out

    def _render_mpt(self, messages: list[tuple[str, Message]]) -> str:
        out = self.system + self.sep
        for role, message in messages:
            out += f"{role}{_message_text(message)}{self.sep}" if message else role
        return out

    def _render_plain(self, messages: list[tuple[str, Message]]) -> str:
        out = self.system
        for i, (_, message) in enumerate(messages):
            if message:
                closing = self.sep if i % 2 == 0 else _require_sep2(self)
                out += _message_text(message) + closing
        return out

    def _render_llama_2(self, messages: list[tuple[str, Message]]) -> str:
        if not messages or not messages[0][1]:
            raise ValueError("LLAMA_2 prompt: the first message must be a non-empty user message")
        if messages[0][0] != self.roles[0]:
            raise ValueError(
                f"LLAMA_2 prompt: the first message must come from the user role {self.roles[0]!r}, "
                f"got {messages[0][0]!r}"
            )
        system_block = f"<<SYS>>\n{self.system}\n<</SYS>>\n\n" if self.system else ""
        out = ""
        for i, (_, message) in enumerate(messages):
            if not message:
                continue
            text = _message_text(message)
            if i == 0:
                text = system_block + text
            if i % 2 == 0:
                out += f"{self.sep}[INST] {text} [/INST]"
            else:
                out += f" {text} {self.sep2}"
        # The leading separator (e.g. "<s>") is left to the tokenizer's BOS.
        return out.removeprefix(self.sep) if self.sep else out

    def get_prompt(self) -> str:
        """Render the conversation as the prompt string the language model reads."""
        messages = self._messages_for_prompt()
        renderers = {
            SeparatorStyle.SINGLE: self._render_single,
            SeparatorStyle.TWO: self._render_two,
            SeparatorStyle.MPT: self._render_mpt,
            SeparatorStyle.PLAIN: self._render_plain,
            SeparatorStyle.LLAMA_2: self._render_llama_2,
        }
        if self.sep_style not in renderers:
            raise ValueError(f"sep_style must be a SeparatorStyle, got {self.sep_style!r}")
        return renderers[self.sep_style](messages)

    def dict(self) -> dict[str, Any]:
        """A JSON-friendly view (images in demo tuples are dropped, their text kept)."""
        return {
            "system": self.system,
            "roles": self.roles,
            "messages": [[role, _message_text(message)] for role, message in self.messages],
            "offset": self.offset,
            "sep": self.sep,
            "sep2": self.sep2,
        }


# ---------------------------------------------------------------------------- templates
_SYSTEM_USER = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_SYSTEM_HUMAN = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
_SYSTEM_MMTAG = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant is able to understand the visual content that the user provides, and assist the user "
    "with a variety of tasks using natural language."
    "The visual content will be provided with the following format: <Image>visual content</Image>."
)
_SYSTEM_LLAVA_LLAMA_2 = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)
_SYSTEM_MPT = (
    "<|im_start|>system\n"
    "A conversation between a user and an LLM-based AI assistant. The assistant gives helpful and honest answers."
)
_SYSTEM_CHATML_DIRECT = "<|im_start|>system\nAnswer the questions."
_CHATML_ROLES = ("<|im_start|>user\n", "<|im_start|>assistant\n")

conv_vicuna_v1 = Conversation(
    system=_SYSTEM_USER,
    roles=("USER", "ASSISTANT"),
    version="v1",
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
)
conv_llava_v1 = Conversation(
    system=_SYSTEM_HUMAN,
    roles=("USER", "ASSISTANT"),
    version="v1",
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
)
conv_llava_v1_mmtag = Conversation(
    system=_SYSTEM_MMTAG,
    roles=("USER", "ASSISTANT"),
    version="v1_mmtag",
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
)
conv_llava_v0 = Conversation(
    system=_SYSTEM_HUMAN,
    roles=("Human", "Assistant"),
    sep_style=SeparatorStyle.SINGLE,
    sep="###",
)
conv_llava_v0_mmtag = Conversation(
    system=_SYSTEM_MMTAG,
    roles=("Human", "Assistant"),
    version="v0_mmtag",
    sep_style=SeparatorStyle.SINGLE,
    sep="###",
)
conv_llava_plain = Conversation(
    system="",
    roles=("", ""),
    sep_style=SeparatorStyle.PLAIN,
    sep="\n",
)
conv_llava_llama_2 = Conversation(
    system=_SYSTEM_LLAVA_LLAMA_2,
    roles=("USER", "ASSISTANT"),
    version="llama_v2",
    sep_style=SeparatorStyle.LLAMA_2,
    sep="<s>",
    sep2="</s>",
)
conv_mistral_instruct = Conversation(
    system="",
    roles=("USER", "ASSISTANT"),
    version="llama_v2",
    sep_style=SeparatorStyle.LLAMA_2,
    sep="",
    sep2="</s>",
)
conv_mpt = Conversation(
    system=_SYSTEM_MPT,
    roles=_CHATML_ROLES,
    version="mpt",
    sep_style=SeparatorStyle.MPT,
    sep="<|im_end|>",
)
conv_chatml_direct = Conversation(
    system=_SYSTEM_CHATML_DIRECT,
    roles=_CHATML_ROLES,
    version="mpt",
    sep_style=SeparatorStyle.MPT,
    sep="<|im_end|>",
)

default_conversation = conv_vicuna_v1

conv_templates: dict[str, Conversation] = {
    "v1": conv_vicuna_v1,
    "vicuna_v1": conv_vicuna_v1,
    "llava_v1": conv_llava_v1,
    "v1_mmtag": conv_llava_v1_mmtag,
    "llava_v0": conv_llava_v0,
    "v0_mmtag": conv_llava_v0_mmtag,
    "plain": conv_llava_plain,
    "v0_plain": conv_llava_plain,
    "llava_llama_2": conv_llava_llama_2,
    "mistral_instruct": conv_mistral_instruct,
    "mpt": conv_mpt,
    "chatml_direct": conv_chatml_direct,
    "mistral_direct": conv_chatml_direct,
}


def get_conv_template(name: str) -> Conversation:
    """A fresh copy of the template `name` (ValueError listing the known names otherwise)."""
    if name not in conv_templates:
        raise ValueError(f"conv_mode must be one of {sorted(conv_templates)}, got {name!r}")
    return conv_templates[name].copy()


def conv_mode_for_model(model_name: str) -> str:
    """The conversation mode LLaVA's CLI picks from a model name (lower-cased substring rules)."""
    name = model_name.lower()
    if "llama-2" in name:
        return "llava_llama_2"
    if "mistral" in name:
        return "mistral_instruct"
    if "v1.6-34b" in name:
        return "chatml_direct"
    if "v1" in name:
        return "llava_v1"
    if "mpt" in name:
        return "mpt"
    return "llava_v0"
