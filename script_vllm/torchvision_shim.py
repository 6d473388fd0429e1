"""Lets PyPI's torchvision (a CUDA build) import beside the CPU build of torch (vLLM env, CI's torchvision pass).

Its compiled operators cannot load without CUDA's libraries, and its ``_meta_registrations`` then fails at
import on ``register_fake("torchvision::nms")`` (the operator was never defined). transformers' Qwen-VL image
and video processors, which vLLM loads, need only torchvision's Python transforms. This module, imported at
interpreter start by a ``.pth`` file that ``scripts/torchvision_shim.sh`` writes, defines the two operator
schemas just before torchvision is first imported (nothing happens until then, and nothing when the operators exist).
Calling ``torchvision.ops.nms`` still fails: it has no kernel.
"""

from __future__ import annotations

import importlib.abc
import sys

#: the operators torchvision registers fake kernels for unconditionally, with their schemas
SCHEMAS = {"nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
           "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"}


def define_missing_ops() -> None:
    import torch

    for name, schema in SCHEMAS.items():
        if not _defined(name):
            torch.library.define(f"torchvision::{name}", schema)


def _defined(name: str) -> bool:
    import torch

    try:
        getattr(torch.ops.torchvision, name)
    except (AttributeError, RuntimeError):
        return False
    return True


class _Finder(importlib.abc.MetaPathFinder):
    """Defines the schemas on the first ``import torchvision``, then steps aside."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            define_missing_ops()
        return None


def install() -> None:
    if "torchvision" not in sys.modules and not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


install()
