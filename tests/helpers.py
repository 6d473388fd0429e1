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
