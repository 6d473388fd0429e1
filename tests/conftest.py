"""Session fixtures: tiny random LLaVA checkpoints (original LLaVA format) written by llava.model.tiny."""

import logging
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _use_triton_interpreter_without_cuda() -> None:
    """Without a GPU, run Triton kernels (script_prune.fused) in Triton's interpreter, so the tests check the
    fused greedy on the CPU. Triton reads the switch when it is imported, which script_prune does lazily."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


_use_triton_interpreter_without_cuda()


def _torchvision_importable() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # PyPI's CUDA build fails beside the CPU torch with a RuntimeError, not an ImportError
        return False
    return True


def pytest_collection_modifyitems(config, items):
    """Skip the tests marked ``torchvision`` where it cannot be imported (the plain test install has none)."""
    marked = [item for item in items if item.get_closest_marker("torchvision") is not None]
    if marked and not _torchvision_importable():
        skip = pytest.mark.skip(reason="needs torchvision (transformers' video processors); see .ci/run")
        for item in marked:
            item.add_marker(skip)


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


class _DeprecationRecords(logging.Handler):
    """Collects transformers' logged deprecation notices (it reports some through its logger, not `warnings`)."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "deprecat" in message.lower():
            self.messages.append(message)


@pytest.fixture(autouse=True)
def no_logged_deprecations():
    """Fail a test during which transformers logs a deprecation notice: inside this suite only our calls reach
    transformers, so such a notice means our code uses an API that is on its way out.

    ``warning_once`` remembers what it said in this process; its memory is cleared so that every test that
    triggers a notice fails, not only the first one."""
    hf_logger = logging.getLogger("transformers")
    records = _DeprecationRecords()
    warning_once = getattr(logging.Logger, "warning_once", None)
    if hasattr(warning_once, "cache_clear"):
        warning_once.cache_clear()
    hf_logger.addHandler(records)
    try:
        yield
    finally:
        hf_logger.removeHandler(records)
    if records.messages:
        pytest.fail("transformers logged a deprecation caused by our call: " + " | ".join(dict.fromkeys(records.messages)))
