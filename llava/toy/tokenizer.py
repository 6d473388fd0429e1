"""Small tokenizers for the toy model, trained with the `tokenizers` library on the toy corpus.

Both are saved as transformers' own classes, so they load with ``AutoTokenizer.from_pretrained`` exactly
like the real checkpoints' tokenizers:
- a Llama-style tokenizer (``LlamaTokenizer``: Metaspace "▁" word marker, byte fallback ``<0x..>``
  tokens, ``<unk>``/``<s>``/``</s>`` at ids 0/1/2, BOS added) for the language model;
- a CLIP-style tokenizer (``CLIPTokenizer``: lower case, "</w>" word ends, start/end tokens) for the
  CLIP text tower.
"""
from __future__ import annotations

import json
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPTokenizer, LlamaTokenizer

LLAMA_SPECIALS: tuple[str, ...] = ("<unk>", "<s>", "</s>")
CLIP_SPECIALS: tuple[str, ...] = ("<|startoftext|>", "<|endoftext|>")


def _trained_bpe(tokenizer: Tokenizer, texts: Iterable[str], vocab_size: int, **trainer_kwargs) -> tuple[dict, list]:
    """Train ``tokenizer`` (a BPE model) on ``texts``; returns (vocab, merges as (a, b) pairs)."""
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, **trainer_kwargs)
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    model = json.loads(tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return _canonical_ids(model["vocab"], merges, trainer_kwargs.get("special_tokens", [])), merges


def _canonical_ids(vocab: dict[str, int], merges: list[tuple[str, str]], specials: list[str]) -> dict[str, int]:
    """The trained vocabulary with ids in a fixed order: specials, the other merge-free tokens sorted, then
    each merge's result in merge order. The ``tokenizers`` trainer learns the same tokens and merges on
    every run but numbers them in a different order each time (hash-set order), which would make the
    embedding rows, and so the whole training run, differ between two runs with the same seed."""
    merged = [a + b for a, b in merges]
    order = [t for t in specials if t in vocab]
    order += sorted(t for t in vocab if t not in set(order) and t not in set(merged))
    order += [t for t in dict.fromkeys(merged) if t in vocab and t not in set(order)]
    if sorted(order) != sorted(vocab):
        raise RuntimeError("canonical vocabulary order lost or duplicated tokens")
    return {t: i for i, t in enumerate(order)}


def train_llama_tokenizer(texts: Iterable[str], vocab_size: int = 600) -> LlamaTokenizer:
    """A byte-fallback BPE ``LlamaTokenizer`` whose merges never cross a word boundary ("▁" starts words)."""
    if vocab_size < 300:
        raise ValueError(f"vocab_size must be >= 300 (3 specials + 256 byte tokens + letters), got {vocab_size}")
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.Replace("\n", " ")   # newlines are byte-fallback tokens, not merged
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    learned, merges = _trained_bpe(bpe, texts, vocab_size - len(LLAMA_SPECIALS) - 256)
    vocab = {tok: i for i, tok in enumerate(LLAMA_SPECIALS)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for tok, _ in sorted(learned.items(), key=lambda kv: kv[1]):
        vocab.setdefault(tok, len(vocab))
    return LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False,
                          model_max_length=2048, padding_side="right")


def train_clip_tokenizer(texts: Iterable[str], vocab_size: int = 400) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` (same normaliser, word split and "</w>" suffix as CLIP's) trained on ``texts``."""
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                             behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    learned, merges = _trained_bpe(bpe, texts, vocab_size, end_of_word_suffix="</w>",
                                   initial_alphabet=alphabet, special_tokens=list(CLIP_SPECIALS))
    vocab = dict(learned)
    for ch in sorted(alphabet):                      # every byte, alone and as a word end, so nothing is unknown
        for tok in (ch, ch + "</w>"):
            vocab.setdefault(tok, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
