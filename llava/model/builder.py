"""``load_pretrained_model``: LLaVA-1.5 / LLaVA-NeXT checkpoints in the original format on transformers 5.

The checkpoints' config.json says ``"model_type": "llava"``, which transformers maps to its own LLaVA
config with another layout. We therefore never go through ``AutoConfig``: config.json is read as a plain
dict, checked against ``architectures`` and loaded into transformers' own ``LlavaForConditionalGeneration``
/ ``LlavaNextForConditionalGeneration`` through the key / config remap of ``llava.model.convert``; the
model returned is the ``llava_arch.LlavaAdapter`` around it (LLaVA's API).

Vision tower weights: LLaVA-1.5 checkpoints do not contain them (they are read from ``mm_vision_tower``,
the CLIP checkpoint); LLaVA-1.6 checkpoints ship a fine-tuned tower under ``model.vision_tower.*``,
which is then used. Any other missing weight is an error that lists the keys.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from .language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM
from .language_model.llava_mistral import LlavaMistralConfig, LlavaMistralForCausalLM
from .convert import load_converted
from .llava_arch import LlavaAdapter
from .multimodal_encoder.clip_encoder import (load_clip_vision_state, quiet_loading, read_checkpoint_tensors,
                                              resolve_vision_tower_path)
from .pruning import PruningConfig

ARCHITECTURES = {
    "LlavaLlamaForCausalLM": (LlavaLlamaForCausalLM, LlavaConfig),
    "LlavaMistralForCausalLM": (LlavaMistralForCausalLM, LlavaMistralConfig),
}
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
VISION_PREFIX = "model.vision_tower."
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def read_config_dict(model_path: str | os.PathLike) -> dict:
    """config.json of a local folder or hub id, as a dict (never through AutoConfig)."""
    local = Path(model_path) / "config.json"
    if not local.is_file():
        if os.path.isdir(model_path):
            raise FileNotFoundError(f"model_path {str(model_path)!r} has no config.json")
        from transformers.utils import cached_file

        try:
            local = Path(cached_file(str(model_path), "config.json"))
        except OSError as err:
            raise FileNotFoundError(
                f"model_path {str(model_path)!r}: no local folder and no hub config.json ({err})") from err
    try:
        config = json.loads(local.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"checkpoint file {local} is not valid JSON ({err}); the checkpoint is corrupt") from err
    if not isinstance(config, dict):
        raise ValueError(f"checkpoint file {local}: expected a JSON object, got {type(config).__name__}")
    return config


def checkpoint_file(model_path: str | os.PathLike, name: str) -> Path | None:
    """``name`` inside a local checkpoint folder or the hub cache of ``model_path``; None when it has no such file."""
    if os.path.isdir(model_path):
        p = Path(model_path) / name
        return p if p.is_file() else None
    from transformers.utils import cached_file

    try:
        found = cached_file(str(model_path), name, _raise_exceptions_for_missing_entries=False)
    except OSError:
        return None
    return Path(found) if found else None


WEIGHT_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def checkpoint_digest(model_path: str | os.PathLike) -> str:
    """Short sha256 of what identifies a checkpoint without reading its weights: config.json (as parsed), the
    weights index when sharded, and the name and size of every weight file of a local folder."""
    h = hashlib.sha256(json.dumps(read_config_dict(model_path), sort_keys=True).encode())
    for name in WEIGHT_INDEX_FILES:
        index = checkpoint_file(model_path, name)
        if index is not None:
            h.update(name.encode() + b"\0" + index.read_bytes())
    if os.path.isdir(model_path):
        for f in sorted(Path(model_path).iterdir()):
            if f.suffix in WEIGHT_SUFFIXES and f.is_file():
                h.update(f"{f.name}:{f.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def unreadable_checkpoint_file(folder: str | os.PathLike) -> tuple[Path, str] | None:
    """The first JSON or safetensors file of a local checkpoint folder that does not parse, with the reason."""
    if not os.path.isdir(folder):
        return None
    for f in sorted(Path(folder).iterdir()):
        try:
            if f.suffix == ".json":
                json.loads(f.read_text(encoding="utf-8"))
            elif f.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(f), framework="pt") as st:
                    st.keys()
        except Exception as err:  # noqa: BLE001 - any parse failure means the file is unreadable
            return f, f"{type(err).__name__}: {err}"
    return None


def corrupt_file_error(folder: str | os.PathLike, what: str) -> ValueError | None:
    """When loading ``what`` of ``folder`` failed: a ValueError naming its unreadable file, or None (then the
    original error, e.g. our own clear FileNotFoundError, is the better message)."""
    bad = unreadable_checkpoint_file(folder)
    if bad is None:
        return None
    return ValueError(f"cannot load the {what} of {str(folder)!r}: file {bad[0]} is corrupt ({bad[1]})")


def resolve_dtype(torch_dtype: Any, device: str | torch.device | None) -> torch.dtype:
    """torch_dtype as a torch.dtype; default float16 on CUDA, float32 elsewhere."""
    if torch_dtype is None or torch_dtype == "auto":
        return torch.float16 if device is not None and torch.device(device).type == "cuda" else torch.float32
    if isinstance(torch_dtype, torch.dtype):
        return torch_dtype
    if isinstance(torch_dtype, str) and torch_dtype in DTYPES:
        return DTYPES[torch_dtype]
    raise ValueError(f"torch_dtype must be a torch.dtype or one of {sorted(DTYPES)}, got {torch_dtype!r}")


def check_attn_implementation(attn_implementation: str) -> str:
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {attn_implementation!r}")
    if attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ValueError("attn_implementation='flash_attention_2' needs the flash-attn package (pip install flash-attn)")
    return attn_implementation


def build_llava_config(config_dict: dict, model_path: str | os.PathLike):
    """(model class, config) for a LLaVA config.json dict; mm_vision_tower resolved to a usable path."""
    archs = config_dict.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise ValueError(
            f"config.json of {str(model_path)!r} has architectures {archs}; expected one of {sorted(ARCHITECTURES)} "
            "(LLaVA's original checkpoint format)"
        )
    if not config_dict.get("mm_vision_tower"):
        raise ValueError(f"config.json of {str(model_path)!r} has no mm_vision_tower: not a LLaVA checkpoint")
    model_cls, config_cls = ARCHITECTURES[arch]
    fields = {k: v for k, v in config_dict.items() if k not in ("model_type", "transformers_version")}
    fields["mm_vision_tower"] = resolve_vision_tower_path(fields["mm_vision_tower"], model_path)
    return model_cls, config_cls(**fields)


TOKENIZER_BACKENDS = ("auto", "sentencepiece", "transformers")


def has_sentencepiece_model(model_path: str | os.PathLike) -> bool:
    """True when the checkpoint (local folder or hub id) ships a sentencepiece ``tokenizer.model``."""
    if os.path.isdir(model_path):
        return (Path(model_path) / "tokenizer.model").is_file()
    from transformers.utils import cached_file

    try:
        return cached_file(str(model_path), "tokenizer.model", _raise_exceptions_for_missing_entries=False) is not None
    except OSError:
        return False


def _load_tokenizer(model_path: str | os.PathLike, config, backend: str = "auto"):
    """The checkpoint's tokenizer.

    ``backend="auto"``: the sentencepiece-exact ``LlamaSentencePieceTokenizer`` when the checkpoint has a
    ``tokenizer.model`` (all real LLaVA-1.5/1.6 checkpoints: it reproduces LLaVA's ``use_fast=False`` ids,
    which transformers 5's converted tokenizer does not on runs of spaces), else ``AutoTokenizer``.
    ``"sentencepiece"`` / ``"transformers"`` force one of the two. A missing pad token becomes the unk token
    (LLaVA's convention for its Llama tokenizers)."""
    from transformers import AutoTokenizer

    from llava.mm_utils import load_sentencepiece_tokenizer

    if backend not in TOKENIZER_BACKENDS:
        raise ValueError(f"tokenizer_backend must be one of {TOKENIZER_BACKENDS}, got {backend!r}")
    if backend == "sentencepiece" or (backend == "auto" and has_sentencepiece_model(model_path)):
        tokenizer = load_sentencepiece_tokenizer(model_path)
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_path, use_fast=False)
    if tokenizer.pad_token is None and tokenizer.unk_token is not None:
        tokenizer.pad_token = tokenizer.unk_token
    added = []
    if getattr(config, "mm_use_im_patch_token", False):
        added.append("<im_patch>")
    if getattr(config, "mm_use_im_start_end", False):
        added += ["<im_start>", "<im_end>"]
    if added:
        tokenizer.add_tokens(added, special_tokens=True)
    return tokenizer


def load_pretrained_model(
    model_path: str | os.PathLike,
    model_base: str | None = None,
    model_name: str | None = None,
    *,
    device_map: str | dict | None = None,
    device: str | torch.device = "cpu",
    torch_dtype: torch.dtype | str | None = None,
    attn_implementation: str = "sdpa",
    pruning: PruningConfig | dict | None = None,
    tokenizer_backend: str = "auto",
):
    """Load a LLaVA checkpoint -> (tokenizer, model, image_processor, context_len).

    ``device_map="auto"`` shards over the visible GPUs with accelerate; otherwise the model goes to ``device``.
    ``pruning`` (PruningConfig / dict / None) is installed with ``model.set_pruning``.
    ``tokenizer_backend``: "auto" (sentencepiece-exact when the checkpoint has tokenizer.model, else
    AutoTokenizer), "sentencepiece" or "transformers" (see ``_load_tokenizer``).
    """
    if tokenizer_backend not in TOKENIZER_BACKENDS:
        raise ValueError(f"tokenizer_backend must be one of {TOKENIZER_BACKENDS}, got {tokenizer_backend!r}")
    if model_base is not None:
        raise ValueError("model_base (LoRA / projector-only checkpoints) is not supported: pass a merged checkpoint")
    attn_implementation = check_attn_implementation(attn_implementation)
    dtype = resolve_dtype(torch_dtype, device if device_map is None else "cuda")
    model_cls, config = build_llava_config(read_config_dict(model_path), model_path)
    with quiet_loading():
        hf = model_cls(config, dtype)  # transformers' own LLaVA class, empty
    try:
        state = read_checkpoint_tensors(str(model_path))
    except Exception as err:  # noqa: BLE001 - e.g. safetensors' "header too large", which names no file
        raise corrupt_file_error(model_path, "weights") or err
    shipped = any(k.startswith(VISION_PREFIX) for k in state)
    try:
        vision_state = None if shipped else load_clip_vision_state(config.mm_vision_tower)
    except Exception as err:  # noqa: BLE001
        raise corrupt_file_error(config.mm_vision_tower, "vision tower weights") or err
    hf, unexpected = load_converted(hf, state, vision_state, f"checkpoint {str(model_path)!r}")
    if unexpected:
        warnings.warn(f"checkpoint {str(model_path)!r} has weights this model does not use (ignored): {unexpected}")
    hf.set_attn_implementation(attn_implementation)
    if device_map is None:
        hf.to(device)
    else:
        from accelerate import dispatch_model, infer_auto_device_map

        hf = dispatch_model(hf, device_map=infer_auto_device_map(hf) if device_map == "auto" else device_map)
    model = LlavaAdapter(hf, config, config.mm_vision_tower).eval()
    try:
        tokenizer = _load_tokenizer(model_path, config, tokenizer_backend)
    except Exception as err:  # noqa: BLE001
        raise corrupt_file_error(model_path, "tokenizer") or err
    from transformers import CLIPImageProcessorPil  # LLaVA's numbers come from the PIL path

    try:
        image_processor = CLIPImageProcessorPil.from_pretrained(config.mm_vision_tower)
    except Exception as err:  # noqa: BLE001
        raise corrupt_file_error(config.mm_vision_tower, "image processor") or err
    model.set_query_tokenizer(tokenizer)
    model.set_pruning(pruning)
    context_len = int(getattr(config, "max_sequence_length", 2048))
    return tokenizer, model, image_processor, context_len
