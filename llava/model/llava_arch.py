"""LLaVA's multimodal glue: vision tower -> (pruning) -> projector -> visual tokens spliced into the prompt.

Two mixins, as in LLaVA's layout:
- ``LlavaMetaModel`` (mixed into the LLM's base model, e.g. ``LlamaModel``) owns ``vision_tower``,
  ``mm_projector`` and, for ``spatial_unpad``, ``image_newline`` -> checkpoint keys ``model.mm_projector.*``,
  ``model.image_newline``, ``model.vision_tower.vision_tower.*``.
- ``LlavaMetaForCausalLM`` (mixed into the ``*ForCausalLM``) turns ``input_ids`` with ``IMAGE_TOKEN_INDEX``
  markers plus images into ``inputs_embeds``, and holds the pruning setting.

Pruning happens per image row before the prefill (``_rows_per_image``): one row per LLaVA-1.5 image, one
row per LLaVA-NeXT crop (base + every anyres tile), each keeping ``visual_token_num`` tokens in their
spatial order. For ``spatial_unpad`` the kept tile tokens are placed through the grid/unpad layout and a
row's ``image_newline`` is kept iff that row still holds a kept token (the base crop has no newlines).
Merged tokens of merging methods (VisionZip, TRIM) follow the kept tokens of their crop (for NeXT tiles:
after the whole tile grid).

In-LLM methods (``MethodSpec.stage == "llm"``: FastV) splice every visual token in and record which image
row / crop each one belongs to (``last_visual_rows``); the decoder stack (``LlavaMetaModel.forward``, see
``llava.model.fastv``) then drops image tokens after layer K with the same per-row budget.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX

from .fastv import ALWAYS_KEPT, TEXT, LLMPruning, decode_inputs, fastv_prefill, fastv_state
from .hf_compat import CACHE_ARG, pop_cache
from .multimodal_encoder.builder import build_vision_tower
from .multimodal_encoder.clip_encoder import CLIPRelevanceEncoder, CLIPVisionTower, VisionOutput
from .multimodal_projector.builder import build_vision_projector
from .pruning import PrunedRows, PruningConfig, as_pruning_config, prune_rows

# The assistant-turn opener that ends a prompt (vicuna/llava_v1, mistral_instruct, chatml_direct, llava_v0).
_ROLE_TAIL = re.compile(r"\s*(ASSISTANT:|\[/INST\]|<\|im_end\|>\s*<\|im_start\|>\s*assistant|###\s*Assistant:?)\s*$")


def _is_prefill(cache: Any) -> bool:
    """True when no tokens are cached yet (the first forward of a generation, or a plain forward)."""
    return cache is None or cache.get_seq_length() == 0


class LlavaMetaModel:
    """Mixin for the LLM base model: vision tower, projector and image_newline."""

    def __init__(self, config) -> None:
        super().__init__(config)
        if getattr(config, "mm_vision_tower", None):
            self.vision_tower = build_vision_tower(config)
            self.mm_projector = build_vision_projector(config)
            if "unpad" in str(getattr(config, "mm_patch_merge_type", "flat")):
                self.image_newline = nn.Parameter(torch.zeros(config.hidden_size))

    def get_vision_tower(self) -> CLIPVisionTower | None:
        return getattr(self, "vision_tower", None)

    @property
    def llm_pruning(self) -> LLMPruning | None:
        """The in-LLM pruning setting (FastV), installed by ``LlavaMetaForCausalLM.set_pruning``."""
        return getattr(self, "_llm_pruning", None)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, use_cache=None,
                visual_rows: torch.Tensor | None = None, **kwargs):
        """The decoder stack; with an in-LLM pruning setting and ``visual_rows`` (B, L) on the prefill, FastV
        (``llava.model.fastv``). Decoding steps after a FastV prefill are mapped onto its shortened cache.
        The KV cache comes as ``cache`` (or the deprecated ``past_key_values``), see ``hf_compat``."""
        cache = pop_cache(kwargs)
        setting = self.llm_pruning
        if setting is not None and visual_rows is not None and _is_prefill(cache):
            if inputs_embeds is None:
                inputs_embeds = self.embed_tokens(input_ids)
            output, kept = fastv_prefill(self, inputs_embeds, attention_mask, position_ids, cache,
                                         use_cache, visual_rows, setting, **kwargs)
            self._llm_kept_visual = kept
            return output
        state = fastv_state(cache)
        if state is not None and not _is_prefill(cache):
            length = (inputs_embeds if inputs_embeds is not None else input_ids).shape[1]
            attention_mask, position_ids = decode_inputs(state, cache, attention_mask, position_ids, length)
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               inputs_embeds=inputs_embeds, use_cache=use_cache, **{CACHE_ARG: cache}, **kwargs)


@dataclass
class ImageInput:
    """One image's views and size. views (V, 3, S, S): V = 1 (LLaVA-1.5) or 1 + tiles (NeXT anyres)."""

    views: torch.Tensor
    size: tuple[int, int] | None  # original (width, height); required for anyres layouts
    sample: int  # index of the prompt it belongs to


def _split_images(images: Any, image_sizes: Any, images_per_sample: list[int], anyres: bool) -> list[ImageInput]:
    """Normalise ``images`` (Tensor (B,3,S,S) | (B,V,3,S,S) | list of (3,S,S)/(V,3,S,S)) to one ImageInput each."""
    if isinstance(images, torch.Tensor):
        if images.dim() not in (4, 5):
            raise ValueError(f"images must be (B, 3, H, W) or (B, V, 3, H, W), got shape {tuple(images.shape)}")
        per_image = list(images) if images.dim() == 5 else [img.unsqueeze(0) for img in images]
    elif isinstance(images, (list, tuple)):
        per_image = []
        for i, img in enumerate(images):
            if not isinstance(img, torch.Tensor) or img.dim() not in (3, 4):
                raise ValueError(f"images[{i}] must be a (3, H, W) or (V, 3, H, W) tensor")
            per_image.append(img.unsqueeze(0) if img.dim() == 3 else img)
    else:
        raise ValueError(f"images must be a tensor or a list of tensors, got {type(images).__name__}")
    total = sum(images_per_sample)
    if len(per_image) != total:
        raise ValueError(
            f"input_ids hold {total} <image> token(s) ({images_per_sample} per sample) but {len(per_image)} "
            "image(s) were given: every prompt needs one <image> token per image"
        )
    if image_sizes is None:
        if anyres and any(v.shape[0] > 1 for v in per_image):
            raise ValueError("image_sizes (original (width, height) per image) is required for anyres images")
        sizes: list = [None] * total
    else:
        sizes = [tuple(int(x) for x in s) for s in image_sizes]
        if len(sizes) != total:
            raise ValueError(f"image_sizes has {len(sizes)} entries for {total} images")
    owners = [b for b, n in enumerate(images_per_sample) for _ in range(n)]
    return [ImageInput(v, s, b) for v, s, b in zip(per_image, sizes, owners)]


def unpad_extent(grid_hw: tuple[int, int], original_wh: tuple[int, int]) -> tuple[slice, slice]:
    """Rows/cols of a (H, W) feature grid that cover the image, not the letterbox padding (LLaVA's unpad)."""
    height, width = grid_hw
    orig_w, orig_h = original_wh
    if orig_w / orig_h > width / height:
        new_h = int(orig_h * (width / orig_w))
        pad = (height - new_h) // 2
        return slice(pad, height - pad), slice(0, width)
    new_w = int(orig_w * (height / orig_h))
    pad = (width - new_w) // 2
    return slice(0, height), slice(pad, width - pad)


def tile_grid_positions(rows: int, cols: int, side: int) -> torch.Tensor:
    """(rows*side, cols*side) grid of flat token positions t*side^2 + i*side + j of tile t (row-major tiles)."""
    pos = torch.arange(rows * cols * side * side).view(rows, cols, side, side)
    return pos.permute(0, 2, 1, 3).reshape(rows * side, cols * side)


class LlavaMetaForCausalLM:
    """Mixin for ``*ForCausalLM``: multimodal input preparation, pruning setting, generate with images."""

    # ------------------------------------------------------------------ accessors / settings
    def get_model(self):
        return self.model

    def get_vision_tower(self) -> CLIPVisionTower:
        tower = self.get_model().get_vision_tower()
        if tower is None:
            raise ValueError("this model has no vision tower (config has no mm_vision_tower)")
        return tower

    @property
    def pruning(self) -> PruningConfig | None:
        return getattr(self, "_pruning", None)

    @property
    def last_visual_token_counts(self) -> list[int]:
        """Visual tokens (incl. NeXT newlines) that reached the LLM per sample, for the last forward/generate.

        With an in-LLM method (FastV): the tokens kept after layer K (the first K layers saw all of them)."""
        return list(getattr(self, "_last_visual_token_counts", []))

    @property
    def last_visual_rows(self) -> torch.Tensor | None:
        """(B, L') long for the last spliced sequence: image row (crop) id of each visual token, numbered over
        the batch; -1 text/padding, -2 NeXT newline. The per-row budget of in-LLM methods follows it."""
        return getattr(self, "_last_visual_rows", None)

    @property
    def last_visual_mask(self) -> torch.Tensor | None:
        """(B, L') bool: where the visual tokens sit in the last spliced (padded) sequence."""
        return getattr(self, "_last_visual_mask", None)

    def set_pruning(self, pruning: PruningConfig | dict | None) -> None:
        """Set (or clear with None) the pruning applied before the prefill."""
        cfg = as_pruning_config(pruning)
        llm_setting = self._prepare_llm_stage_pruning(cfg) if cfg is not None and cfg.in_llm else None
        if cfg is not None and cfg.needs_relevance:
            self._relevance_encoder()
        self.get_model()._llm_pruning = llm_setting
        self._pruning = cfg

    def _prepare_llm_stage_pruning(self, cfg: PruningConfig) -> LLMPruning:
        """The in-LLM setting (MethodSpec.stage == "llm", FastV) for the decoder stack; checks the layer K."""
        spec = cfg.spec
        if spec.params.keys() != {"layer"}:
            raise ValueError(f"pruning method {cfg.method!r} acts inside the LLM; only FastV-style methods "
                             "(parameter 'layer') are wired into this model")
        layer = cfg.params.get("layer", spec.params["layer"])
        num_layers = int(self.config.num_hidden_layers)
        if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer < num_layers:
            raise ValueError(
                f"pruning method {cfg.method!r} acts inside the LLM after decoder layer K = params['layer'] = {layer!r}; "
                f"K must be an int in [1, {num_layers - 1}] for this LLM ({num_layers} layers)"
            )
        return LLMPruning(layer=layer, budget=cfg.visual_token_num, method=cfg.method)

    def set_query_tokenizer(self, tokenizer) -> None:
        """Tokenizer used to recover the question from input_ids when generate/forward get no ``texts``."""
        self._query_tokenizer = tokenizer

    def relevance_encoder(self) -> CLIPRelevanceEncoder:
        """CLIP text tower + visual projection (for query relevance), loaded on first use."""
        return self._relevance_encoder()

    def _relevance_encoder(self) -> CLIPRelevanceEncoder:
        """CLIP text tower + visual projection, loaded once on first need from the vision tower's checkpoint."""
        encoder = getattr(self, "_clip_relevance", None)
        tower = self.get_vision_tower()
        if encoder is None:
            encoder = CLIPRelevanceEncoder.from_pretrained(tower.vision_tower_name, dtype=tower.dtype, device=tower.device)
            object.__setattr__(self, "_clip_relevance", encoder)  # not a submodule: stays out of state_dict
        elif encoder.visual_projection.weight.device != tower.device:
            encoder.to(tower.device)  # follow the tower after model.to(...)
        return encoder

    # ------------------------------------------------------------------ vision side
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Unpruned visual tokens: images (R, 3, S, S) -> (R, N, D)."""
        features = self.get_vision_tower()(images).features
        projector = self.get_model().mm_projector
        return projector(features.to(self._projector_device(), self._projector_dtype()))

    def _projector_dtype(self) -> torch.dtype:
        return next(self.get_model().mm_projector.parameters()).dtype

    def _projector_device(self) -> torch.device:
        return next(self.get_model().mm_projector.parameters()).device

    def _query_texts(self, texts: Sequence[str] | None, input_ids: torch.Tensor, attention_mask) -> list[str]:
        """The per-sample query for relevance: ``texts`` if given, else the prompt's text after its last <image>."""
        from llava.mm_utils import strip_short_answer_prompt

        batch = input_ids.shape[0]
        if texts is not None:
            texts = [texts] if isinstance(texts, str) else list(texts)
            if len(texts) != batch:
                raise ValueError(f"texts must hold one query per sample ({batch}), got {len(texts)}")
            return [strip_short_answer_prompt(t) for t in texts]
        tokenizer = getattr(self, "_query_tokenizer", None)
        if tokenizer is None:
            raise ValueError(
                f"pruning method {self.pruning.method!r} needs the question text: pass texts=[query per sample]"
            )
        queries = []
        for b in range(batch):
            ids = input_ids[b] if attention_mask is None else input_ids[b][attention_mask[b].bool()]
            marks = (ids == IMAGE_TOKEN_INDEX).nonzero()
            tail = ids[int(marks[-1]) + 1 :] if len(marks) else ids
            text = _ROLE_TAIL.sub("", tokenizer.decode(tail[tail >= 0], skip_special_tokens=True)).strip()
            queries.append(strip_short_answer_prompt(text))
        return queries

    def _row_inputs(self, cfg: PruningConfig, vision: VisionOutput) -> dict[str, torch.Tensor]:
        """Row-aligned tensor inputs the method declares (MethodSpec.inputs), except the per-sample query."""
        inputs: dict[str, torch.Tensor] = {}
        names = cfg.spec.inputs
        if "image_embeds" in names:
            post_ln = self.get_vision_tower().vision_tower.vision_model.post_layernorm
            inputs["image_embeds"] = self._relevance_encoder().embed_image(vision.features, post_ln)  # (R, N, P)
        if "cls_attention" in names:
            inputs["cls_attention"] = vision.cls_attention  # (R, N)
        if "keys" in names:
            inputs["keys"] = vision.keys  # (R, N, Dk)
        unknown = set(names) - set(inputs) - {"query_embeds"}
        if unknown:
            raise ValueError(f"pruning method {cfg.method!r} needs inputs {sorted(unknown)} this model cannot provide")
        return inputs

    def _rows_per_image(self, images: list[ImageInput], vision: VisionOutput,
                        queries: list[str] | None) -> list[PrunedRows]:
        """Kept indices + LLM tokens of every image's rows (views), pruned when a setting applies.

        The method runs batched over all rows of all images; rows are only split into groups when the
        samples' queries have different numbers of 77-token segments M (query_embeds (R, M, P) per group)."""
        projector = self.get_model().mm_projector
        features = vision.features.to(self._projector_device(), self._projector_dtype())  # (R, N, C)
        bounds = torch.tensor([0] + [img.views.shape[0] for img in images]).cumsum(0).tolist()
        spans = [range(bounds[i], bounds[i + 1]) for i in range(len(images))]
        cfg = self.pruning
        if cfg is None or cfg.in_llm or cfg.is_noop_for(features.shape[1]):
            tokens = projector(features)  # (R, N, D)
            kept = torch.arange(features.shape[1], device=features.device).expand(features.shape[0], -1)
            return [PrunedRows(kept[span.start:span.stop], tokens[span.start:span.stop]) for span in spans]
        row_inputs = self._row_inputs(cfg, vision)
        groups: dict[int, list[int]] = {0: list(range(len(images)))}
        sample_queries: dict[int, torch.Tensor] = {}
        if "query_embeds" in cfg.spec.inputs:
            encoder = self._relevance_encoder()
            sample_queries = {img.sample: encoder.embed_query(queries[img.sample]) for img in images}  # (M, P)
            groups = {}
            for i, img in enumerate(images):
                groups.setdefault(sample_queries[img.sample].shape[0], []).append(i)
        results: list[PrunedRows | None] = [None] * len(images)
        for image_ids in groups.values():
            rows = [r for i in image_ids for r in spans[i]]
            index = torch.tensor(rows, device=features.device)
            inputs = {name: t[index.to(t.device)] for name, t in row_inputs.items()}
            if sample_queries:
                inputs["query_embeds"] = torch.stack(
                    [sample_queries[images[i].sample] for i in image_ids for _ in spans[i]])  # (R_g, M, P)
            pruned = prune_rows(cfg, features[index], projector, inputs)
            start = 0
            for i in image_ids:
                stop = start + len(spans[i])
                results[i] = PrunedRows(pruned.kept_indices[start:stop], pruned.tokens[start:stop])
                start = stop
        return results

    def _image_tokens(self, image: ImageInput, rows: PrunedRows) -> tuple[torch.Tensor, torch.Tensor]:
        """All LLM tokens of one image -> (tokens (n, D), view (n,) long), laid out as LLaVA does (flat, or NeXT
        spatial_unpad). ``view`` is the image row (view) each token comes from, ALWAYS_KEPT (-2) for newlines."""
        merge_type = str(getattr(self.config, "mm_patch_merge_type", "flat"))
        per_row = rows.tokens.shape[1]
        device = rows.tokens.device
        if merge_type == "flat" or not merge_type.startswith("spatial"):
            views = torch.arange(rows.tokens.shape[0], device=device).repeat_interleave(per_row)
            return rows.tokens.flatten(0, 1), views  # (V * k, D)
        base = rows.tokens[0]  # (k + e, D)
        base_views = torch.zeros(per_row, dtype=torch.long, device=device)
        newline = getattr(self.get_model(), "image_newline", None) if "unpad" in merge_type else None
        if image.views.shape[0] == 1:
            if newline is None:
                return base, base_views
            newline_view = torch.full((1,), ALWAYS_KEPT, dtype=torch.long, device=device)
            return (torch.cat([base, newline[None].to(base.device, base.dtype)], dim=0),
                    torch.cat([base_views, newline_view]))
        tiles, tile_views = self._tile_layout(image, rows, merge_type, newline)
        return torch.cat([base, tiles], dim=0), torch.cat([base_views, tile_views])

    def _tile_layout(self, image: ImageInput, rows: PrunedRows, merge_type: str,
                     newline) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept tile tokens placed on the anyres grid (unpadded), one newline per non-empty grid row -> (n, D),
        with each token's view (1 + tile index; ALWAYS_KEPT for newlines) (n,)."""
        from llava.mm_utils import get_anyres_image_grid_shape

        tower = self.get_vision_tower()
        side = tower.num_patches_per_side
        tiles = rows.tokens[1:]  # (T, k + e, D)
        kept = rows.kept_indices[1:]  # (T, k)
        num_tiles, k = kept.shape
        if image.size is None:
            raise ValueError("image_sizes is required for LLaVA-NeXT anyres images")
        cols, grid_rows = get_anyres_image_grid_shape(image.size, self.config.image_grid_pinpoints, tower.config.image_size)
        if cols * grid_rows != num_tiles:
            raise ValueError(
                f"image of size {image.size} should have {cols}x{grid_rows} anyres tiles, got {num_tiles}: "
                "pixel values and image_sizes disagree"
            )
        device, d = tiles.device, tiles.shape[-1]
        # Scatter the kept tokens back to their flat tile positions t * side^2 + i; absent positions stay empty.
        flat_pos = (kept + torch.arange(num_tiles, device=device)[:, None] * side * side).flatten()  # (T*k,)
        present = torch.zeros(num_tiles * side * side, dtype=torch.bool, device=device)
        present[flat_pos] = True
        source = tiles.new_zeros(num_tiles * side * side, d)
        source[flat_pos] = tiles[:, :k].reshape(-1, d)
        grid = tile_grid_positions(grid_rows, cols, side).to(device)  # (rows*side, cols*side)
        if "unpad" in merge_type:
            row_slice, col_slice = unpad_extent(tuple(grid.shape), image.size)
            grid = grid[row_slice, col_slice]
        keep = present[grid]  # (H', W')
        tokens = source[grid]  # (H', W', D)
        views = 1 + grid // (side * side)  # (H', W') view of each grid cell
        if newline is not None:
            tokens = torch.cat([tokens, newline.to(device, tokens.dtype).expand(tokens.shape[0], 1, d)], dim=1)
            keep = torch.cat([keep, keep.any(dim=1, keepdim=True)], dim=1)  # newline iff its row has a token
            views = torch.cat([views, views.new_full((views.shape[0], 1), ALWAYS_KEPT)], dim=1)
        laid_out = tokens[keep]  # (n, D) row-major
        merged = tiles[:, k:].reshape(-1, d)  # (T * e, D)
        merged_views = 1 + torch.arange(num_tiles, device=device).repeat_interleave(tiles.shape[1] - k)
        return torch.cat([laid_out, merged], dim=0), torch.cat([views[keep], merged_views])

    def _visual_tokens(self, images: list[ImageInput],
                       queries: list[str] | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image its LLM tokens (n_i, D) and their views (n_i,). The tower runs once on all views."""
        cfg = self.pruning
        with_attention = cfg is not None and cfg.needs_attention and not cfg.is_noop_for(self.get_vision_tower().num_patches)
        views = torch.cat([img.views for img in images], dim=0)  # (sum V, 3, S, S)
        vision = self.get_vision_tower()(views, with_attention=with_attention)
        rows = self._rows_per_image(images, vision, queries)
        return [self._image_tokens(img, r) for img, r in zip(images, rows)]

    # ------------------------------------------------------------------ text side
    def prepare_inputs_labels_for_multimodal(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        past_key_values: Any,
        labels: torch.Tensor | None,
        images: Any,
        image_sizes: Any = None,
        texts: Sequence[str] | None = None,
        padding_side: str | None = None,
    ):
        """Splice visual tokens into the prompt embeddings.

        input_ids (B, L) with IMAGE_TOKEN_INDEX where each image goes; attention_mask (B, L) marks real tokens
        (either padding side). Returns (None, position_ids (B, L'), attention_mask (B, L'), past_key_values,
        inputs_embeds (B, L', D), labels (B, L') | None), padded on ``padding_side`` (default: the config's
        ``tokenizer_padding_side``, "right"); position ids count real tokens only (contiguous from 0).
        """
        if input_ids is None or not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError("input_ids must be a (B, L) tensor holding IMAGE_TOKEN_INDEX (-200) for every <image>")
        is_image = input_ids == IMAGE_TOKEN_INDEX  # (B, L)
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        per_sample = (is_image & mask).sum(dim=1).tolist()
        if images is None:
            if any(per_sample):
                raise ValueError("input_ids contain <image> tokens (IMAGE_TOKEN_INDEX) but no images were given")
            self._last_visual_token_counts = [0] * input_ids.shape[0]
            return input_ids, position_ids, attention_mask, past_key_values, None, labels
        if not all(per_sample):
            missing = [b for b, n in enumerate(per_sample) if n == 0]
            raise ValueError(
                f"input_ids of sample(s) {missing} hold no <image> token (IMAGE_TOKEN_INDEX={IMAGE_TOKEN_INDEX}): "
                "the prompt must contain '<image>', tokenised with tokenizer_image_token"
            )
        anyres = str(getattr(self.config, "image_aspect_ratio", "")).startswith("anyres")
        image_list = _split_images(images, image_sizes, per_sample, anyres)
        queries = None
        if self.pruning is not None and self.pruning.needs_relevance:
            queries = self._query_texts(texts, input_ids, attention_mask)
        visual = self._visual_tokens(image_list, queries)
        embed = self.get_model().embed_tokens
        text_embeds = embed(input_ids.masked_fill(is_image, 0))  # (B, L, D)
        sequences, seq_labels, seq_visual, seq_rows, counts = [], [], [], [], []
        image_iter = iter(zip(visual, image_list))
        row_offset = 0  # image rows numbered over the whole batch
        for b in range(input_ids.shape[0]):
            valid = mask[b]
            ids, emb = input_ids[b][valid], text_embeds[b][valid]
            lab = labels[b][valid] if labels is not None else None
            pieces, lab_pieces, vis_pieces, row_pieces, count, start = [], [], [], [], 0, 0
            for pos in (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist() + [ids.numel()]:
                pieces.append(emb[start:pos])
                vis_pieces.append(torch.zeros(pos - start, dtype=torch.bool, device=emb.device))
                row_pieces.append(torch.full((pos - start,), TEXT, dtype=torch.long, device=emb.device))
                if lab is not None:
                    lab_pieces.append(lab[start:pos])
                if pos < ids.numel():
                    (tokens, views), image = next(image_iter)
                    tokens = tokens.to(emb.device, emb.dtype)
                    views = views.to(emb.device)
                    pieces.append(tokens)
                    vis_pieces.append(torch.ones(tokens.shape[0], dtype=torch.bool, device=emb.device))
                    row_pieces.append(torch.where(views >= 0, views + row_offset, views))
                    row_offset += image.views.shape[0]
                    lab_pieces.append(torch.full((tokens.shape[0],), IGNORE_INDEX, device=emb.device, dtype=torch.long))
                    count += tokens.shape[0]
                start = pos + 1
            sequences.append(torch.cat(pieces, dim=0))
            seq_visual.append(torch.cat(vis_pieces, dim=0))
            seq_rows.append(torch.cat(row_pieces, dim=0))
            seq_labels.append(torch.cat(lab_pieces, dim=0) if lab is not None else None)
            counts.append(count)
        self._last_visual_token_counts = counts
        return self._pad_sequences(sequences, seq_labels, seq_visual, past_key_values, padding_side, seq_rows)

    def _pad_sequences(self, sequences, seq_labels, seq_visual, past_key_values, padding_side, seq_rows=None):
        """Pad the per-sample (L_b, D) embeddings to (B, L', D) with mask, contiguous position ids and labels.

        Also records ``last_visual_mask`` (B, L'): True where a visual token sits (the hook point for
        in-LLM methods and for measurements)."""
        max_len = getattr(self.config, "tokenizer_model_max_length", None)
        if max_len is not None and any(s.shape[0] > max_len for s in sequences):
            warnings.warn(f"multimodal prompt longer than tokenizer_model_max_length={max_len}: truncated (as LLaVA does)")
            sequences = [s[:max_len] for s in sequences]
            seq_labels = [None if l is None else l[:max_len] for l in seq_labels]
            seq_visual = [v[:max_len] for v in seq_visual]
            seq_rows = None if seq_rows is None else [r[:max_len] for r in seq_rows]
        side = padding_side or getattr(self.config, "tokenizer_padding_side", "right")
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        batch, length = len(sequences), max(s.shape[0] for s in sequences)
        ref = sequences[0]
        embeds = ref.new_zeros(batch, length, ref.shape[-1])
        mask = torch.zeros(batch, length, dtype=torch.long, device=ref.device)
        visual = torch.zeros(batch, length, dtype=torch.bool, device=ref.device)
        rows = torch.full((batch, length), TEXT, dtype=torch.long, device=ref.device)
        has_labels = seq_labels[0] is not None
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long, device=ref.device) if has_labels else None
        for b, seq in enumerate(sequences):
            span = slice(length - seq.shape[0], length) if side == "left" else slice(0, seq.shape[0])
            embeds[b, span] = seq
            mask[b, span] = 1
            visual[b, span] = seq_visual[b]
            if seq_rows is not None:
                rows[b, span] = seq_rows[b]
            if has_labels:
                labels[b, span] = seq_labels[b]
        position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)  # (B, L') contiguous over real tokens
        self._last_visual_mask = visual
        self._last_visual_rows = rows
        return None, position_ids, mask, past_key_values, embeds, labels

    # ------------------------------------------------------------------ forward / generate helpers
    def _multimodal_forward_inputs(self, input_ids, attention_mask, position_ids, cache, labels,
                                   inputs_embeds, images, image_sizes, texts, padding_side=None):
        """Shared by forward/generate: returns kwargs for the LLM (input_ids or inputs_embeds, mask, positions)."""
        visual_rows = None
        if inputs_embeds is None and images is not None:
            (input_ids, position_ids, attention_mask, cache, inputs_embeds,
             labels) = self.prepare_inputs_labels_for_multimodal(
                input_ids, position_ids, attention_mask, cache, labels, images, image_sizes, texts,
                padding_side)
            visual_rows = self._llm_pruning_rows()
            if visual_rows is not None and labels is not None:
                raise ValueError(f"labels are not supported with in-LLM pruning ({self.pruning.method!r} drops "
                                 "positions inside the LLM, so the logits no longer align with the labels)")
        elif images is None and input_ids is not None and _is_prefill(cache):
            # checked on the prefill only: a per-step check would sync the GPU on every decoded token
            if bool((input_ids == IMAGE_TOKEN_INDEX).any()):
                raise ValueError("input_ids contain <image> tokens (IMAGE_TOKEN_INDEX) but no images were given")
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                  CACHE_ARG: cache, "inputs_embeds": inputs_embeds, "labels": labels}
        if visual_rows is not None:
            inputs["visual_rows"] = visual_rows
        return inputs

    def _llm_pruning_rows(self) -> torch.Tensor | None:
        """``last_visual_rows`` when an in-LLM method (FastV) will prune the sequence just spliced, else None
        (no setting, or a budget >= the tokens per image row: then the model runs exactly unpruned)."""
        cfg = self.pruning
        if cfg is None or not cfg.in_llm or cfg.is_noop_for(self.get_vision_tower().num_patches):
            return None
        self.get_model()._llm_kept_visual = None
        return self.last_visual_rows

    def _counts_per_prompt(self, batch: int) -> None:
        """After generate(): one count per prompt (beams / num_return_sequences repeat each prompt's rows)."""
        counts = self.last_visual_token_counts
        if batch and len(counts) > batch and len(counts) % batch == 0:
            self._last_visual_token_counts = counts[:: len(counts) // batch]

    def _record_llm_kept_visual(self) -> None:
        """After a FastV prefill: last_visual_token_counts = visual tokens kept after layer K (one host sync)."""
        kept = getattr(self.get_model(), "_llm_kept_visual", None)
        if kept is not None:
            self._last_visual_token_counts = kept.tolist()
            self.get_model()._llm_kept_visual = None


class LlavaCausalLMMixin:
    """``forward`` / ``generate`` with images, shared by every LLaVA language-model class.

    Put it FIRST among the bases (``class LlavaXForCausalLM(LlavaCausalLMMixin, XForCausalLM,
    LlavaMetaForCausalLM)``) so that ``super()`` here reaches the transformers causal LM.
    """

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        images: Any = None,
        image_sizes: Any = None,
        texts: Sequence[str] | None = None,
        visual_rows: torch.Tensor | None = None,
        **kwargs: Any,
    ):
        """The causal LM forward with ``images`` spliced in at IMAGE_TOKEN_INDEX positions of ``input_ids``.

        The KV cache comes as ``cache`` (or the deprecated ``past_key_values``), see ``hf_compat``."""
        llm_inputs = self._multimodal_forward_inputs(
            input_ids, attention_mask, position_ids, pop_cache(kwargs), labels, inputs_embeds, images, image_sizes, texts
        )
        if visual_rows is not None and "visual_rows" not in llm_inputs:  # generate() hands it to every step
            llm_inputs["visual_rows"] = visual_rows
        output = super().forward(**llm_inputs, use_cache=use_cache, **kwargs)
        self._record_llm_kept_visual()
        return output

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        images: Any = None,
        image_sizes: Any = None,
        texts: Sequence[str] | None = None,
        **kwargs: Any,
    ):
        """Generate from ``inputs`` (B, L) prompt ids (left padding + ``attention_mask`` for B > 1) and images.

        Returns only the new tokens (as LLaVA does: the prompt goes in as embeddings)."""
        if "inputs_embeds" in kwargs:
            raise ValueError("pass prompt ids as `inputs` (with <image> tokens), not inputs_embeds")
        if inputs is None:
            inputs = kwargs.pop("input_ids", None)
        attention_mask = kwargs.pop("attention_mask", None)
        kwargs.pop("position_ids", None)  # recomputed from the spliced attention mask
        if images is None:
            self._multimodal_forward_inputs(inputs, attention_mask, None, None, None, None, None, None, None)
            self._last_visual_token_counts = [0] * (0 if inputs is None else inputs.shape[0])
            return super().generate(inputs, attention_mask=attention_mask, **kwargs)
        _, _, mask, _, embeds, _ = self.prepare_inputs_labels_for_multimodal(
            inputs, None, attention_mask, None, None, images, image_sizes, texts, padding_side="left"
        )
        visual_rows = self._llm_pruning_rows()
        if visual_rows is not None:
            kwargs["visual_rows"] = visual_rows  # FastV: used by the prefill, ignored by decoding steps
        output = super().generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
        self._counts_per_prompt(inputs.shape[0])
        return output
