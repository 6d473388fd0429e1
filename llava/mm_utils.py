"""Image and prompt preprocessing for LLaVA-1.5 / LLaVA-NeXT.

Images:
- `load_image` opens a file (or http(s) URL) as an RGB PIL image.
- `process_images` follows the checkpoint's `image_aspect_ratio`:
  ``"pad"`` (LLaVA-1.5) pads to a square with the processor's mean colour, then runs the processor;
  ``"anyres"`` (LLaVA-NeXT) makes a base view plus tiles of a high-resolution grid
  (`process_anyres_image`); anything else runs the processor as is (resize + centre crop).
- `load_image_processor` loads CLIP's image processor with the PIL backend pinned (LLaVA's numbers
  were produced with the PIL path; transformers 5 would otherwise pick torchvision when installed).

Text:
- `tokenizer_image_token` turns a prompt with ``<image>`` tags into ids with `IMAGE_TOKEN_INDEX`
  where the visual tokens go (each text chunk encoded on its own, one BOS at the front).
- `strip_short_answer_prompt` gives the query text used for relevance scoring.
- `load_sentencepiece_tokenizer` loads a Llama/Mistral `tokenizer.model` with ids identical to
  LLaVA's original slow tokenizer (transformers 5's converted tokenizer differs on runs of spaces).
"""

from __future__ import annotations

import ast
import math
import os
import urllib.request
import warnings
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO, Sequence

import torch
from PIL import Image
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

from llava.constants import (
    DEFAULT_IMAGE_TOKEN,
    IMAGE_TOKEN_INDEX,
    MULTIPLE_CHOICE_PROMPT,
    MULTIPLE_CHOICE_PROMPT_CN,
    SHORT_ANSWER_PROMPT,
)

Resolution = tuple[int, int]  # (width, height) in pixels, PIL's order


# ============================================================================ image loading
def load_image(path_or_url: str | os.PathLike | BinaryIO) -> Image.Image:
    """Open an image file, http(s) URL or binary file object as an RGB PIL image.

    Raises FileNotFoundError naming the path when a local file does not exist.
    """
    if isinstance(path_or_url, (str, os.PathLike)):
        location = os.fspath(path_or_url)
        if location.startswith(("http://", "https://")):
            with urllib.request.urlopen(location) as response:  # noqa: S310 - user-supplied image URL
                return Image.open(BytesIO(response.read())).convert("RGB")
        if not Path(location).is_file():
            raise FileNotFoundError(f"image file not found: {location!r}")
        with Image.open(location) as image:
            return image.convert("RGB")
    if hasattr(path_or_url, "read"):
        return Image.open(path_or_url).convert("RGB")
    raise ValueError(f"path_or_url must be a path, URL or binary file object, got {type(path_or_url).__name__}")


def expand2square(pil_img: Image.Image, background_color: int | tuple[int, ...]) -> Image.Image:
    """Pad the shorter side so the image becomes square, the original centred (offset floored).

    Returns the input unchanged when it is already square.
    """
    width, height = pil_img.size
    if width == height:
        return pil_img
    side = max(width, height)
    canvas = Image.new(pil_img.mode, (side, side), background_color)
    canvas.paste(pil_img, ((side - width) // 2, (side - height) // 2))
    return canvas


# ============================================================================ image processor
def load_image_processor(path_or_name: str | os.PathLike, **kwargs: Any):
    """Load a CLIP image processor with the PIL backend pinned.

    transformers 5 resolves `CLIPImageProcessor` to a torchvision implementation when torchvision is
    installed and to `CLIPImageProcessorPil` otherwise; the two differ slightly (resampling). LLaVA's
    reported numbers come from the PIL path, so this always returns `CLIPImageProcessorPil`.
    Extra keyword arguments go to `from_pretrained`.
    """
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil.from_pretrained(os.fspath(path_or_name), **kwargs)


def _size_value(size: Any, key: str) -> int | None:
    """`size[key]` for a dict or transformers' SizeDict, None when absent."""
    if size is None:
        return None
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value is not None else None


def processor_input_size(image_processor: Any) -> int:
    """Side length of the square the vision tower sees (crop height, else shortest edge)."""
    side = _size_value(getattr(image_processor, "crop_size", None), "height")
    side = side or _size_value(getattr(image_processor, "size", None), "shortest_edge")
    if not side:
        raise ValueError("image_processor must define crop_size['height'] or size['shortest_edge']")
    return side


def _processor_resize_edge(image_processor: Any) -> int:
    """The processor's resize target (size['shortest_edge'], else the crop side)."""
    return _size_value(getattr(image_processor, "size", None), "shortest_edge") or processor_input_size(
        image_processor
    )


def _warn_if_not_pil_backend(image_processor: Any) -> None:
    backend = getattr(image_processor, "backend", "pil")
    if backend != "pil":
        warnings.warn(
            f"image_processor uses the {backend!r} backend; LLaVA's results were produced with the PIL backend "
            "and pixels differ slightly. Load it with llava.mm_utils.load_image_processor for exact fidelity.",
            stacklevel=3,
        )


def _pixel_values(image_processor: Any, images: list[Image.Image]) -> torch.Tensor:
    """Run the processor on a list of images -> (N, 3, S, S) float tensor."""
    return image_processor.preprocess(images, return_tensors="pt")["pixel_values"]


def mean_color(image_processor: Any) -> tuple[int, ...]:
    """LLaVA's padding colour: the processor's mean scaled to 0..255 and truncated to int."""
    return tuple(int(x * 255) for x in image_processor.image_mean)


# ============================================================================ anyres (LLaVA-NeXT)
def parse_grid_pinpoints(grid_pinpoints: Sequence[Sequence[int]] | str) -> list[Resolution]:
    """Candidate resolutions [(width, height), ...] from a list or its string form."""
    if isinstance(grid_pinpoints, str):
        try:
            grid_pinpoints = ast.literal_eval(grid_pinpoints)
        except (ValueError, SyntaxError) as err:
            raise ValueError(f"grid_pinpoints string is not a list of [width, height] pairs: {grid_pinpoints!r}") from err
    try:
        resolutions = [(int(w), int(h)) for w, h in grid_pinpoints]
    except (TypeError, ValueError) as err:
        raise ValueError(f"grid_pinpoints must be a list of [width, height] pairs, got {grid_pinpoints!r}") from err
    if not resolutions or any(w <= 0 or h <= 0 for w, h in resolutions):
        raise ValueError(f"grid_pinpoints must be a non-empty list of positive [width, height], got {grid_pinpoints!r}")
    return resolutions


def select_best_resolution(original_size: Resolution, possible_resolutions: Sequence[Sequence[int]]) -> Resolution:
    """The candidate (width, height) that keeps most of the image's pixels, ties broken by least padding.

    For each candidate the image is scaled to fit inside it (aspect ratio kept, sizes truncated to int);
    the effective resolution is the scaled pixel count capped at the original pixel count, the waste is
    the candidate's area minus that.
    """
    width, height = (int(v) for v in original_size)
    if width <= 0 or height <= 0:
        raise ValueError(f"original_size must be a positive (width, height), got {original_size!r}")
    best, best_effective, best_waste = None, -1, math.inf
    for cand_w, cand_h in parse_grid_pinpoints(possible_resolutions):
        scale = min(cand_w / width, cand_h / height)
        fitted = int(width * scale) * int(height * scale)
        effective = min(fitted, width * height)
        waste = cand_w * cand_h - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (cand_w, cand_h), effective, waste
    return best


def resize_and_pad_image(image: Image.Image, target_resolution: Resolution) -> Image.Image:
    """Resize (bicubic, aspect ratio kept, rounded up) to fit `target_resolution`, pad black, centred."""
    width, height = image.size
    target_w, target_h = target_resolution
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        new_w, new_h = target_w, min(math.ceil(height * scale_w), target_h)
    else:
        new_w, new_h = min(math.ceil(width * scale_h), target_w), target_h
    resized = image.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (target_w, target_h), (0, 0, 0))
    canvas.paste(resized, ((target_w - new_w) // 2, (target_h - new_h) // 2))
    return canvas


def divide_to_patches(image: Image.Image, patch_size: int) -> list[Image.Image]:
    """Split into `patch_size` squares, row-major (left to right, then top to bottom)."""
    width, height = image.size
    return [
        image.crop((left, top, left + patch_size, top + patch_size))
        for top in range(0, height, patch_size)
        for left in range(0, width, patch_size)
    ]


def get_anyres_image_grid_shape(
    image_size: Resolution, grid_pinpoints: Sequence[Sequence[int]] | str, patch_size: int
) -> tuple[int, int]:
    """(tiles across, tiles down) of the anyres grid chosen for an image of `image_size` (width, height)."""
    if int(patch_size) <= 0:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    width, height = select_best_resolution(image_size, parse_grid_pinpoints(grid_pinpoints))
    return width // patch_size, height // patch_size


def process_anyres_image(
    image: Image.Image, image_processor: Any, grid_pinpoints: Sequence[Sequence[int]] | str
) -> torch.Tensor:
    """LLaVA-NeXT views of one image -> (1 + tiles, 3, S, S).

    View 0 is the whole image resized (bicubic) to the processor's square size; then the image is
    resized-and-padded to the best grid resolution and cut into S x S tiles, row-major. Every view goes
    through the processor (resize, centre crop, rescale, normalise).
    """
    best = select_best_resolution(image.size, parse_grid_pinpoints(grid_pinpoints))
    tiles = divide_to_patches(resize_and_pad_image(image, best), processor_input_size(image_processor))
    edge = _processor_resize_edge(image_processor)
    base = image.resize((edge, edge), resample=Image.Resampling.BICUBIC)
    return _pixel_values(image_processor, [base] + tiles)


# ============================================================================ batch entry point
def _check_images(images: Sequence[Image.Image]) -> list[Image.Image]:
    if isinstance(images, Image.Image):
        images = [images]
    images = list(images)
    if not images:
        raise ValueError("images must be a non-empty list of PIL images")
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise ValueError(f"images[{i}] must be a PIL.Image.Image, got {type(image).__name__}")
    return [image if image.mode == "RGB" else image.convert("RGB") for image in images]


def _stack_if_uniform(tensors: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    if all(t.shape == tensors[0].shape for t in tensors):
        return torch.stack(tensors, dim=0)
    return tensors


def process_images(
    images: Sequence[Image.Image], image_processor: Any, model_cfg: Any
) -> torch.Tensor | list[torch.Tensor]:
    """Pixel values for a batch of images, following `model_cfg.image_aspect_ratio`.

    - ``"pad"``: expand to square with `mean_color(image_processor)`, then the processor -> (B, 3, S, S).
    - ``"anyres"``: `process_anyres_image` per image with `model_cfg.image_grid_pinpoints`
      -> (B, 1 + tiles, 3, S, S) when every image has the same number of tiles, else a list of
      (1 + tiles_i, 3, S, S) tensors (LLaVA's convention).
    - anything else (None, "square", ...): the processor as is -> (B, 3, S, S).
    Non-RGB images are converted to RGB first. A processor whose `backend` is not "pil" triggers a
    warning (see `load_image_processor`).
    """
    images = _check_images(images)
    _warn_if_not_pil_backend(image_processor)
    aspect = getattr(model_cfg, "image_aspect_ratio", None)
    if aspect == "pad":
        color = mean_color(image_processor)
        return _pixel_values(image_processor, [expand2square(image, color) for image in images])
    if aspect == "anyres":
        pinpoints = getattr(model_cfg, "image_grid_pinpoints", None)
        if pinpoints is None:
            raise ValueError("model_cfg.image_grid_pinpoints is required when image_aspect_ratio='anyres'")
        return _stack_if_uniform([process_anyres_image(image, image_processor, pinpoints) for image in images])
    if isinstance(aspect, str) and aspect.startswith("anyres"):
        raise ValueError(f"model_cfg.image_aspect_ratio={aspect!r} is not supported; use 'anyres' or 'pad'")
    return _pixel_values(image_processor, images)


# ============================================================================ text
def tokenizer_image_token(
    prompt: str,
    tokenizer: Any,
    image_token_index: int = IMAGE_TOKEN_INDEX,
    return_tensors: str | None = None,
) -> list[int] | torch.Tensor:
    """Token ids of `prompt` with `image_token_index` at every ``<image>`` tag.

    Each text chunk between tags is encoded separately with the tokenizer's defaults. If the first
    chunk starts with BOS, that BOS is kept once at the front and the leading token of every later
    chunk (its BOS) is dropped. `return_tensors="pt"` gives a 1-D int64 tensor.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
    if return_tensors not in (None, "pt"):
        raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
    chunks = [list(tokenizer(chunk).input_ids) for chunk in prompt.split(DEFAULT_IMAGE_TOKEN)]
    bos = getattr(tokenizer, "bos_token_id", None)
    starts_with_bos = bos is not None and len(chunks[0]) > 0 and chunks[0][0] == bos
    ids: list[int] = list(chunks[0])
    for chunk in chunks[1:]:
        ids.append(image_token_index)
        ids.extend(chunk[1:] if starts_with_bos else chunk)
    if return_tensors == "pt":
        return torch.tensor(ids, dtype=torch.long)
    return ids


_SPIECE_UNDERLINE = "\u2581"


class LlamaSentencePieceTokenizer(SentencePieceBackend):
    """Llama tokenizer running the sentencepiece model itself, like LLaVA's `use_fast=False` tokenizer.

    Non-legacy behaviour of the original slow tokenizer: one "\u2581" prefix per call (none after
    special tokens such as "</s>"), BOS in front when `add_bos_token`, special tokens kept whole.
    transformers 5's tokenizers-backed `LlamaTokenizer` differs on runs of spaces.
    """

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str | None = None,
        unk_token: str = "<unk>",
        bos_token: str = "<s>",
        eos_token: str = "</s>",
        pad_token: str | None = None,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        legacy: bool = False,
        add_prefix_space: bool = True,
        **kwargs: Any,
    ) -> None:
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.add_prefix_space = add_prefix_space
        super().__init__(
            vocab_file=vocab_file,
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            legacy=legacy,
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            add_prefix_space=add_prefix_space,
            **kwargs,
        )

    def tokenize(self, text: str, **kwargs: Any) -> list[str]:
        if self.legacy or not text:
            return super().tokenize(text, **kwargs)
        text = text.replace(_SPIECE_UNDERLINE, " ")
        if self.add_prefix_space:
            text = _SPIECE_UNDERLINE + text
        tokens = super().tokenize(text, **kwargs)
        # a lone prefix in front of a special token is dropped ("</s>" stays one token)
        if len(tokens) > 1 and tokens[0] == _SPIECE_UNDERLINE and tokens[1] in self.all_special_tokens:
            tokens = tokens[1:]
        return tokens

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        ids = bos + list(token_ids_0) + eos
        if token_ids_1 is not None:
            ids += bos + list(token_ids_1) + eos
        return ids

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        tokens = list(tokens)
        if tokens and self.add_prefix_space and tokens[0].startswith(_SPIECE_UNDERLINE):
            tokens[0] = tokens[0][1:]
        text, run = "", []
        for token in tokens:
            if token in self.all_special_tokens:
                text += self.sp_model.decode(run) + token
                run = []
            else:
                run.append(token)
        return text + self.sp_model.decode(run)



def load_sentencepiece_tokenizer(path: str | os.PathLike, **kwargs: Any):
    """Load a Llama/Mistral `tokenizer.model` folder with the sentencepiece-exact tokenizer.

    Use this for LLaVA-1.5 / 1.6 checkpoints when prompts may contain runs of spaces: it reproduces the
    ids of LLaVA's original slow tokenizer (`use_fast=False`) exactly. `tokenizer_config.json` fields
    (add_bos_token, legacy, special tokens) are honoured. FileNotFoundError when the folder has no
    tokenizer.model.
    """
    folder = Path(os.fspath(path))
    if folder.is_dir() and not (folder / "tokenizer.model").is_file():
        raise FileNotFoundError(f"no tokenizer.model in {os.fspath(path)!r}")
    return LlamaSentencePieceTokenizer.from_pretrained(os.fspath(path), **kwargs)


def get_model_name_from_path(model_path: str | os.PathLike) -> str:
    """LLaVA's model name: the last path component, or "<parent>_<last>" for "checkpoint-*" folders."""
    parts = [part for part in os.fspath(model_path).strip("/").split("/")]
    if not parts or not parts[-1]:
        raise ValueError(f"model_path must be a non-empty path or hub id, got {model_path!r}")
    if parts[-1].startswith("checkpoint-") and len(parts) > 1:
        return f"{parts[-2]}_{parts[-1]}"
    return parts[-1]


def strip_short_answer_prompt(question: str, *, multiple_choice: bool = False) -> str:
    """The query text for relevance scoring: `question` without LLaVA's benchmark instruction line.

    Removes every occurrence of "\\n" + SHORT_ANSWER_PROMPT ("\\nAnswer the question using a single
    word or phrase."), as the authors' release does. With `multiple_choice=True` it also removes
    "\\n" + MULTIPLE_CHOICE_PROMPT and "\\n" + MULTIPLE_CHOICE_PROMPT_CN. Nothing else changes
    (the `<image>` tag, OCR reference tokens and surrounding whitespace are kept).
    """
    if not isinstance(question, str):
        raise ValueError(f"question must be a str, got {type(question).__name__}")
    lines = [SHORT_ANSWER_PROMPT]
    if multiple_choice:
        lines += [MULTIPLE_CHOICE_PROMPT, MULTIPLE_CHOICE_PROMPT_CN]
    for line in lines:
        question = question.replace("\n" + line, "")
    return question
