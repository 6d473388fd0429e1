"""Tiny random Qwen2.5-VL / Qwen3-VL checkpoints built offline (tests and the throughput benchmark).

The tokenizer is a word-level ``tokenizers`` model over a small vocabulary with Qwen's special tokens, so a
checkpoint is a few MB and needs no hub. Sizes respect vLLM's CPU limits (attention head size >= 32).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

#: Qwen's chat and vision special tokens (ids 0..), then plain words.
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>"]
WORDS = ["user", "assistant", "system", "what", "is", "in", "the", "image", "video", "picture", "describe", "color",
         "left", "right", "top", "bottom", "a", "an", "of", "and", "red", "green", "blue", "dog", "cat", "how", "many",
         "where", "which", "object", "count", "there", "are", "?", ".", ",", "\n", "you", "helpful", "answer",
         "<", ">", "seconds", *"0123456789"]  # the last: Qwen3-VL's frame timestamps ("<0.5 seconds>")
VOCAB = 256  # rows of the embedding (words fill the first ids; the rest are never produced by the tokenizer)


def _tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS + [f"w{i}" for i in range(60)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL[1:])
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
        "{% if c['type'] == 'image' or c['type'] == 'image_url' %}<|vision_start|><|image_pad|><|vision_end|>"
        "{% elif c['type'] == 'video' or c['type'] == 'video_url' %}<|vision_start|><|video_pad|><|vision_end|>"
        "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fast.save_pretrained(path)


def _text_config(path: Path, layers: int, **extra) -> tuple[object, dict[str, int], dict]:
    """Writes the tokenizer at ``path``: (tokenizer, special token ids, the LLM's config: hidden 64, 2 heads of 32)."""
    from transformers import AutoTokenizer

    _tokenizer(path)
    tok = AutoTokenizer.from_pretrained(path)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096, rms_norm_eps=1e-6,
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                **extra)
    return tok, ids, text


def _heavier_decoder(model) -> None:
    """Larger decoder weights: greedy tokens react to which visual tokens are there."""
    with torch.no_grad():
        for p in model.model.language_model.layers.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)


def build_qwen2_5_vl(path: str | Path, seed: int = 0, layers: int = 2) -> Path:
    """A random Qwen2.5-VL (LLM hidden 64, 2 heads of 32; vision depth 2) with tokenizer and processor at ``path``."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    path = Path(path)
    tok, ids, text = _text_config(path, layers, tie_word_embeddings=False, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]})
    torch.manual_seed(seed)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=1, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
                  tokens_per_second=2)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"], eos_token_id=ids["<|im_end|>"],
                           pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|endoftext|>"])
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    _heavier_decoder(model)
    model.save_pretrained(path)
    size = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 256}
    image = Qwen2VLImageProcessorPil(size=size, patch_size=14, merge_size=2, temporal_patch_size=2)
    video = Qwen2VLVideoProcessor(size=size, patch_size=14, merge_size=2, temporal_patch_size=2)
    processor = Qwen2_5_VLProcessor(image_processor=image, tokenizer=tok, video_processor=video,
                                    chat_template=tok.chat_template)
    processor.save_pretrained(path)
    return path


def build_qwen3_vl(path: str | Path, seed: int = 0, layers: int = 3) -> Path:
    """A random Qwen3-VL (LLM hidden 64, 2 heads of 32, interleaved M-RoPE; vision depth 3 with DeepStack after
    blocks 0 and 1; patch 16) with tokenizer and processor at ``path``."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    path = Path(path)
    tok, ids, text = _text_config(path, layers, head_dim=32, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [6, 5, 5], "mrope_interleaved": True})
    torch.manual_seed(seed)
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=1, out_hidden_size=64, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                  deepstack_visual_indexes=[0, 1])
    cfg = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    model = Qwen3VLForConditionalGeneration(cfg).eval()
    _heavier_decoder(model)
    with torch.no_grad():  # DeepStack features that matter
        for p in model.model.visual.deepstack_merger_list.parameters():
            p.normal_(0.0, 0.5)
    model.save_pretrained(path)
    size = {"shortest_edge": 64 * 64, "longest_edge": 32 * 32 * 256}
    # one mean / std for images and video, as Qwen3-VL's checkpoints have it: vLLM normalises the pixels of every
    # modality on the device with one set (mm_device_do_normalize), the image processor's
    norm = dict(image_mean=[0.5] * 3, image_std=[0.5] * 3)
    image = Qwen2VLImageProcessorPil(size=size, patch_size=16, merge_size=2, temporal_patch_size=2, **norm)
    video = Qwen3VLVideoProcessor(size=size, patch_size=16, merge_size=2, temporal_patch_size=2, **norm)
    processor = Qwen3VLProcessor(image_processor=image, tokenizer=tok, video_processor=video,
                                 chat_template=tok.chat_template)
    processor.save_pretrained(path)
    return path
