"""Original LLaVA checkpoints (``liuhaotian/*``, the toy checkpoint) as transformers' own classes.

An original checkpoint folder holds config.json (``"model_type": "llava"`` with LLaVA's ``mm_*`` keys and
``architectures`` ``LlavaLlamaForCausalLM`` / ``LlavaMistralForCausalLM``), the LLM + projector weights
(``model.*``, ``model.mm_projector.{0,2}.*``, ``lm_head.*``; LLaVA-1.6 also ``model.image_newline`` and its
fine-tuned vision tower ``model.vision_tower.vision_tower.*``) and names a CLIP checkpoint in
``mm_vision_tower``. This module maps that format onto ``LlavaForConditionalGeneration`` (LLaVA-1.5,
``image_aspect_ratio`` "pad" / "square") or ``LlavaNextForConditionalGeneration`` (``anyres`` +
``spatial_unpad``):

- config: :func:`hf_configs` (the text / vision sub-configs and the projector / feature-selection keys),
  :func:`hf_pinpoints` (LLaVA's grid pinpoints are (width, height), transformers' are (height, width));
- weights: :func:`convert_state_dict` (key prefixes), the CLIP folder's vision tower where the checkpoint
  ships none (LLaVA-1.5).

The original checkpoints have no image token in their vocabulary (LLaVA splices images at ``-200``
markers). :func:`load_converted` therefore appends one zero row to the input embeddings and sets
``image_token_id`` to the vocabulary size: an id no tokenizer produces; ``lm_head`` keeps the original
vocabulary, so logits keep their shape.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: (prefix in the original checkpoint, prefix in transformers' LLaVA classes), first match wins.
CHECKPOINT_TO_HF_PREFIX = (
    ("model.vision_tower.vision_tower.vision_model.", "model.vision_tower."),
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.image_newline", "model.image_newline"),
    ("model.", "model.language_model."),
    ("lm_head.", "lm_head."),
)
TEXT_ARCHITECTURES = {"LlavaLlamaForCausalLM": "llama", "LlavaMistralForCausalLM": "mistral"}
FEATURE_STRATEGIES = {"patch": "default", "cls_patch": "full"}
#: the config.json keys of the LLM that are copied into the text config when present
TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
             "rope_scaling", "attention_bias", "head_dim", "bos_token_id", "eos_token_id", "pad_token_id",
             "sliding_window")


def convert_state_dict(state: dict[str, Any]) -> dict[str, Any]:
    """Original LLaVA checkpoint names -> transformers' LLaVA names (keys no prefix matches are dropped)."""
    out = {}
    for key, value in state.items():
        for ours, theirs in CHECKPOINT_TO_HF_PREFIX:
            if key.startswith(ours):
                out[theirs + key[len(ours):]] = value
                break
    return out


def is_next(config: dict) -> bool:
    """LLaVA-NeXT layout (anyres crops, spatial unpad, image_newline) rather than LLaVA-1.5's one row per image."""
    return str(config.get("image_aspect_ratio", "")).startswith("anyres")


def hf_pinpoints(config: dict) -> list[list[int]]:
    """LLaVA's image_grid_pinpoints are (width, height) pairs, transformers' are (height, width): swapped, so
    both pick the same grid (it matters on ties, e.g. a square image between 1x2 and 2x1)."""
    return [[int(h), int(w)] for w, h in config["image_grid_pinpoints"]]


def text_config(config: dict):
    """The LLM's LlamaConfig / MistralConfig from LLaVA's config.json dict."""
    from transformers import LlamaConfig, MistralConfig

    archs = config.get("architectures") or []
    kind = next((TEXT_ARCHITECTURES[a] for a in archs if a in TEXT_ARCHITECTURES), None)
    if kind is None:
        raise ValueError(f"architectures {archs}: expected one of {sorted(TEXT_ARCHITECTURES)} (LLaVA's original format)")
    fields = {k: config[k] for k in TEXT_KEYS if k in config}
    if kind == "llama":
        fields.pop("sliding_window", None)
    return (LlamaConfig if kind == "llama" else MistralConfig)(tie_word_embeddings=False, **fields)


def vision_config(clip_path: str | os.PathLike):
    """CLIPVisionConfig of the CLIP checkpoint named by ``mm_vision_tower`` (a full CLIP or vision-only config)."""
    from transformers import CLIPVisionConfig

    local = Path(clip_path) / "config.json"
    if local.is_file():
        data = json.loads(local.read_text())
    else:
        from transformers.utils import cached_file

        try:
            data = json.loads(Path(cached_file(str(clip_path), "config.json")).read_text())
        except OSError as err:
            raise FileNotFoundError(f"mm_vision_tower {str(clip_path)!r}: no CLIP folder with a config.json and no "
                                    f"hub checkpoint of that name ({err})") from err
    vision = dict(data.get("vision_config", data))
    vision.pop("model_type", None)
    vision.pop("transformers_version", None)
    return CLIPVisionConfig(**vision)


def hf_configs(config: dict, clip_path: str | os.PathLike, image_token_id: int) -> dict[str, Any]:
    """Keyword arguments of transformers' LlavaConfig / LlavaNextConfig for an original config.json dict."""
    projector = config.get("mm_projector_type", "linear")
    if projector != "mlp2x_gelu":
        raise ValueError(f"mm_projector_type {projector!r}: transformers' LLaVA classes hold LLaVA-1.5's "
                         "two-layer GELU projector ('mlp2x_gelu') only")
    feature = config.get("mm_vision_select_feature", "patch")
    if feature not in FEATURE_STRATEGIES:
        raise ValueError(f"mm_vision_select_feature must be one of {sorted(FEATURE_STRATEGIES)}, got {feature!r}")
    kwargs: dict[str, Any] = dict(
        text_config=text_config(config), vision_config=vision_config(clip_path), image_token_id=image_token_id,
        vision_feature_layer=int(config.get("mm_vision_select_layer", -2)),
        vision_feature_select_strategy=FEATURE_STRATEGIES[feature], projector_hidden_act="gelu",
        multimodal_projector_bias=True, tie_word_embeddings=False,
    )
    if is_next(config):
        merge = str(config.get("mm_patch_merge_type", "flat"))
        if merge != "spatial_unpad":
            raise ValueError(f"anyres checkpoints with mm_patch_merge_type {merge!r}: transformers' LlavaNext "
                             "holds the 'spatial_unpad' layout only")
        kwargs["image_grid_pinpoints"] = hf_pinpoints(config)
    return kwargs


def build_hf_model(config: dict, clip_path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> nn.Module:
    """An empty (randomly initialised) transformers model of the right class for ``config`` (see module doc)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig, LlavaNextForConditionalGeneration

    vocab = int(config["vocab_size"])
    kwargs = hf_configs(config, clip_path, image_token_id=vocab)
    if is_next(config):
        model = LlavaNextForConditionalGeneration(LlavaNextConfig(**kwargs))
    else:
        model = LlavaForConditionalGeneration(LlavaConfig(**kwargs))
    embed = model.get_input_embeddings()
    model.set_input_embeddings(nn.Embedding(vocab + 1, embed.embedding_dim, padding_idx=embed.padding_idx))
    return model.to(dtype)


def original_name(key: str, tower: str = "model.vision_tower.") -> str:
    """transformers' LLaVA name -> the original checkpoint's name (for messages about missing weights)."""
    for ours, theirs in ((p, t.replace("model.vision_tower.", tower)) for p, t in CHECKPOINT_TO_HF_PREFIX):
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    return key


def vision_prefix(model: nn.Module) -> str:
    """Prefix of the vision tower's weights in ``model``'s state dict (``model.vision_tower.`` in transformers 5.24)."""
    suffix = "embeddings.patch_embedding.weight"
    key = next(k for k in model.state_dict() if k.startswith("model.vision_tower.") and k.endswith(suffix))
    return key[: -len(suffix)]


def load_converted(model: nn.Module, state: dict[str, torch.Tensor], vision_state: dict[str, torch.Tensor] | None,
                   source: str = "checkpoint") -> tuple[nn.Module, list[str]]:
    """Load an original checkpoint's weights into ``model`` (from :func:`build_hf_model`) -> (model in eval
    mode, unexpected checkpoint keys).

    state: the checkpoint's tensors under their original names; vision_state: CLIP vision weights named
    like ``CLIPVisionTransformer``'s (``embeddings.*``, ``encoder.*``, ...), used when the checkpoint ships no
    vision tower. Raises ValueError naming the weights the checkpoint lacks (a partial vision tower included);
    ``source`` names the checkpoint in those messages."""
    dtype = model.dtype
    converted = convert_state_dict(state)
    tower = vision_prefix(model)
    if tower != "model.vision_tower.":  # transformers releases that keep CLIPVisionModel's `vision_model.` level
        converted = {tower + k[len("model.vision_tower."):] if k.startswith("model.vision_tower.") else k: v
                     for k, v in converted.items()}
    unexpected = sorted(set(state) - {k for k in state if any(k.startswith(p) for p, _ in CHECKPOINT_TO_HF_PREFIX)})
    vision_keys = [k for k in model.state_dict() if k.startswith("model.vision_tower.")]
    shipped = [k for k in converted if k.startswith("model.vision_tower.")]
    if not shipped and vision_state is not None:
        converted.update({tower + k: v for k, v in vision_state.items()})
    elif shipped and len(shipped) < len([k for k in vision_keys if not k.endswith("position_ids")]):
        missing = sorted(original_name(k, tower) for k in set(vision_keys) - set(shipped) if not k.endswith("position_ids"))
        raise ValueError(f"{source} has a partial vision tower; missing: {missing}")
    embed_key = "model.language_model.embed_tokens.weight"
    if embed_key in converted:  # the image token's row (never produced by the tokenizer) stays zero
        weight = converted[embed_key]
        converted[embed_key] = torch.cat([weight, weight.new_zeros(1, weight.shape[1])])
    missing, extra = model.load_state_dict(converted, strict=False)
    missing = [original_name(k, tower) for k in missing if not k.endswith("position_ids")]
    if missing:
        raise ValueError(f"{source} is missing weights: {missing}")
    return model.to(dtype).eval(), sorted(unexpected + list(extra))


def load_checkpoint(model_path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, dict, list[str]]:
    """An original LLaVA checkpoint folder (or hub id) -> (transformers model, its config.json dict with
    ``mm_vision_tower`` resolved, unexpected checkpoint keys). See :func:`load_converted`."""
    from .builder import read_config_dict
    from .multimodal_encoder.clip_encoder import load_clip_vision_state, read_checkpoint_tensors, resolve_vision_tower_path

    config = read_config_dict(model_path)
    if not config.get("mm_vision_tower"):
        raise ValueError(f"config.json of {str(model_path)!r} has no mm_vision_tower: not a LLaVA checkpoint")
    config["mm_vision_tower"] = clip = resolve_vision_tower_path(config["mm_vision_tower"], model_path)
    state = read_checkpoint_tensors(str(model_path))
    shipped = any(k.startswith("model.vision_tower.") for k in state)
    model = build_hf_model(config, clip, dtype)
    model, unexpected = load_converted(model, state, None if shipped else load_clip_vision_state(clip),
                                       f"checkpoint {str(model_path)!r}")
    return model, config, unexpected
