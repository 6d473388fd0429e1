"""Qwen2.5-VL in vLLM with query-conditioned visual-token pruning (registered over the built-in class).

- Processor: a request with ``script_budget`` gets ``k`` placeholders per image / frame instead of all of them
  (``Settings.kept``), and every item carries the settings and the question (``settings.FIELD``); the question
  and settings enter the item's cache key, so the same image with another question or budget is encoded anew.
- Encoder (``embed_multimodal``): the stock vision tower, then ``script_prune.select`` on each row's projected
  tokens with ``llm_text`` relevance (the LLM's input embeddings of the question, their mean, not negated), as
  ``script_prune.patch`` does; kept tokens in ascending order, each with its M-RoPE offset (positions.py).
- Positions: text tokens get the positions of the unpruned prompt when the request is added, kept tokens their
  original (t, h, w) positions once the encoder ran (``recompute_mrope_positions``, vLLM's pruning hook).
Requests without ``script_budget`` run the stock computation (all tokens kept, the same positions).
"""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import Any, Mapping

import torch
from torch import Tensor

import script_prune as sp
from script_prune.patch.relevance import LLMText, question_mask
from vllm.model_executor.models.qwen2_5_vl import (Qwen2_5_VLDummyInputsBuilder, Qwen2_5_VLForConditionalGeneration,
                                                   Qwen2_5_VLMultiModalProcessor, Qwen2_5_VLProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.processing import PromptReplacement

from . import positions as mrope
from .settings import FIELD, Settings, parse, strip


class ScriptQwen2_5_VLProcessingInfo(Qwen2_5_VLProcessingInfo):
    def get_hf_processor(self, **kwargs: object):
        return super().get_hf_processor(**strip(kwargs))


class ScriptQwen2_5_VLMultiModalProcessor(Qwen2_5_VLMultiModalProcessor):
    def settings(self, kwargs: Mapping[str, object]) -> Settings | None:
        """The request's settings (server defaults merged in) with its question, or None."""
        merged = self.info.ctx.get_merged_mm_kwargs(kwargs)
        settings = parse(merged)
        return None if settings is None else replace(settings, query=tuple(merged.get("script_query", ())))

    def apply(self, inputs, timing_ctx):
        """The question (prompt ids after the last visual placeholder) joins the kwargs, hence the item hashes."""
        if parse(self.info.ctx.get_merged_mm_kwargs(inputs.hf_processor_mm_kwargs)) is not None:
            config = self.info.get_hf_config()
            ids = torch.tensor(inputs.prompt, dtype=torch.long)[None]  # (1, L)
            placeholder = (ids == config.image_token_id) | (ids == config.video_token_id)
            question = ids[question_mask(ids, torch.ones_like(placeholder), placeholder)].tolist()
            inputs = replace(inputs, hf_processor_mm_kwargs={**inputs.hf_processor_mm_kwargs, "script_query": question})
        return super().apply(inputs, timing_ctx)

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]):
        settings = self.settings(hf_kwargs)
        out = super()._call_hf_processor(hf_data, strip(hf_kwargs))
        blob = Settings.encode_optional(settings)
        for modality, field in FIELD.items():
            grid = out.get(f"{modality}_grid_thw")
            if grid is not None:
                out[field] = blob[None].expand(grid.shape[0], -1).clone()  # (items, bytes)
        return out

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs) -> Mapping[str, MultiModalFieldConfig]:
        return dict(**super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs),
                    **{field: MultiModalFieldConfig.batched(modality, keep_on_cpu=True)
                       for modality, field in FIELD.items()})

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        settings = self.settings(hf_processor_mm_kwargs)
        updates = super()._get_prompt_updates(mm_items, strip(hf_processor_mm_kwargs), out_mm_kwargs)
        if settings is None:
            return updates
        merge = self.info.get_hf_config().vision_config.spatial_merge_size

        def replacement(item_idx: int, modality: str, token: int) -> list[int]:
            t, h, w = out_mm_kwargs[modality][item_idx][f"{modality}_grid_thw"].data.tolist()
            return [token] * (t * settings.kept(h * w // merge ** 2))

        config = self.info.get_hf_config()
        tokens = {"image": config.image_token_id, "video": config.video_token_id}
        return [PromptReplacement(modality=u.modality, target=u.target,
                                  replacement=functools.partial(replacement, modality=u.modality,
                                                                token=tokens[u.modality]))
                for u in updates]


def _item_requests(value: Any, count: int) -> list[Settings | None]:
    """The per-item field of a batch (a (items, bytes) tensor or a list of (bytes,) tensors) -> settings."""
    if value is None:
        return [None] * count
    return [Settings.decode_optional(blob) for blob in value]


@MULTIMODAL_REGISTRY.register_processor(ScriptQwen2_5_VLMultiModalProcessor, info=ScriptQwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class ScriptQwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL whose requests may prune their visual tokens (``mm_processor_kwargs``, see settings.py)."""

    #: read by the runner hook (``script_vllm.register``): turns on vLLM's pruning path for this model
    script_prune = True

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        if self.is_multimodal_pruning_enabled:
            raise ValueError("script_vllm: --video-pruning-rate (vLLM's EVS) cannot be combined with the Script plugin; "
                             "prune videos per request with mm_processor_kwargs={'script_budget': ...} instead")

    # -- encoder ---------------------------------------------------------------------------------
    def embed_multimodal(self, **kwargs: object):
        requests = {modality: kwargs.pop(field, None) for modality, field in FIELD.items()}
        by_modality = self._parse_and_validate_multimodal_inputs(**kwargs)
        out: tuple[Tensor, ...] = ()
        for modality, item_input in by_modality.items():  # the order of the stock model
            if modality == "image":
                embeds, factors = self._process_image_input(item_input), None
            else:
                embeds = self._process_video_input(item_input)
                seconds = item_input.get("second_per_grid_ts")
                factors = None if seconds is None else seconds.tolist()
            grids = item_input[f"{modality}_grid_thw"].tolist()
            settings = _item_requests(requests[modality], len(grids))
            for i, (tokens, grid) in enumerate(zip(embeds, grids)):
                t_factor = 1.0 if modality == "image" else self.t_factor(None if factors is None else factors[i])
                out += (self.prune_item(tokens, grid, t_factor, settings[i]),)
        return out

    def t_factor(self, second_per_grid: float | None) -> float:
        """Temporal position step of a video's grid steps (seconds per step x tokens per second)."""
        tokens_per_second = getattr(self.config.vision_config, "tokens_per_second", 1.0)
        return (1.0 if second_per_grid is None else float(second_per_grid)) * tokens_per_second

    def query_embedding(self, query: tuple[int, ...], like: Tensor) -> Tensor:
        """(1, D) float32: the mean of the LLM's input embeddings of the question tokens (Eq. 3's mean query)."""
        if not query:
            return like.new_zeros(1, like.shape[-1], dtype=torch.float32)
        ids = torch.tensor(query, dtype=torch.long, device=like.device)
        embeds = self.language_model.embed_input_ids(ids).float()  # (M, D)
        return embeds.sum(dim=0, keepdim=True) / len(query)

    def prune_item(self, tokens: Tensor, grid: list[int], t_factor: float, settings: Settings | None) -> Tensor:
        """One image / video: (t * n, D) projected tokens -> (kept, D + CHANNELS) kept tokens with their offsets."""
        merge = self.visual.spatial_merge_size
        t, h, w = grid[0], grid[1] // merge, grid[2] // merge
        n = h * w
        offsets = mrope.grid_offsets(t, h, w, t_factor).to(tokens.device)  # (3, t * n)
        if settings is None or settings.kept(n) == n:
            index = torch.arange(t * n, device=tokens.device)
        else:
            index = self.select(tokens.view(t, n, -1), settings).flatten()  # (t * k,) into the item
        return torch.cat([tokens[index], mrope.encode(offsets[:, index], tokens.dtype)], dim=1)

    def select(self, rows: Tensor, settings: Settings) -> Tensor:
        """Kept token indices (t, k) into the item, ascending per row: ``script_prune.select`` per frame."""
        t, n, _ = rows.shape
        spec = sp.get_method(settings.method)
        params = dict(settings.params)
        if "negate" in spec.params and "negate" not in params:
            params["negate"] = LLMText.negate
        image_embeds = query_embeds = None
        if spec.needs_relevance:
            image_embeds = rows
            query_embeds = self.query_embedding(settings.query, rows)[None].expand(t, 1, -1)  # (t, 1, D)
        picked = sp.select(rows, settings.kept(n), settings.method, image_embeds=image_embeds,
                           query_embeds=query_embeds, **params)  # (t, k)
        picked = picked.sort(dim=1).values
        return picked + torch.arange(t, device=rows.device)[:, None] * n

    # -- positions -------------------------------------------------------------------------------
    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list) -> tuple[Tensor, int]:
        """Positions of the (possibly shortened) prompt: the stock positions of the unpruned prompt at every
        text token; every visual slot holds its item's first position until ``recompute_mrope_positions``."""
        merge = self.config.vision_config.spatial_merge_size
        full_features, index, taken, shift = [], [], 0, 0
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            start, length = feature.mm_position.offset, feature.mm_position.length
            t, h, w = feature.data[f"{feature.modality}_grid_thw"].data.tolist()
            full = t * h * w // merge ** 2
            index += [i + shift for i in range(taken, start)] + [start + shift] * length
            full_features.append(replace(feature, mm_position=replace(feature.mm_position, offset=start + shift,
                                                                      length=full)))
            shift += full - length
            taken = start + length
        index += [i + shift for i in range(taken, len(input_tokens))]
        full_tokens = [0] * (len(input_tokens) + shift)  # the stock rule reads only the length and the features
        positions, _ = super().get_mrope_input_positions(full_tokens, full_features)  # (3, L_full)
        short = positions[:, torch.tensor(index, dtype=torch.long)]
        return short, int(short.max()) + 1 - len(input_tokens) if len(input_tokens) else 0

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens):
        """Kept tokens at their original positions: slot position (the item's first) + carried offset."""
        embeds = [e[:, :-mrope.CHANNELS] for e in multimodal_embeddings]
        if not multimodal_embeddings:
            return embeds, mrope_positions, int(mrope_positions.max()) + 1 - mrope_positions.shape[1]
        device = mrope_positions.device
        offsets = mrope.decode(torch.cat([e[:, -mrope.CHANNELS:] for e in multimodal_embeddings]).to(device))
        ids = torch.as_tensor(input_ids, device=device)
        slot = ((ids == self.config.image_token_id) | (ids == self.config.video_token_id)).nonzero().flatten()
        slot = slot[slot >= num_computed_tokens][: offsets.shape[1]]  # this step's visual slots, in order
        positions = mrope_positions.clone()
        positions[:, slot] = mrope_positions[:, slot] + offsets
        return embeds, positions, int(positions.max()) + 1 - positions.shape[1]
