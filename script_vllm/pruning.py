"""What the Script-enabled Qwen-VL classes share: the processor side and the model side, as mixins placed before
vLLM's own class of each family (qwen2_5_vl.py, qwen3_vl.py).

- Processor: a request with ``script_budget`` gets ``k`` placeholders per row (an image or one video frame)
  instead of all of them (``Settings.kept``), and every item carries the settings and the question
  (``settings.FIELD``); the question and settings enter the item's cache key, so the same image with another
  question or budget is encoded anew.
- Encoder (``embed_multimodal``): the stock vision tower, then ``script_prune.select`` on each row's projected
  tokens with ``llm_text`` relevance (the LLM's input embeddings of the question, their mean, not negated), as
  ``script_prune.patch`` does; kept tokens (all their channels: Qwen3-VL's DeepStack features ride along) in
  ascending order, each with its M-RoPE offset from its placeholder run's first position (positions.py).
- Positions: text tokens get the positions of the unpruned prompt when the request is added, kept tokens their
  original (t, h, w) positions once the encoder ran (``recompute_mrope_positions``, vLLM's pruning hook).
Requests without ``script_budget`` run the stock computation (all tokens kept, the same positions).

A family names its placeholder runs (``run_lengths``: the unpruned length of each run of one item) and the
offsets of an item's tokens from their run's first position (``item_offsets``); the rest is shared.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import Any, Mapping

import torch
from torch import Tensor

import script_prune as sp
from script_prune.patch.relevance import LLMText, question_mask
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.processing import PromptReplacement, PromptUpdateDetails

from . import positions as mrope
from .settings import FIELD, Settings, parse, strip


def shrink_runs(tokens: list[int], token: int, row: int, kept: int) -> list[int]:
    """``tokens`` with every run of ``token`` (``r`` rows of ``row`` placeholders each) cut to ``r * kept``."""
    out, i = [], 0
    while i < len(tokens):
        if tokens[i] != token:
            out.append(tokens[i])
            i += 1
            continue
        j = i
        while j < len(tokens) and tokens[j] == token:
            j += 1
        if (j - i) % row:
            raise ValueError(f"a placeholder run of {j - i} tokens is not a whole number of rows of {row}")
        out += [token] * ((j - i) // row * kept)
        i = j
    return out


class ScriptProcessingInfoMixin:
    def get_hf_processor(self, **kwargs: object):
        return super().get_hf_processor(**strip(kwargs))


class ScriptProcessorMixin:
    """Before a vLLM Qwen-VL multimodal processor: the short prompt and the per-item settings field."""

    def settings(self, kwargs: Mapping[str, object]) -> Settings | None:
        """The request's settings (server defaults merged in) with its question, or None."""
        merged = self.info.ctx.get_merged_mm_kwargs(kwargs)
        settings = parse(merged)
        return None if settings is None else replace(settings, query=tuple(merged.get("script_query", ())))

    def placeholder_tail(self, modality: str) -> list[int]:
        """Text tokens the stock expansion of an item puts after its last placeholder (none by default)."""
        return []

    def apply(self, inputs, timing_ctx):
        """The question (the expanded prompt's ids after its last visual placeholder, as ``script_prune.patch``
        reads them in transformers) joins the kwargs, hence the item hashes."""
        if parse(self.info.ctx.get_merged_mm_kwargs(inputs.hf_processor_mm_kwargs)) is not None:
            config = self.info.get_hf_config()
            prompt = list(inputs.prompt)
            slots = [i for i, t in enumerate(prompt) if t in (config.image_token_id, config.video_token_id)]
            if slots:
                last = slots[-1]
                prompt[last + 1:last + 1] = self.placeholder_tail(
                    "image" if prompt[last] == config.image_token_id else "video")
            ids = torch.tensor(prompt, dtype=torch.long)[None]  # (1, L)
            placeholder = (ids == config.image_token_id) | (ids == config.video_token_id)
            question = ids[question_mask(ids, torch.ones_like(placeholder), placeholder)].tolist()
            inputs = replace(inputs, hf_processor_mm_kwargs={**inputs.hf_processor_mm_kwargs, "script_query": question})
        return super().apply(inputs, timing_ctx)

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]):
        return super()._call_hf_processor(hf_data, strip(hf_kwargs))

    def _apply_hf_processor_main(self, mm_items, hf_kwargs: Mapping[str, object]):
        settings = self.settings(hf_kwargs)
        out = super()._apply_hf_processor_main(mm_items, strip(hf_kwargs))
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
        """The stock replacements with every row's run of placeholders cut to the resolved budget (text between
        runs, such as Qwen3-VL's frame timestamps, stays)."""
        settings = self.settings(hf_processor_mm_kwargs)
        updates = super()._get_prompt_updates(mm_items, strip(hf_processor_mm_kwargs), out_mm_kwargs)
        if settings is None:
            return updates
        config = self.info.get_hf_config()
        merge = config.vision_config.spatial_merge_size
        tokens = {"image": config.image_token_id, "video": config.video_token_id}

        def replacement(item_idx: int, modality: str, stock: Any) -> Any:
            _, h, w = out_mm_kwargs[modality][item_idx][f"{modality}_grid_thw"].data.tolist()
            row = h * w // merge ** 2
            full = stock(item_idx) if callable(stock) else stock
            details = isinstance(full, PromptUpdateDetails)
            short = shrink_runs(list(full.full if details else full), tokens[modality], row, settings.kept(row))
            return PromptUpdateDetails.select_token_id(short, tokens[modality]) if details else short

        return [PromptReplacement(modality=u.modality, target=u.target,
                                  replacement=functools.partial(replacement, modality=u.modality, stock=u.replacement))
                for u in updates]


def _item_requests(value: Any, count: int) -> list[Settings | None]:
    """The per-item field of a batch (a (items, bytes) tensor or a list of (bytes,) tensors) -> settings."""
    if value is None:
        return [None] * count
    return [Settings.decode_optional(blob) for blob in value]


class ScriptModelMixin:
    """Before a vLLM Qwen-VL model class: per-request pruning in the encoder, exact M-RoPE positions."""

    #: read by the runner hook (``script_vllm.register``): turns on vLLM's pruning path for this model
    script_prune = True

    def __init__(self, *, vllm_config, prefix: str = ""):  # vLLM reads these names off the signature
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        if self.is_multimodal_pruning_enabled:
            raise ValueError("script_vllm: --video-pruning-rate (vLLM's EVS) cannot be combined with the Script plugin; "
                             "prune videos per request with mm_processor_kwargs={'script_budget': ...} instead")

    # -- what a family says ----------------------------------------------------------------------
    def run_lengths(self, modality: str, grid: list[int]) -> list[int]:
        """Unpruned lengths of an item's placeholder runs, in prompt order."""
        raise NotImplementedError

    def item_offsets(self, modality: str, grid: list[int], item_input: Mapping[str, Any], i: int) -> Tensor:
        """(3, t * n) offsets of the item's tokens from the first position of their placeholder run."""
        raise NotImplementedError

    def selection_width(self) -> int | None:
        """Channels of an encoder output row that are the visual token (the rest ride along); None: all."""
        return None

    # -- encoder ---------------------------------------------------------------------------------
    def embed_multimodal(self, **kwargs: object):
        requests = {modality: kwargs.pop(field, None) for modality, field in FIELD.items()}
        by_modality = self._parse_and_validate_multimodal_inputs(**kwargs)
        out: tuple[Tensor, ...] = ()
        for modality, item_input in by_modality.items():  # the order of the stock model
            embeds = (self._process_image_input if modality == "image" else self._process_video_input)(item_input)
            grids = item_input[f"{modality}_grid_thw"].tolist()
            settings = _item_requests(requests[modality], len(grids))
            for i, (tokens, grid) in enumerate(zip(embeds, grids)):
                offsets = self.item_offsets(modality, grid, item_input, i).to(tokens.device)
                out += (self.prune_item(tokens, grid, offsets, settings[i]),)
        return out

    def query_embedding(self, query: tuple[int, ...], like: Tensor) -> Tensor:
        """(1, D) float32: the mean of the LLM's input embeddings of the question tokens (Eq. 3's mean query)."""
        if not query:
            return like.new_zeros(1, like.shape[-1], dtype=torch.float32)
        ids = torch.tensor(query, dtype=torch.long, device=like.device)
        embeds = self.language_model.embed_input_ids(ids).float()  # (M, D)
        return embeds.sum(dim=0, keepdim=True) / len(query)

    def prune_item(self, tokens: Tensor, grid: list[int], offsets: Tensor, settings: Settings | None) -> Tensor:
        """One image / video: (t * n, C) encoder rows -> (kept, C + CHANNELS) kept rows with their offsets."""
        merge = self.visual.spatial_merge_size
        t, n = grid[0], grid[1] * grid[2] // merge ** 2
        if settings is None or settings.kept(n) == n:
            index = torch.arange(t * n, device=tokens.device)
        else:
            visual = tokens[:, : self.selection_width()]  # (t * n, D)
            index = self.select(visual.reshape(t, n, -1), settings).flatten()  # (t * k,) into the item
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
        text token; every visual slot holds its run's first position until ``recompute_mrope_positions``."""
        visual = {self.config.image_token_id, self.config.video_token_id}
        full_tokens: list[int] = []  # the unpruned prompt
        index: list[int] = []  # short prompt position -> unpruned prompt position
        full_features, taken = [], 0

        def copy_text(stop: int) -> None:
            index.extend(range(len(full_tokens), len(full_tokens) + stop - taken))
            full_tokens.extend(input_tokens[taken:stop])

        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            start, end = feature.mm_position.offset, feature.mm_position.offset + feature.mm_position.length
            copy_text(start)
            taken, begin = start, len(full_tokens)
            runs = iter(self.run_lengths(feature.modality, feature.data[f"{feature.modality}_grid_thw"].data.tolist()))
            while taken < end:
                stop = taken
                while stop < end and input_tokens[stop] in visual and input_tokens[stop] == input_tokens[taken]:
                    stop += 1
                if stop == taken:  # text inside the item (timestamps, frame brackets)
                    copy_text(taken + 1)
                    taken += 1
                    continue
                index.extend([len(full_tokens)] * (stop - taken))
                full_tokens.extend([input_tokens[taken]] * next(runs))
                taken = stop
            full_features.append(replace(feature, mm_position=replace(
                feature.mm_position, offset=begin, length=len(full_tokens) - begin, is_embed=None)))
        copy_text(len(input_tokens))
        positions, _ = super().get_mrope_input_positions(full_tokens, full_features)  # (3, L_full)
        short = positions[:, torch.tensor(index, dtype=torch.long)]
        return short, int(short.max()) + 1 - len(input_tokens) if len(input_tokens) else 0

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens):
        """Kept tokens at their original positions: slot position (its run's first) + carried offset."""
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
