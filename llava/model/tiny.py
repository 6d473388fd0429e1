"""Tiny random LLaVA checkpoints in the ORIGINAL LLaVA format, built fully offline.

The folder written by :func:`make_tiny_checkpoint` looks like a real ``liuhaotian/llava-v1.5-7b``
(or ``llava-v1.6-vicuna-7b``) folder, only a few hundred kilobytes big:

    out_dir/
      config.json              model_type "llava", architectures ["LlavaLlamaForCausalLM"], mm_* keys
      model.safetensors        LLM + model.mm_projector.* (+ model.image_newline and the fine-tuned
                               vision tower model.vision_tower.vision_tower.* for LLaVA-NeXT, as in 1.6)
      tokenizer.json, tokenizer_config.json, special_tokens_map.json   a small Llama-style BPE tokenizer
      clip/                    a tiny CLIP (vision + text towers, both projections, CLIP tokenizer,
                               preprocessor_config.json) referenced by ``mm_vision_tower``

CLI: ``python -m llava.model.tiny --out DIR --arch llava-1.5|llava-next [--seed 0]``.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

ARCHS = ("llava-1.5", "llava-next")

# A built-in training text for the tiny tokenizer (any text works; it only decides the merges).
_TOKENIZER_TEXT = """A chat between a curious user and an artificial intelligence assistant.
The assistant gives helpful, detailed, and polite answers to the user's questions.
USER: What is shown in the image? ASSISTANT: A cat sitting on a red chair next to a window.
Answer the question using a single word or phrase. Answer with the option's letter from the given choices directly.
Is there a dog in the image? Yes. No. How many people are there? Two. What color is the bus? Yellow.
The quick brown fox jumps over the lazy dog. Describe this photo in detail. What does the sign say?
"""


@dataclass(frozen=True)
class TinySizes:
    """Sizes of the tiny towers (kept small so a checkpoint is written in well under a second)."""

    image_size: int = 56  # 56 / 14 = 4 x 4 = 16 patches (+ CLS)
    patch_size: int = 14
    vision_hidden: int = 32
    vision_layers: int = 3
    text_hidden: int = 32
    text_layers: int = 2
    projection_dim: int = 24
    llm_hidden: int = 64
    llm_intermediate: int = 128
    llm_layers: int = 2
    llm_heads: int = 4
    llm_vocab_target: int = 400
    grid_pinpoints: tuple = field(default=((56, 112), (112, 56), (112, 112), (56, 168), (168, 56)))


def _build_llama_tokenizer(vocab_size: int):
    """A Llama-style BPE tokenizer (Metaspace, byte fallback) trained on the built-in text.

    Ids: <unk>=0, <s>=1, </s>=2, <0x00>..<0xFF>=3..258, then the trained pieces; pad = <unk>
    (as in LLaVA's Vicuna tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=list("▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;?!'\"-()"))
    trainer_tok.train_from_iterator(_TOKENIZER_TEXT.splitlines(), trainer=trainer)
    model_json = json.loads(trainer_tok.to_str())["model"]
    vocab = model_json["vocab"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model_json["merges"]]
    tok = LlamaTokenizer(vocab=vocab, merges=merges, add_prefix_space=True, legacy=False,
                         add_bos_token=True, add_eos_token=False)
    tok.pad_token = "<unk>"
    return tok


def _build_clip_tokenizer():
    """A character-level CLIP BPE tokenizer: every byte-level symbol with and without "</w>", no merges.

    Ids 0..511 are symbols, 512 = <|startoftext|>, 513 = <|endoftext|> (the order real CLIP uses: specials last)."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    for ch in alphabet:
        vocab[ch + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


def _write_tiny_clip(clip_dir: Path, sizes: TinySizes, seed: int) -> torch.nn.Module:
    """Save a random CLIPModel + CLIP tokenizer + preprocessor_config.json; returns the CLIPModel."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    tokenizer = _build_clip_tokenizer()
    vocab_size = len(tokenizer)
    text_cfg = dict(vocab_size=vocab_size, hidden_size=sizes.text_hidden, intermediate_size=2 * sizes.text_hidden,
                    num_hidden_layers=sizes.text_layers, num_attention_heads=2, max_position_embeddings=77,
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id, projection_dim=sizes.projection_dim)
    vision_cfg = dict(hidden_size=sizes.vision_hidden, intermediate_size=2 * sizes.vision_hidden,
                      num_hidden_layers=sizes.vision_layers, num_attention_heads=2, image_size=sizes.image_size,
                      patch_size=sizes.patch_size, projection_dim=sizes.projection_dim)
    config = CLIPConfig(text_config=text_cfg, vision_config=vision_cfg, projection_dim=sizes.projection_dim)
    torch.manual_seed(seed + 1)
    clip = CLIPModel(config).eval()
    clip.save_pretrained(clip_dir)
    tokenizer.save_pretrained(clip_dir)
    processor = CLIPImageProcessorPil(size={"shortest_edge": sizes.image_size},
                                      crop_size={"height": sizes.image_size, "width": sizes.image_size})
    processor.save_pretrained(clip_dir)
    # Record the class name real CLIP checkpoints use (our loader pins the PIL backend itself).
    pp_path = clip_dir / "preprocessor_config.json"
    pp = json.loads(pp_path.read_text())
    pp["image_processor_type"] = "CLIPImageProcessor"
    pp_path.write_text(json.dumps(pp, indent=2))
    return clip


def original_llava_config(
    *,
    name: str,
    arch: str,
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    vocab_size: int,
    bos_token_id: int,
    eos_token_id: int,
    vision_tower: str,
    vision_hidden: int,
    max_positions: int = 4096,
    grid_pinpoints: Sequence[Sequence[int]] | None = None,
) -> dict:
    """A config.json dict in the original LLaVA format (model_type "llava", ``mm_*`` keys), Llama LLM.

    ``arch`` "llava-1.5" gives pad + flat; "llava-next" gives anyres + spatial_unpad over ``grid_pinpoints``.
    Used by the tiny random checkpoints and by the toy model's training.
    """
    if arch not in ("llava-1.5", "llava-next"):
        raise ValueError(f"arch must be 'llava-1.5' or 'llava-next', got {arch!r}")
    cfg = {
        "_name_or_path": name,
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "max_position_embeddings": max_positions,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "initializer_range": 0.02,
        "vocab_size": vocab_size,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": 0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "torch_dtype": "float32",
        # --- LLaVA keys ---
        "mm_vision_tower": vision_tower,
        "mm_hidden_size": vision_hidden,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "mm_projector_lr": None,
        "freeze_mm_mlp_adapter": False,
        "tune_mm_mlp_adapter": False,
        "use_mm_proj": True,
        "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right",
    }
    if arch == "llava-1.5":
        cfg.update({"image_aspect_ratio": "pad", "mm_patch_merge_type": "flat"})
    else:
        if not grid_pinpoints:
            raise ValueError("grid_pinpoints: required for arch 'llava-next'")
        cfg.update({
            "image_aspect_ratio": "anyres",
            "image_grid_pinpoints": [list(p) for p in grid_pinpoints],
            "mm_patch_merge_type": "spatial_unpad",
            "unfreeze_mm_vision_tower": True,
            "mm_vision_tower_lr": 2e-6,
        })
    return cfg


def _llava_config(arch: str, sizes: TinySizes, vocab_size: int, tokenizer, clip_dir: Path) -> dict:
    """The tiny checkpoint's config.json dict in the original LLaVA format."""
    return original_llava_config(
        name=f"tiny-{arch}", arch=arch, hidden=sizes.llm_hidden, intermediate=sizes.llm_intermediate,
        layers=sizes.llm_layers, heads=sizes.llm_heads, vocab_size=vocab_size,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        vision_tower=str(clip_dir), vision_hidden=sizes.vision_hidden,
        grid_pinpoints=None if arch == "llava-1.5" else sizes.grid_pinpoints,
    )


def _llava_state_dict(arch: str, sizes: TinySizes, vocab_size: int, clip, seed: int) -> dict[str, torch.Tensor]:
    """Random LLM + projector (+ newline and fine-tuned vision tower for NeXT), named as in LLaVA's checkpoints."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    llm_cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=sizes.llm_hidden,
                          intermediate_size=sizes.llm_intermediate, num_hidden_layers=sizes.llm_layers,
                          num_attention_heads=sizes.llm_heads, num_key_value_heads=sizes.llm_heads,
                          tie_word_embeddings=False)
    llm = LlamaForCausalLM(llm_cfg)
    # A larger init than the default 0.02 so logits differ visibly between inputs (tests need contrast).
    with torch.no_grad():
        for p in llm.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    state = {k: v.detach().clone().contiguous() for k, v in llm.state_dict().items()}
    gen = torch.Generator().manual_seed(seed + 7)
    d_v, d = sizes.vision_hidden, sizes.llm_hidden
    state["model.mm_projector.0.weight"] = torch.randn(d, d_v, generator=gen) * 0.3
    state["model.mm_projector.0.bias"] = torch.randn(d, generator=gen) * 0.1
    state["model.mm_projector.2.weight"] = torch.randn(d, d, generator=gen) * 0.3
    state["model.mm_projector.2.bias"] = torch.randn(d, generator=gen) * 0.1
    if arch == "llava-next":
        state["model.image_newline"] = torch.randn(d, generator=gen)
        # LLaVA-1.6 fine-tunes the vision tower and ships it in the checkpoint: ship a perturbed copy so a
        # loader that ignores it (and reads the CLIP folder instead) gives different outputs.
        for k, v in clip.vision_model.state_dict().items():
            noise = torch.randn(v.shape, generator=gen) * 0.01 if v.is_floating_point() else 0
            state[f"model.vision_tower.vision_tower.vision_model.{k}"] = (v + noise).contiguous()
    return state


def make_tiny_checkpoint(out_dir: str | os.PathLike, arch: str = "llava-1.5", seed: int = 0) -> str:
    """Write a tiny random LLaVA-1.5 or LLaVA-NeXT checkpoint (original format) into ``out_dir``; returns its path."""
    from safetensors.torch import save_file

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    sizes = TinySizes()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clip_dir = out / "clip"
    clip = _write_tiny_clip(clip_dir, sizes, seed)
    tokenizer = _build_llama_tokenizer(sizes.llm_vocab_target)
    vocab_size = len(tokenizer)
    tokenizer.save_pretrained(out)
    cfg = _llava_config(arch, sizes, vocab_size, tokenizer, clip_dir.resolve())
    state = _llava_state_dict(arch, sizes, vocab_size, clip, seed)
    tmp = out / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": 0}, indent=2))
    return str(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a tiny random LLaVA checkpoint (original LLaVA format).")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--arch", default="llava-1.5", choices=ARCHS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(make_tiny_checkpoint(args.out, args.arch, args.seed))


if __name__ == "__main__":
    main()
