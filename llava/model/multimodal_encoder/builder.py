"""Build LLaVA's vision tower from the model config (``mm_vision_tower`` and the select keys)."""

from __future__ import annotations

import os
from typing import Any

from .clip_encoder import CLIPVisionTower, resolve_vision_tower_path


def load_vision_config(vision_tower_path: str):
    """The CLIPVisionConfig of a CLIP checkpoint (a full CLIPConfig folder or a vision-only one)."""
    from transformers import CLIPVisionConfig

    try:
        return CLIPVisionConfig.from_pretrained(vision_tower_path)
    except OSError as err:
        raise FileNotFoundError(
            f"mm_vision_tower {vision_tower_path!r} is neither a CLIP checkpoint folder nor a reachable hub id: {err}"
        ) from err


def build_vision_tower(config: Any, model_path: str | os.PathLike | None = None) -> CLIPVisionTower:
    """A CLIPVisionTower with the architecture of ``config.mm_vision_tower`` (weights loaded later)."""
    name = getattr(config, "mm_vision_tower", None) or getattr(config, "vision_tower", None)
    if not name:
        raise ValueError("config has no mm_vision_tower: not a LLaVA checkpoint")
    if "clip" not in os.path.basename(str(name)).lower() and not os.path.isdir(str(name)):
        raise ValueError(f"mm_vision_tower {name!r}: only CLIP vision towers are supported")
    path = resolve_vision_tower_path(str(name), model_path)
    vision_config = load_vision_config(path)
    return CLIPVisionTower(
        path,
        vision_config,
        select_layer=getattr(config, "mm_vision_select_layer", -2),
        select_feature=getattr(config, "mm_vision_select_feature", "patch"),
    )
