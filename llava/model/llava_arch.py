"""LLaVA's public model API on transformers' own ``LlavaForConditionalGeneration`` / ``LlavaNextForConditionalGeneration``.

:class:`LlavaAdapter` (what ``load_pretrained_model`` returns) holds the transformers model (``.hf``, loaded
from an original checkpoint by ``llava.model.convert``) and keeps what LLaVA's code calls:
``generate(ids, images=, image_sizes=, texts=)`` and ``forward`` with ``IMAGE_TOKEN_INDEX`` (-200) markers,
``config`` (LLaVA's config.json keys, read by ``mm_utils.process_images``), ``set_pruning`` and
``last_visual_token_counts``. It does no model work itself:

- every ``-200`` marker becomes a run of the model's ``image_token_id`` as long as the stock model fills
  (LLaVA-1.5: the crop's tokens; NeXT: base crop + unpadded tile grid + one newline per grid row);
- pixels come from ``mm_utils.process_images`` (the PIL path, docs/preprocessing.md); NeXT views are padded
  to one (I, V, 3, S, S) tensor and LLaVA's (width, height) sizes become transformers' (height, width);
- ``set_pruning`` is ``script_prune.patch.apply`` (relevance: CLIP's text tower, ``ClipText``), the
  question texts go to ``script_prune.patch.set_query``, counts come from ``script_prune.patch.visual_tokens``;
- tools that draw or time the vision side read it through :meth:`LlavaAdapter.visual_rows` (the layer's
  ``Family.encode``) and :meth:`LlavaAdapter.clip_embeddings` (the ``ClipText`` source), never model internals.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Sequence

import torch
from torch import nn

import script_prune as sp
from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX

from .pruning import PruningConfig, as_pruning_config

# The assistant-turn opener that ends a prompt (vicuna/llava_v1, mistral_instruct, chatml_direct, llava_v0).
_ROLE_TAIL = re.compile(r"\s*(ASSISTANT:|\[/INST\]|<\|im_end\|>\s*<\|im_start\|>\s*assistant|###\s*Assistant:?)\s*$")


def _image_list(images: Any) -> list[torch.Tensor]:
    """``images`` (Tensor (B,3,S,S) | (B,V,3,S,S) | list of (3,S,S) / (V,3,S,S)) -> one (V, 3, S, S) per image."""
    if isinstance(images, torch.Tensor) and images.dim() in (4, 5):
        return list(images) if images.dim() == 5 else [img[None] for img in images]
    if isinstance(images, (list, tuple)) and all(isinstance(i, torch.Tensor) and i.dim() in (3, 4) for i in images):
        return [img[None] if img.dim() == 3 else img for img in images]
    raise ValueError("images must be a (B, 3, H, W) / (B, V, 3, H, W) tensor or a list of (3, H, W) / (V, 3, H, W) tensors")


class LlavaAdapter(nn.Module):
    """See the module docstring. ``hf``: the transformers model; ``config``: LLaVA's config (a PretrainedConfig
    holding config.json's keys); ``clip_path``: the CLIP checkpoint (relevance's text tower)."""

    def __init__(self, hf: nn.Module, config: Any, clip_path: str) -> None:
        super().__init__()
        self.hf = hf
        self.config = config
        self.clip_path = clip_path
        self._query_tokenizer = None
        self._relevance: sp.patch.ClipText | None = None
        self._pruning: PruningConfig | None = None
        self._counts: list[int] = []

    # ------------------------------------------------------------------ accessors / settings
    @property
    def next_layout(self) -> bool:
        return type(self.hf).__name__.startswith("LlavaNext")

    @property
    def device(self) -> torch.device:
        return self.hf.device

    @property
    def dtype(self) -> torch.dtype:
        return self.hf.dtype

    @property
    def num_patches_per_side(self) -> int:
        vision = self.hf.config.vision_config
        return vision.image_size // vision.patch_size

    @property
    def num_patches(self) -> int:
        return self.num_patches_per_side ** 2

    @property
    def pruning(self) -> PruningConfig | None:
        return self._pruning

    @property
    def last_visual_token_counts(self) -> list[int]:
        """Visual tokens (incl. NeXT newlines) that reached the LLM per prompt at the last forward / generate
        (in-LLM methods: those left after layer K)."""
        return list(self._counts)

    def kept_tokens(self) -> list[torch.Tensor] | None:
        """Kept token indices of every visual row of the last pruned prefill (``script_prune.patch.kept``;
        one row per image / NeXT crop, ascending), or None when the model is not pruned."""
        return sp.patch.kept(self.hf) if sp.patch.is_patched(self.hf) else None

    def set_query_tokenizer(self, tokenizer) -> None:
        """Tokenizer that recovers the question from input_ids when generate / forward get no ``texts``."""
        self._query_tokenizer = tokenizer

    def relevance_source(self) -> sp.patch.ClipText:
        """CLIP's text tower + visual projection of ``mm_vision_tower`` (loaded on first use)."""
        if self._relevance is None:
            from .multimodal_encoder.clip_encoder import CLIPRelevanceEncoder

            self._relevance = CLIPRelevanceEncoder.from_pretrained(self.clip_path, dtype=self.dtype, device=self.device)
        return self._relevance

    def set_pruning(self, pruning: PruningConfig | dict | None) -> None:
        """Set (or clear with None) the pruning: ``script_prune.patch.apply`` on the transformers model."""
        cfg, previous = as_pruning_config(pruning), self._pruning
        if sp.patch.is_patched(self.hf):
            sp.patch.remove(self.hf)
        self._pruning = None
        try:
            self._apply(cfg)
        except Exception:
            self._apply(previous)  # a refused setting leaves the previous one in place
            raise

    def _apply(self, cfg: PruningConfig | None) -> None:
        if cfg is not None:
            relevance = self.relevance_source() if cfg.needs_relevance else None
            sp.patch.apply(self.hf, cfg.method, budget=cfg.visual_token_num, relevance=relevance, **cfg.method_params())
        self._pruning = cfg

    # ------------------------------------------------------------------ inputs
    def _tokens_per_image(self, views: torch.Tensor, size: tuple[int, int] | None) -> int:
        """Placeholder tokens the stock model fills for one image (views (V, 3, S, S), size (width, height))."""
        vision = self.hf.config.vision_config
        side = vision.image_size // vision.patch_size
        base = side * side + (self.hf.config.vision_feature_select_strategy == "full")
        if not self.next_layout:
            return base
        if size is None:
            raise ValueError("image_sizes (original (width, height) per image) is required for anyres images")
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

        height_width = [int(size[1]), int(size[0])]
        rows, cols = get_anyres_image_grid_shape(height_width, self.hf.config.image_grid_pinpoints, vision.image_size)
        grid = unpad_image(torch.zeros(1, rows * side, cols * side), torch.tensor(height_width))
        return base + grid.shape[1] * (grid.shape[2] + 1)

    def _query_texts(self, texts: Sequence[str] | None, input_ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
        """The per-sample query for relevance: ``texts`` if given, else the prompt's text after its last <image>."""
        from llava.mm_utils import strip_short_answer_prompt

        if texts is not None:
            texts = [texts] if isinstance(texts, str) else list(texts)
            if len(texts) != input_ids.shape[0]:
                raise ValueError(f"texts must hold one query per sample ({input_ids.shape[0]}), got {len(texts)}")
            return [strip_short_answer_prompt(t) for t in texts]
        if self._query_tokenizer is None:
            raise ValueError(f"pruning method {self._pruning.method!r} needs the question text: pass texts=[query per sample]")
        queries = []
        for ids, real in zip(input_ids, mask):
            ids = ids[real]
            marks = (ids == IMAGE_TOKEN_INDEX).nonzero()
            tail = ids[int(marks[-1]) + 1:] if len(marks) else ids
            text = _ROLE_TAIL.sub("", self._query_tokenizer.decode(tail[tail >= 0], skip_special_tokens=True)).strip()
            queries.append(strip_short_answer_prompt(text))
        return queries

    def prepare_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, images: Any,
                       image_sizes: Any, texts: Sequence[str] | None, labels: torch.Tensor | None = None,
                       padding_side: str = "left") -> dict[str, Any]:
        """transformers' inputs for LLaVA's: -200 markers expanded, pixels stacked, prompts re-padded."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError("input_ids must be a (B, L) tensor holding IMAGE_TOKEN_INDEX (-200) for every <image>")
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        per_sample = ((input_ids == IMAGE_TOKEN_INDEX) & mask).sum(dim=1).tolist()
        if images is None:
            if any(per_sample):
                raise ValueError("input_ids contain <image> tokens (IMAGE_TOKEN_INDEX) but no images were given")
            return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if not all(per_sample):
            missing = [b for b, n in enumerate(per_sample) if n == 0]
            raise ValueError(f"input_ids of sample(s) {missing} hold no <image> token (IMAGE_TOKEN_INDEX="
                             f"{IMAGE_TOKEN_INDEX}): the prompt must contain '<image>', tokenised with tokenizer_image_token")
        views = _image_list(images)
        if len(views) != sum(per_sample):
            raise ValueError(f"input_ids hold {sum(per_sample)} <image> token(s) ({per_sample} per sample) but "
                             f"{len(views)} image(s) were given: every prompt needs one <image> token per image")
        sizes = [None] * len(views) if image_sizes is None else [tuple(int(x) for x in s) for s in image_sizes]
        if len(sizes) != len(views):
            raise ValueError(f"image_sizes has {len(sizes)} entries for {len(views)} images")
        counts = iter([self._tokens_per_image(v, s) for v, s in zip(views, sizes)])
        token = int(self.hf.config.image_token_id)
        rows, label_rows = [], []
        for b in range(input_ids.shape[0]):
            ids, lab = input_ids[b][mask[b]], None if labels is None else labels[b][mask[b]]
            pieces, lab_pieces, start = [], [], 0
            for at in (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist() + [ids.numel()]:
                pieces.append(ids[start:at])
                if lab is not None:
                    lab_pieces.append(lab[start:at])
                if at < ids.numel():
                    n = next(counts)
                    pieces.append(ids.new_full((n,), token))
                    if lab is not None:
                        lab_pieces.append(lab.new_full((n,), IGNORE_INDEX))
                start = at + 1
            rows.append(torch.cat(pieces))
            label_rows.append(None if lab is None else torch.cat(lab_pieces))
        length = max(r.numel() for r in rows)
        self._warn_if_llava_would_truncate(length)
        out_ids = input_ids.new_zeros(len(rows), length)
        out_mask = torch.zeros(len(rows), length, dtype=torch.long, device=input_ids.device)
        out_labels = None if labels is None else labels.new_full((len(rows), length), IGNORE_INDEX)
        for b, row in enumerate(rows):
            span = slice(length - row.numel(), length) if padding_side == "left" else slice(0, row.numel())
            out_ids[b, span], out_mask[b, span] = row, 1
            if out_labels is not None:
                out_labels[b, span] = label_rows[b]
        inputs: dict[str, Any] = {"input_ids": out_ids, "attention_mask": out_mask, "labels": out_labels}
        inputs.update(self._pixel_inputs(views, sizes))
        if self._pruning is not None and self._pruning.needs_relevance:
            sp.patch.set_query(self.hf, self._query_texts(texts, input_ids, mask))
        return inputs

    def _warn_if_llava_would_truncate(self, length: int) -> None:
        """LLaVA cuts the expanded prompt (text + every visual token) to ``tokenizer_model_max_length`` before
        the LLM; this adapter does not (the whole prompt reaches the model). Say so when it makes a difference."""
        limit = getattr(self.config, "tokenizer_model_max_length", None)
        if limit is not None and length > int(limit):
            warnings.warn(f"the expanded prompt holds {length} tokens (text + unpruned visual tokens), more than "
                          f"tokenizer_model_max_length={int(limit)}: LLaVA's own code would cut it to that length "
                          "(dropping the end of the prompt); here the whole prompt reaches the model", stacklevel=3)

    def _pixel_inputs(self, views: list[torch.Tensor], sizes: list) -> dict[str, torch.Tensor]:
        """pixel_values (I, 3, S, S) / NeXT (I, V, 3, S, S) zero-padded views + image_sizes (I, 2) as (h, w)."""
        out = {}
        if self.next_layout:
            if any(s is None for s in sizes):
                raise ValueError("image_sizes (original (width, height) per image) is required for anyres images")
            width = max(v.shape[0] for v in views)
            pixels = views[0].new_zeros(len(views), width, *views[0].shape[1:])
            for i, v in enumerate(views):
                pixels[i, : v.shape[0]] = v
            out["image_sizes"] = torch.tensor([[s[1], s[0]] for s in sizes], device=self.device)
        else:
            pixels = torch.cat(views)
        out["pixel_values"] = pixels.to(self.device, self.dtype)
        return out

    def _record_counts(self, inputs: dict[str, Any], prompts: int) -> None:
        if "pixel_values" not in inputs:
            self._counts = [0] * prompts
        elif sp.patch.is_patched(self.hf):
            counts = sp.patch.visual_tokens(self.hf)
            self._counts = counts[:: max(1, len(counts) // prompts)] if prompts else counts
        else:
            self._counts = ((inputs["input_ids"] == self.hf.config.image_token_id)
                            & inputs["attention_mask"].bool()).sum(dim=1).tolist()

    # ------------------------------------------------------------------ vision side, for tools
    @torch.no_grad()
    def visual_rows(self, images: Any, image_sizes: Any = None, needs: Sequence[str] = ()) -> sp.patch.VisualRows:
        """The visual rows of ``images`` as the layer sees them (``Family.encode``): projected tokens (R, N, D),
        vision features (R, N, C) and the method inputs ``needs`` names (VisionZip's cls_attention / keys)."""
        views = _image_list(images)
        sizes = [None] * len(views) if image_sizes is None else [tuple(int(x) for x in s) for s in image_sizes]
        return sp.patch.family_of(self.hf).encode(self.hf, self._pixel_inputs(views, sizes), frozenset(needs))

    @torch.no_grad()
    def clip_embeddings(self, features: torch.Tensor, query: str) -> dict[str, torch.Tensor]:
        """CLIP joint-space embeddings of vision features (R, N, C) -> image_embeds (R, N, P) and of the
        question (one per 77-token segment) -> query_embeds (M, P), as the ``clip_text`` source computes them."""
        source = self.relevance_source()
        post_ln = sp.patch.family_of(self.hf).vision_post_layernorm(self.hf)
        weight = source.visual_projection.weight
        image = source.visual_projection(post_ln(features).to(weight.dtype))
        ids, mask = source.segments(query)
        text = source.text_model(input_ids=ids.to(weight.device), attention_mask=mask.to(weight.device)).text_embeds
        return {"image_embeds": image, "query_embeds": text}

    # ------------------------------------------------------------------ forward / generate
    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                images: Any = None, image_sizes: Any = None, texts: Sequence[str] | None = None,
                labels: torch.Tensor | None = None, **kwargs: Any):
        """transformers' forward with ``images`` at the IMAGE_TOKEN_INDEX markers (padded on the right, as
        LLaVA's ``tokenizer_padding_side``); logits over the expanded prompt."""
        side = getattr(self.config, "tokenizer_padding_side", "right")
        inputs = self.prepare_inputs(input_ids, attention_mask, images, image_sizes, texts, labels, side)
        output = self.hf(**{k: v for k, v in inputs.items() if v is not None}, **kwargs)
        self._record_counts(inputs, input_ids.shape[0])
        return output

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, images: Any = None, image_sizes: Any = None,
                 texts: Sequence[str] | None = None, **kwargs: Any) -> torch.Tensor:
        """Generate from ``inputs`` (B, L) prompt ids (left padding + ``attention_mask`` for B > 1) and images;
        returns only the new tokens (as LLaVA does)."""
        if "inputs_embeds" in kwargs:
            raise ValueError("pass prompt ids as `inputs` (with <image> tokens), not inputs_embeds")
        if inputs is None:
            inputs = kwargs.pop("input_ids", None)
        kwargs.pop("position_ids", None)
        prepared = self.prepare_inputs(inputs, kwargs.pop("attention_mask", None), images, image_sizes, texts)
        prepared.pop("labels")
        prepared = {k: v for k, v in prepared.items() if v is not None}
        output = self.hf.generate(**prepared, **kwargs)
        self._record_counts(prepared, inputs.shape[0])
        return output[:, prepared["input_ids"].shape[1]:]

