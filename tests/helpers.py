"""Small helpers shared by the model tests: a vicuna_v1 prompt, a seeded random image, a PyAV clip, tiny tokenizers
and tiny transformers checkpoints saved offline with their processors."""

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


def chat_template(image: str = "<image>\n", video: str = "<video>\n") -> str:
    """A chat template of our own (Vicuna-like turns), writing ``image`` / ``video`` where the content puts them."""
    return ("{% for m in messages %}{{ m['role'] | upper }}: {% if m['content'] is string %}{{ m['content'] }}"
            "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}" + image
            + "{% elif c['type'] == 'video' %}" + video + "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
            "\n{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


#: the LLaVA placeholders (<image>, <video>, each followed by a newline)
CHAT_TEMPLATE = chat_template()


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


def word_tokenizer(special):
    """A word-level tokenizer over w0..w91 (ids 3..94) whose ``special`` tokens (name -> (text, id)) keep their ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<eos>"] + [f"w{i}" for i in range(92)])}
    free = iter([95, 96, 97])  # for specials without a fixed id
    for text, token_id in special.values():
        vocab[text] = token_id if token_id is not None else next(free)
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer, core.decoder = pre_tokenizers.WhitespaceSplit(), decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>",
                                   additional_special_tokens=[text for text, _ in special.values()],
                                   extra_special_tokens={name: text for name, (text, _) in special.items()})


def write_clip(path, frames: int, seed: int = 0, rate: int = 1) -> None:
    """An mpeg4 clip of ``frames`` seeded random 48 x 32 frames at ``rate`` frames per second, written with PyAV
    (at 1 per second, ``script_prune.video.load_video`` keeps every frame)."""
    import av

    rng = np.random.RandomState(seed)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        for _ in range(frames):
            image = rng.randint(0, 256, (32, 48, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


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


def save_tiny_vlm(folder, family: str, seed: int = 0) -> str:
    """A tiny random checkpoint of ``family`` ("llava_onevision", "internvl", "qwen2_5_vl" or "qwen3_vl": the model
    ``build`` of tests/test_patch_<family>.py) saved to ``folder`` as hub checkpoints lay one out, all offline:
    weights, tokenizer (``word_tokenizer``) with a chat template, the PIL image processor, processor_config.json
    and, where torchvision imports, the video processor (transformers builds those on torchvision only)."""
    import importlib
    import json

    import pytest
    import transformers

    setup = TINY_VLMS[family]
    module = importlib.import_module(f"tests.test_patch_{family}")
    skip = module.pytestmark  # the family's skip below the transformers release it supports
    if skip.args[0]:
        pytest.skip(skip.kwargs["reason"])
    build = module.build
    tokenizer = word_tokenizer(setup["specials"])
    tokenizer.chat_template = chat_template(*setup["placeholders"])
    model = build(seed)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    getattr(transformers, setup["image_processor"])(**setup["image"]).save_pretrained(folder)
    with open(f"{folder}/processor_config.json", "w") as file:
        json.dump({"processor_class": setup["processor"], **setup["processor_kwargs"]}, file, indent=2)
    if transformers.utils.is_torchvision_available():
        getattr(transformers, setup["video_processor"])(**setup["video"]).save_pretrained(folder)
    return str(folder)


_QWEN_SPECIALS = {"image_token": ("<|image_pad|>", 97), "video_token": ("<|video_pad|>", 98),
                  "vision_start_token": ("<|vision_start|>", 95), "vision_end_token": ("<|vision_end|>", 96)}
_QWEN_VISION = dict(patch_size=2, temporal_patch_size=2, merge_size=2, size={"shortest_edge": 16, "longest_edge": 1024})

#: what save_tiny_vlm writes beside each family's tiny model (ids and sizes as in tests/test_patch_<family>.py)
TINY_VLMS = {
    "llava_onevision": dict(  # 40 px crops of 8 px patches: 25 tokens per crop, frames pooled to 3 x 3
        specials={"image_token": ("<image>", 99), "video_token": ("<video>", 98)},
        placeholders=("<image>\n", "<video>\n"),
        image_processor="LlavaOnevisionImageProcessorPil", video_processor="LlavaOnevisionVideoProcessor",
        image=dict(size={"height": 40, "width": 40}, image_grid_pinpoints=[[40, 80], [80, 40], [80, 80]]),
        video=dict(size={"height": 40, "width": 40}),
        processor="LlavaOnevisionProcessor",
        processor_kwargs=dict(num_image_tokens=25, vision_feature_select_strategy="full",
                              vision_aspect_ratio="anyres_max_9")),
    "internvl": dict(  # 16 px tiles, 16 tokens each after the pixel shuffle; up to 4 tiles + thumbnail
        specials={"context_image_token": ("<IMG_CONTEXT>", 99), "start_image_token": ("<img>", None),
                  "end_image_token": ("</img>", None), "video_token": ("<video>", None)},
        placeholders=("<IMG_CONTEXT>\n", "<video>\n"),
        image_processor="GotOcr2ImageProcessorPil", video_processor="InternVLVideoProcessor",
        image=dict(size={"height": 16, "width": 16}, crop_to_patches=True, min_patches=1, max_patches=4),
        video=dict(size={"height": 16, "width": 16}),
        processor="InternVLProcessor",
        processor_kwargs=dict(image_seq_length=16)),
    "qwen2_5_vl": dict(  # 2 px patches merged 2 x 2, frames paired (temporal patch 2)
        specials=_QWEN_SPECIALS, placeholders=("<|vision_start|><|image_pad|><|vision_end|>",
                                               "<|vision_start|><|video_pad|><|vision_end|>"),
        image_processor="Qwen2VLImageProcessorPil", video_processor="Qwen2VLVideoProcessor", image=_QWEN_VISION,
        video=_QWEN_VISION,
        processor="Qwen2_5_VLProcessor", processor_kwargs={}),
}
TINY_VLMS["qwen3_vl"] = {**TINY_VLMS["qwen2_5_vl"], "video_processor": "Qwen3VLVideoProcessor",
                         "processor": "Qwen3VLProcessor"}
