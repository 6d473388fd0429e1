"""Relevance sources: where ``image_embeds`` / ``query_embeds`` (paper Eq. 3-4) come from.

Each source declares its sign (``negate``) — the one place the default sign is decided; the
layer passes it as the method's ``negate`` parameter unless the user gives one. The bare
``script_prune.select`` takes no side: its ``negate`` defaults to False, i.e. "relevant" means
"similar to the query" in whatever space the caller's embeddings live.

- ``clip_text`` (:class:`ClipText`): the CLIP text tower embeds the question (one embedding per
  77-token segment) and the vision tower's ``post_layernorm`` + CLIP's ``visual_projection`` map
  the selected-layer patch features to the joint space. Negated: with CLIP's penultimate-layer
  patch features the similarity to the text is inverted (CDPruner's maintainers; the authors'
  Script release and CDPruner both negate).
- ``llm_text`` (:class:`LLMText`): the LLM's own input embeddings of the question tokens (their
  mean, one query row) against the projected visual tokens. Not negated (OpenVINO GenAI's
  CDPruner port scores Qwen2-VL this way).

The question of a sample: the texts given by ``script_prune.patch.set_query`` if any, else its
real text tokens after its last image placeholder (all its text tokens if none follow).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .family import Family, VisualRows


@dataclass
class Query:
    """The question of every sample of one prefill.

    input_ids: (B, L) prompt ids; mask: (B, L) bool, the question tokens; texts: one string per
    sample when the user set them (``set_query``), else None.
    """

    input_ids: Tensor
    mask: Tensor
    texts: list[str] | None = None


def question_mask(input_ids: Tensor, real: Tensor, placeholder: Tensor) -> Tensor:
    """(B, L) bool: real text tokens after each sample's last placeholder (all text if none follow)."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    last = torch.where(placeholder, positions, -1).amax(dim=1, keepdim=True)  # (B, 1)
    text = real & ~placeholder
    after = text & (positions[None] > last)
    return torch.where(after.any(dim=1, keepdim=True), after, text)


#: A group of rows sharing one query shape: (row ids (G,) or None for every row in order, image_embeds (G, N, C),
#: query_embeds (G, M, C)).
Group = tuple[Tensor | None, Tensor, Tensor]


class RelevanceSource:
    """Base class: ``groups`` returns the method inputs for every visual row."""

    name: ClassVar[str] = ""
    negate: ClassVar[bool] = False

    def groups(self, model: nn.Module, family: Family, rows: VisualRows, query: Query, row_sample: Tensor) -> list[Group]:
        raise NotImplementedError


class LLMText(RelevanceSource):
    """The LLM's input embeddings of the question vs the projected visual tokens (not negated)."""

    name = "llm_text"
    negate = False

    def groups(self, model, family, rows, query, row_sample):
        embeds = family.embed_tokens(model)(query.input_ids.clamp(min=0)).float()  # (B, L, D)
        weights = query.mask.to(embeds.dtype)[..., None]  # (B, L, 1)
        mean = (embeds * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)  # (B, D), Eq. 3's mean query
        return [(None, rows.tokens, mean[row_sample][:, None, :])]  # every row: (R, N, D), (R, 1, D)


class ClipText(RelevanceSource):
    """CLIP's text tower + visual projection (negated, as the authors' release and CDPruner).

    text_model: a ``CLIPTextModelWithProjection``; visual_projection: CLIP's ``visual_projection``
    (``nn.Linear`` C -> P, or its (P, C) weight); tokenizer: CLIP's tokenizer; llm_tokenizer: decodes
    the question tokens when no texts were set with ``set_query`` (optional).
    """

    name = "clip_text"
    negate = True

    def __init__(self, text_model: nn.Module, visual_projection: nn.Module | Tensor, tokenizer: Any,
                 llm_tokenizer: Any = None) -> None:
        if isinstance(visual_projection, Tensor):
            weight = visual_projection
            visual_projection = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
            with torch.no_grad():
                visual_projection.weight.copy_(weight)
        self.text_model = text_model
        self.visual_projection = visual_projection
        self.tokenizer = tokenizer
        self.llm_tokenizer = llm_tokenizer

    def texts(self, query: Query) -> list[str]:
        if query.texts is not None:
            return query.texts
        if self.llm_tokenizer is None:
            raise ValueError("relevance 'clip_text' needs the question text: call script_prune.patch.set_query(model, "
                             "texts) or give ClipText(..., llm_tokenizer=...) to decode it from input_ids")
        ids = [row[m].tolist() for row, m in zip(query.input_ids, query.mask)]
        return [self.llm_tokenizer.decode(t, skip_special_tokens=True).strip() for t in ids]

    def segments(self, text: str) -> tuple[Tensor, Tensor]:
        """Token ids and mask (M, 77) of ``text`` cut into context-length segments (zero padded)."""
        ids = torch.tensor(self.tokenizer(text).input_ids, dtype=torch.long)
        width = int(self.text_model.config.max_position_embeddings)
        count = max(1, -(-ids.numel() // width))
        padded, mask = ids.new_zeros(count * width), ids.new_zeros(count * width)
        padded[: ids.numel()], mask[: ids.numel()] = ids, 1
        return padded.view(count, width), mask.view(count, width)

    @torch.no_grad()
    def groups(self, model, family, rows, query, row_sample):
        post_ln = family.vision_post_layernorm(model)
        if post_ln is None:
            raise ValueError(f"relevance 'clip_text' needs a CLIP vision tower with post_layernorm; {family.name} has none")
        weight = self.visual_projection.weight
        image = self.visual_projection.to(rows.vision_features.device)(post_ln(rows.vision_features).to(weight.dtype))
        texts = self.texts(query)
        if len(texts) != query.input_ids.shape[0]:
            raise ValueError(f"set_query gave {len(texts)} texts for a batch of {query.input_ids.shape[0]} prompts")
        device = image.device
        self.text_model.to(device)
        by_count: dict[int, list[int]] = {}
        segments = [self.segments(t) for t in texts]
        for sample, (ids, _) in enumerate(segments):
            by_count.setdefault(ids.shape[0], []).append(sample)
        out: list[Group] = []
        for samples in by_count.values():  # one group per segment count M (usually one)
            ids = torch.stack([segments[s][0] for s in samples]).flatten(0, 1).to(device)  # (S * M, 77)
            mask = torch.stack([segments[s][1] for s in samples]).flatten(0, 1).to(device)
            text = self.text_model(input_ids=ids, attention_mask=mask).text_embeds.view(len(samples), -1, image.shape[-1])
            if len(by_count) == 1:  # every sample in order: every row, no row ids to look up
                return [(None, image, text[row_sample])]
            slot = torch.full((query.input_ids.shape[0],), -1, dtype=torch.long, device=device)
            slot[torch.tensor(samples, device=device)] = torch.arange(len(samples), device=device)
            row_ids = (slot[row_sample] >= 0).nonzero().flatten()  # rows of these samples
            out.append((row_ids, image[row_ids], text[slot[row_sample[row_ids]]]))
        return out


SOURCES: dict[str, type[RelevanceSource]] = {"llm_text": LLMText}


def resolve_source(relevance: Any, family: Family, model_name: str) -> RelevanceSource | None:
    """``relevance`` given to ``apply`` (None, a name, or a source) -> a source or None."""
    if relevance is None:
        relevance = family.default_relevance
    if relevance is None or isinstance(relevance, RelevanceSource):
        return relevance
    if relevance == "clip_text":
        raise ValueError(f"relevance='clip_text' needs CLIP's text tower, which {model_name} does not hold: pass "
                         "relevance=script_prune.patch.ClipText(text_model, visual_projection, tokenizer)")
    if relevance not in SOURCES:
        raise ValueError(f"relevance must be one of {sorted(SOURCES) + ['clip_text']} or a RelevanceSource, got {relevance!r}")
    return SOURCES[relevance]()
