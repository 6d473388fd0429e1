"""The CLIP checkpoint named by LLaVA's ``mm_vision_tower``: readers, and its text side for relevance.

The vision tower itself is transformers' (``LlavaForConditionalGeneration.model.vision_tower``, weights
from this checkpoint or the LLaVA-1.6 checkpoint, see ``llava.model.convert``). For relevance-based
pruning :meth:`CLIPRelevanceEncoder.from_pretrained` builds the layer's ``script_prune.patch.ClipText``
source from the same checkpoint: CLIP's text tower, ``visual_projection`` and tokenizer (the query is cut
into 77-token segments, one projected text embedding each; the image side is ``post_layernorm`` then
``visual_projection`` of the selected-layer patch features).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Silence transformers' load reports (we check missing weights ourselves and raise on real problems)."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def resolve_vision_tower_path(name: str, model_path: str | os.PathLike | None = None) -> str:
    """``mm_vision_tower`` as given if it is a folder (or a hub id), else relative to the LLaVA folder."""
    if os.path.isdir(name):
        return name
    if model_path is not None and os.path.isdir(model_path):
        for candidate in (Path(model_path) / name, Path(model_path) / Path(name).name):
            if candidate.is_dir():
                return str(candidate)
    return name


def _checkpoint_files(path: str) -> list[str]:
    """Local weight files of a checkpoint folder or hub id (safetensors preferred)."""
    from transformers.utils import cached_file

    def find(filename: str) -> str | None:
        local = Path(path) / filename
        if local.is_file():
            return str(local)
        if os.path.isdir(path):
            return None
        return cached_file(path, filename, _raise_exceptions_for_missing_entries=False)

    index = find("model.safetensors.index.json")
    if index is not None:
        shards = sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
        return [f for f in (find(s) for s in shards) if f is not None]
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = find(filename)
        if found is not None:
            return [found]
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin found for CLIP checkpoint {path!r}")


def read_checkpoint_tensors(path: str, prefix: str = "", keys: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint whose names start with ``prefix`` (or are in ``keys``), prefix stripped."""
    from safetensors import safe_open

    def wanted(name: str) -> bool:
        return name in keys if keys is not None else name.startswith(prefix)

    out: dict[str, torch.Tensor] = {}
    for file in _checkpoint_files(path):
        if file.endswith(".safetensors"):
            with safe_open(file, framework="pt") as handle:
                for name in handle.keys():
                    if wanted(name):
                        out[name[len(prefix):]] = handle.get_tensor(name)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
            out.update({name[len(prefix):]: t for name, t in state.items() if wanted(name)})
    return out


def read_checkpoint_tensor(path: str, key: str) -> torch.Tensor:
    """One tensor (e.g. ``visual_projection.weight``) from a checkpoint without building the whole model."""
    found = read_checkpoint_tensors(path, keys={key})
    if key not in found:
        raise ValueError(f"CLIP checkpoint {path!r} has no tensor {key!r} (needed for relevance-based pruning)")
    return found[key]


def load_clip_vision_state(path: str) -> dict[str, torch.Tensor]:
    """CLIP vision weights named like transformers-5 ``CLIPVisionModel`` (``embeddings.*``, ``encoder.*``, ...).

    Full CLIPModel checkpoints (openai/clip-vit-*) store them under ``vision_model.``; vision-only checkpoints
    saved by transformers 5 store them without a prefix."""
    state = read_checkpoint_tensors(path, prefix="vision_model.")
    if not state:
        state = {k: v for k, v in read_checkpoint_tensors(path).items()
                 if k.split(".")[0] in ("embeddings", "pre_layrnorm", "encoder", "post_layernorm")}
    if not state:
        raise ValueError(f"CLIP checkpoint {path!r} holds no vision tower weights")
    return state


class CLIPRelevanceEncoder:
    """Builds the ``clip_text`` relevance source of a CLIP checkpoint (a namespace: nothing to instantiate)."""

    @staticmethod
    def from_pretrained(path: str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"):
        """``script_prune.patch.ClipText`` of the CLIP checkpoint at ``path`` (text tower, visual projection, tokenizer)."""
        from transformers import AutoTokenizer, CLIPTextModelWithProjection

        import script_prune as sp

        with quiet_loading():
            text_model = CLIPTextModelWithProjection.from_pretrained(path, dtype=dtype).eval()
        weight = read_checkpoint_tensor(path, "visual_projection.weight")  # (P, C)
        projection = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            projection.weight.copy_(weight)
        return sp.patch.ClipText(text_model.to(device), projection.to(device=device, dtype=dtype or weight.dtype),
                                 AutoTokenizer.from_pretrained(path))
