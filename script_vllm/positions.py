"""M-RoPE positions of kept visual tokens, carried exactly through the encoder output.

vLLM fixes a request's positions when the prompt is processed, before the encoder decides which tokens
stay; its pruning hook (``recompute_mrope_positions``) then gets only the encoder output. So every kept
token carries its 3-D offset from its item's first position (t, h, w; t scaled as the model's rule for
video) in extra channels of the encoder output, written as base-256 digits: each channel holds an integer
in [0, 256), exact in float32, float16 and bfloat16 alike (bfloat16 holds integers exactly only to 256).
"""

from __future__ import annotations

import torch
from torch import Tensor

#: base-256 digits per coordinate: offsets < 256 ** 2 = 65536
DIGITS = 2
#: extra channels of an encoder output row: 3 coordinates x DIGITS
CHANNELS = 3 * DIGITS


def grid_offsets(t: int, h: int, w: int, t_factor: float) -> Tensor:
    """Offsets (3, t*h*w) of an item's tokens from its first position, raster order (frame, row, column).

    Qwen-VL's M-RoPE rule: (frame * t_factor truncated, row, column) on the merged grid (t_factor: 1 for images,
    seconds per temporal patch x tokens per second for video).
    """
    frame, row, col = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    if t_factor != 1.0:
        frame = (frame.double() * t_factor).long()
    return torch.stack([frame, row, col]).reshape(3, -1)


def encode(offsets: Tensor, dtype: torch.dtype) -> Tensor:
    """(3, K) long offsets -> (K, CHANNELS) digits in ``dtype``."""
    if bool((offsets >= 256 ** DIGITS).any()):
        raise ValueError(f"an M-RoPE offset >= {256 ** DIGITS} cannot be carried (item too large)")
    digits = [(offsets // 256 ** d) % 256 for d in range(DIGITS)]  # DIGITS x (3, K)
    return torch.stack(digits, dim=1).reshape(3 * DIGITS, -1).t().to(dtype)  # (3, DIGITS, K) -> (K, 3 * DIGITS)


def decode(channels: Tensor) -> Tensor:
    """(K, CHANNELS) digits -> (3, K) long offsets."""
    digits = channels.float().round().long().t().reshape(3, DIGITS, -1)  # (3, DIGITS, K)
    scale = torch.tensor([256 ** d for d in range(DIGITS)], device=channels.device)
    return (digits * scale[None, :, None]).sum(dim=1)
