"""Session fixtures: tiny random LLaVA checkpoints (original LLaVA format) written by llava.model.tiny."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_llava15_path(tmp_path_factory) -> str:
    """Folder of a tiny LLaVA-1.5 checkpoint (image_aspect_ratio "pad", 16 patches per image)."""
    from llava.model.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llava-1.5"), arch="llava-1.5", seed=0)


@pytest.fixture(scope="session")
def tiny_llava_next_path(tmp_path_factory) -> str:
    """Folder of a tiny LLaVA-NeXT checkpoint (anyres + spatial_unpad + image_newline)."""
    from llava.model.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llava-next"), arch="llava-next", seed=0)
