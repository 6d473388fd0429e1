"""LLaVA-1.5 layout (``LlavaForConditionalGeneration``): one visual row per image, no layout tokens."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from .family import LAYOUT_TOKEN, Family, Layout, VisualRows

FEATURE_KEYS = ("vision_feature_layer", "vision_feature_select_strategy", "image_sizes")


@contextmanager
def capture_projector(model: nn.Module) -> Iterator[dict[str, Tensor]]:
    """Record the multimodal projector's input (selected vision features) and output (LLM tokens)."""
    store: dict[str, Tensor] = {}

    def hook(module, args, output):
        store["features"], store["tokens"] = args[0], output

    handle = model.model.multi_modal_projector.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def vision_layer(model: nn.Module) -> nn.Module:
    """The vision encoder layer whose output is the selected hidden state (``vision_feature_layer``)."""
    tower = model.model.vision_tower
    layers = getattr(tower, "vision_model", tower).encoder.layers
    select = model.config.vision_feature_layer
    if not isinstance(select, int):
        raise ValueError("vision-attention inputs (VisionZip) need a single vision_feature_layer")
    position = select if select >= 0 else len(layers) + 1 + select  # hidden_states[0] = the embeddings
    return layers[position - 1]


@contextmanager
def capture_qk(layer: nn.Module) -> Iterator[dict[str, Tensor]]:
    """Record one vision layer's query / key projections during a forward."""
    store: dict[str, Tensor] = {}
    attn = layer.self_attn
    handles = [attn.q_proj.register_forward_hook(lambda m, args, out: store.__setitem__("q", out)),
               attn.k_proj.register_forward_hook(lambda m, args, out: store.__setitem__("k", out))]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def cls_attention_inputs(q: Tensor, k: Tensor, heads: int) -> dict[str, Tensor]:
    """VisionZip's inputs from one layer's q / k (R, 1 + N, C) with [CLS] first: the [CLS] query's softmax
    attention over the patches (R, N) and the patch keys (R, N, C / heads), both means over heads."""
    r, t, c = k.shape
    q = q.float().view(r, t, heads, c // heads).transpose(1, 2)  # (R, h, 1 + N, hd)
    k = k.float().view(r, t, heads, c // heads).transpose(1, 2)
    logits = q[:, :, :1] @ k.transpose(-1, -2) * (c // heads) ** -0.5  # (R, h, 1, 1 + N)
    return {"cls_attention": logits.softmax(dim=-1)[:, :, 0, 1:].mean(dim=1), "keys": k[:, :, 1:].mean(dim=1)}


def projected_rows(model: nn.Module, call: dict[str, Any], needs: frozenset[str] = frozenset()
                   ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """The stock ``get_image_features`` on the call's pixels -> (vision features (R, N, C), tokens (R, N, D),
    method inputs: VisionZip's ``cls_attention`` (R, N) / ``keys`` (R, N, hd) when ``needs`` names them)."""
    kwargs = {key: call[key] for key in FEATURE_KEYS if call.get(key) is not None}
    attention = bool(needs & {"cls_attention", "keys"})
    if attention and model.config.vision_feature_select_strategy != "default":
        raise ValueError("vision-attention inputs (VisionZip) need vision_feature_select_strategy='default'")
    with capture_projector(model) as store, (capture_qk(vision_layer(model)) if attention else nullcontext({})) as qk:
        model.model.get_image_features(pixel_values=call["pixel_values"], **kwargs)
    inputs = cls_attention_inputs(qk["q"], qk["k"], model.config.vision_config.num_attention_heads) if attention else {}
    return store["features"], store["tokens"], inputs


def tokens_per_crop(model: nn.Module) -> int:
    """Projected tokens of one crop: (image_size / patch_size)^2, plus [CLS] for the "full" strategy."""
    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size
    return side * side + (model.config.vision_feature_select_strategy == "full")


class LlavaFamily(Family):
    name = "llava"
    class_names = ("LlavaForConditionalGeneration",)
    provides = ("cls_attention", "keys")

    def row_length(self, model: nn.Module) -> int:
        return tokens_per_crop(model)

    def num_rows(self, model: nn.Module, call: dict[str, Any]) -> int:
        return int(call["pixel_values"].shape[0])

    def encode(self, model: nn.Module, call: dict[str, Any], needs: frozenset[str] = frozenset()) -> VisualRows:
        features, tokens, inputs = projected_rows(model, call, needs)  # (R, N, C), (R, N, D)
        rows, n = tokens.shape[:2]
        arange = torch.arange(rows, device=tokens.device)
        return VisualRows(tokens, features, arange, torch.full((rows,), n, device=tokens.device), inputs=inputs)

    def layout(self, model: nn.Module, rows: VisualRows, keep: Tensor, merged: Tensor | None = None) -> Layout:
        """Each image's N tokens in row order, kept = ``keep`` (R, N); merged tokens (R, e, D) after them."""
        r, n, d = rows.tokens.shape
        device = rows.tokens.device
        tokens, kept = rows.tokens, keep  # (R, N', D), (R, N')
        row = torch.arange(r, device=device)[:, None].expand(r, n)
        index = torch.arange(n, device=device).expand(r, n)
        if merged is not None:
            e = merged.shape[1]
            tokens = torch.cat([tokens, merged.to(tokens.dtype)], dim=1)
            kept = torch.cat([kept, kept.new_ones(r, e)], dim=1)
            row = torch.cat([row, row.new_full((r, e), LAYOUT_TOKEN)], dim=1)
            index = torch.cat([index, index.new_full((r, e), -1)], dim=1)
        image = torch.arange(r, device=device)[:, None].expand_as(row)
        return Layout(tokens.reshape(-1, d), kept.reshape(-1), row.reshape(-1), index.reshape(-1), image.reshape(-1))
