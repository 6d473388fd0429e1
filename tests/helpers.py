"""Small helpers shared by the model tests: a vicuna_v1 prompt and a seeded random image."""

import numpy as np
import torch
from PIL import Image

from llava.conversation import conv_templates
from llava.mm_utils import tokenizer_image_token


def prompt_ids(tokenizer, question: str) -> torch.Tensor:
    """Token ids (L,) of the vicuna_v1 prompt ``<image>\\n{question}`` with IMAGE_TOKEN_INDEX for the image."""
    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], "<image>\n" + question)
    conv.append_message(conv.roles[1], None)
    return tokenizer_image_token(conv.get_prompt(), tokenizer, return_tensors="pt")


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A (height, width) RGB image of uniform random pixels from ``seed``."""
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8))


def skip_below_family_minimum(family) -> "pytest.MarkDecorator":
    """Skip a family's tests on a transformers release older than the family supports (``Family.min_transformers``);
    ``apply`` refuses it there (tested in test_patch.py)."""
    import pytest
    import transformers
    from packaging.version import Version

    minimum = family.min_transformers
    return pytest.mark.skipif(minimum is not None and Version(transformers.__version__) < Version(minimum),
                              reason=f"{type(family).__name__} needs transformers >= {minimum}")


def check_vision_side_refusals(model, family: str, refused: dict[str, str]) -> None:
    """``apply`` refuses each of ``refused`` (a method name, or ``"clip_text"`` for that relevance with the
    script method) on ``model`` before any forward, naming the method, the family and what it lacks
    (``refused[name]``, a regex), and leaves the model unpatched."""
    import pytest

    import script_prune as sp

    dummy_clip = sp.patch.ClipText(None, torch.nn.Linear(2, 2), None)
    for name, lacks in refused.items():
        method, extra = ("script", {"relevance": dummy_clip}) if name == "clip_text" else (name, {})
        with pytest.raises(ValueError, match=f"{name}.*{type(model).__name__} \\(family {family}\\).*{lacks}"):
            sp.patch.apply(model, method=method, budget=4, **extra)
        assert not sp.patch.is_patched(model)


#: A chat template of our own (Vicuna-like turns; the image / video placeholders where the content puts them).
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] | upper }}: {% if m['content'] is string %}{{ m['content'] }}"
                 "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
                 "{% elif c['type'] == 'video' %}<video>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
                 "\n{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def tiny_byte_tokenizer(specials: list[str]):
    """A byte-level BPE tokenizer trained offline on a few sentences, ``specials`` added as special tokens
    (``<s>``, ``</s>``, ``<pad>`` first), as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>", "<pad>", *specials], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["USER: What is in the picture? ASSISTANT: A cat on a red chair next to a window."],
                            trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   extra_special_tokens={"image_token": "<image>"})


def save_tiny_llava_hf(folder, arch: str = "llava", seed: int = 0) -> str:
    """A tiny random transformers-format LLaVA (``arch`` "llava") or LLaVA-NeXT ("llava_next") checkpoint with its
    processor (CLIP-style image processor, the tokenizer above, CHAT_TEMPLATE), saved to ``folder``, all offline.
    32 px crops of 8 px patches: 16 tokens per crop ([CLS] dropped); NeXT pinpoints 32x64, 64x32, 64x64."""
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessorPil,
                              LlavaNextProcessor, LlavaProcessor)

    tokenizer = tiny_byte_tokenizer(["<image>"])
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8)
    common = dict(text_config=text, vision_config=vision, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                  vision_feature_select_strategy="default", vision_feature_layer=-2)
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    processor_kw = dict(tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
                        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    torch.manual_seed(seed)
    if arch == "llava":
        model = LlavaForConditionalGeneration(LlavaConfig(**common))
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        processor = LlavaProcessor(image_processor=image_processor, **processor_kw)
    elif arch == "llava_next":
        model = LlavaNextForConditionalGeneration(LlavaNextConfig(**common, image_grid_pinpoints=pinpoints))
        image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                     image_grid_pinpoints=pinpoints)
        processor = LlavaNextProcessor(image_processor=image_processor, **processor_kw)
    else:
        raise ValueError(f"arch must be 'llava' or 'llava_next', got {arch!r}")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)
