"""CLIP vision tower (LLaVA's ``mm_vision_tower``) and, for relevance-based pruning, CLIP's text side.

``CLIPVisionTower`` returns the hidden state of layer ``mm_vision_select_layer`` (``-2``: the
penultimate layer), without the CLS token for ``mm_vision_select_feature == "patch"``.

``CLIPRelevanceEncoder`` is loaded from the same CLIP checkpoint only when the pruning method needs
relevance inputs. Query embedding: the query is tokenised by CLIP's tokenizer (BOS/EOS added), the ids
are zero-padded to a multiple of the text tower's context (77) and cut into segments of that length;
each segment gives one projected text embedding -> ``(M, P)``. Image embedding: ``post_layernorm`` then
``visual_projection`` of the selected layer's patch features -> ``(R, N, P)``.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn


@dataclass
class VisionOutput:
    """What the tower gives the multimodal merge for R image rows."""

    features: torch.Tensor  # (R, N, C) selected-layer features
    cls_attention: torch.Tensor | None = None  # (R, N) [CLS]->patch attention at that layer (mean over heads)
    keys: torch.Tensor | None = None  # (R, N, Dk) that layer's patch keys (mean over heads)


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


def layer_index_of_hidden_state(select_layer: int, num_layers: int) -> int:
    """Index of the encoder layer whose OUTPUT is ``hidden_states[select_layer]`` (hidden_states[0] = embeddings)."""
    position = select_layer if select_layer >= 0 else num_layers + 1 + select_layer
    if not 1 <= position <= num_layers:
        raise ValueError(f"mm_vision_select_layer {select_layer} does not name an encoder layer output")
    return position - 1


class CLIPVisionHolder(nn.Module):
    """Holds a transformers-5 ``CLIPVisionModel`` as ``.vision_model`` so parameter names match LLaVA-1.6
    checkpoints (``model.vision_tower.vision_tower.vision_model.*``, the transformers-4 CLIPVisionModel layout)."""

    def __init__(self, vision_model: nn.Module) -> None:
        super().__init__()
        self.vision_model = vision_model

    def forward(self, pixel_values: torch.Tensor, **kwargs):
        return self.vision_model(pixel_values, **kwargs)


class CLIPVisionTower(nn.Module):
    """LLaVA's vision tower: a ``CLIPVisionModel`` plus layer/feature selection."""

    def __init__(self, vision_tower: str, vision_config, select_layer: int = -2, select_feature: str = "patch"):
        super().__init__()
        from transformers import CLIPVisionModel

        if select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"mm_vision_select_feature must be 'patch' or 'cls_patch', got {select_feature!r}")
        self.vision_tower_name = vision_tower
        self.select_layer = int(select_layer)
        self.select_feature = select_feature
        self.vision_tower = CLIPVisionHolder(CLIPVisionModel(vision_config))
        self.image_processor = None

    # ---------------------------------------------------------------- loading
    def load_pretrained_weights(self, dtype: torch.dtype | None = None) -> None:
        """Replace the tower's weights by those of the CLIP checkpoint at ``vision_tower_name``."""
        from transformers import CLIPVisionModel

        device = next(self.vision_tower.parameters()).device
        device = device if device.type != "meta" else torch.device("cpu")
        model = CLIPVisionModel(self.config)
        missing, unexpected = model.load_state_dict(load_clip_vision_state(self.vision_tower_name), strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing:
            raise ValueError(f"vision tower checkpoint {self.vision_tower_name!r} is missing weights: {missing}")
        self.vision_tower.vision_model = model.to(device=device, dtype=dtype or torch.float32).eval()

    def load_image_processor(self):
        """The CLIP image processor, pinned to the PIL backend (LLaVA's numbers come from the PIL path)."""
        from transformers import CLIPImageProcessorPil

        if self.image_processor is None:
            self.image_processor = CLIPImageProcessorPil.from_pretrained(self.vision_tower_name)
        return self.image_processor

    # ---------------------------------------------------------------- geometry
    @property
    def config(self):
        return self.vision_tower.vision_model.config

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_patches_per_side(self) -> int:
        return self.config.image_size // self.config.patch_size

    @property
    def num_patches(self) -> int:
        return self.num_patches_per_side**2

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_tower.vision_model.dtype

    @property
    def device(self) -> torch.device:
        return self.vision_tower.vision_model.device

    # ---------------------------------------------------------------- forward
    def select_features(self, hidden: torch.Tensor) -> torch.Tensor:
        """(R, 1 + N, C) -> (R, N, C) for "patch", unchanged for "cls_patch"."""
        return hidden[:, 1:] if self.select_feature == "patch" else hidden

    @contextmanager
    def _capture_qk(self, layer_index: int) -> Iterator[dict[str, torch.Tensor]]:
        """Record the query/key projections of one encoder layer during a forward."""
        attn = self.vision_tower.vision_model.encoder.layers[layer_index].self_attn
        store: dict[str, torch.Tensor] = {}
        hooks = [
            attn.q_proj.register_forward_hook(lambda m, i, o: store.__setitem__("q", o)),
            attn.k_proj.register_forward_hook(lambda m, i, o: store.__setitem__("k", o)),
        ]
        try:
            yield store
        finally:
            for hook in hooks:
                hook.remove()

    def _attention_inputs(self, store: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """[CLS]->patch softmax attention (R, N) and patch keys (R, N, Dh), both averaged over heads."""
        heads = self.config.num_attention_heads
        q, k = store["q"].float(), store["k"].float()  # (R, 1 + N, C)
        r, t, c = k.shape
        q = q.view(r, t, heads, c // heads).transpose(1, 2)  # (R, h, 1+N, Dh)
        k = k.view(r, t, heads, c // heads).transpose(1, 2)
        logits = q[:, :, :1] @ k.transpose(-1, -2) / (c // heads) ** 0.5  # (R, h, 1, 1+N)
        cls_attention = logits.softmax(dim=-1)[:, :, 0, 1:].mean(dim=1)  # (R, N)
        keys = k[:, :, 1:].mean(dim=1)  # (R, N, Dh)
        return cls_attention, keys

    def forward(self, images: torch.Tensor, with_attention: bool = False) -> VisionOutput:
        """images (R, 3, H, W) -> VisionOutput with features (R, N, C) in the tower's dtype."""
        images = images.to(device=self.device, dtype=self.dtype)
        if not with_attention:
            out = self.vision_tower(images, output_hidden_states=True)
            return VisionOutput(self.select_features(out.hidden_states[self.select_layer]))
        layer = layer_index_of_hidden_state(self.select_layer, self.config.num_hidden_layers)
        with self._capture_qk(layer) as store:
            out = self.vision_tower(images, output_hidden_states=True)
        cls_attention, keys = self._attention_inputs(store)
        if self.select_feature == "cls_patch":
            raise ValueError("attention-based pruning (VisionZip) needs mm_vision_select_feature='patch'")
        return VisionOutput(self.select_features(out.hidden_states[self.select_layer]), cls_attention, keys)


class CLIPRelevanceEncoder(nn.Module):
    """CLIP text tower + visual projection of the same CLIP checkpoint, for query relevance."""

    def __init__(self, text_model: nn.Module, visual_projection: nn.Linear, tokenizer) -> None:
        super().__init__()
        self.text_model = text_model
        self.visual_projection = visual_projection
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"):
        from transformers import AutoTokenizer, CLIPTextModelWithProjection

        with quiet_loading():
            text_model = CLIPTextModelWithProjection.from_pretrained(path, dtype=dtype).eval()
        weight = read_checkpoint_tensor(path, "visual_projection.weight")  # (P, C)
        projection = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            projection.weight.copy_(weight)
        tokenizer = AutoTokenizer.from_pretrained(path)
        module = cls(text_model, projection.to(dtype or weight.dtype), tokenizer)
        return module.to(device)

    @property
    def context_length(self) -> int:
        return int(self.text_model.config.max_position_embeddings)

    def segment_ids(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (M, L) and attention mask (M, L) of the query cut into L-token segments (L = 77)."""
        if not isinstance(text, str):
            raise ValueError(f"texts must hold one query string per sample, got {type(text).__name__}")
        ids = torch.tensor(self.tokenizer(text).input_ids, dtype=torch.long)  # (T,) with BOS/EOS
        length = self.context_length
        segments = max(1, -(-ids.numel() // length))
        padded = ids.new_zeros(segments * length)
        mask = ids.new_zeros(segments * length)
        padded[: ids.numel()] = ids
        mask[: ids.numel()] = 1
        return padded.view(segments, length), mask.view(segments, length)

    @torch.no_grad()
    def embed_query(self, text: str) -> torch.Tensor:
        """One projected text embedding per 77-token segment of ``text`` -> (M, P)."""
        device = self.visual_projection.weight.device
        ids, mask = self.segment_ids(text)
        return self.text_model(input_ids=ids.to(device), attention_mask=mask.to(device)).text_embeds

    @torch.no_grad()
    def embed_image(self, features: torch.Tensor, post_layernorm: nn.Module) -> torch.Tensor:
        """features (R, N, C) selected-layer patch features -> (R, N, P) CLIP joint-space embeddings."""
        weight = self.visual_projection.weight
        return self.visual_projection(post_layernorm(features.to(weight.dtype)))
