"""The vision-to-language projector (config key ``mm_projector_type``): ``linear``, ``mlp{N}x_gelu``, ``identity``.

Module layout matches LLaVA's checkpoints: ``mlp2x_gelu`` is ``Sequential(Linear, GELU, Linear)`` so the
weights load from ``model.mm_projector.0.*`` and ``model.mm_projector.2.*``.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn


def build_vision_projector(config: Any) -> nn.Module:
    """Projector from ``config.mm_hidden_size`` (vision width C) to ``config.hidden_size`` (LLM width D)."""
    kind = getattr(config, "mm_projector_type", "linear")
    in_dim, out_dim = int(config.mm_hidden_size), int(config.hidden_size)
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    match = re.fullmatch(r"mlp(\d+)x_gelu", kind or "")
    if match:
        depth = int(match.group(1))
        if depth < 1:
            raise ValueError(f"mm_projector_type {kind!r} needs at least one layer")
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        return nn.Sequential(*layers)
    if kind == "identity":
        if in_dim != out_dim:
            raise ValueError(f"identity projector needs mm_hidden_size == hidden_size, got {in_dim} and {out_dim}")
        return nn.Identity()
    raise ValueError(f"mm_projector_type must be 'linear', 'mlp<N>x_gelu' or 'identity', got {kind!r}")
