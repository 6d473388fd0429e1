"""load_pretrained_model picks the sentencepiece-exact tokenizer when the checkpoint ships tokenizer.model.

The reference for ids is the ``sentencepiece`` library itself run on the same model file.
"""

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from PIL import Image

from llava.conversation import conv_templates
from llava.mm_utils import LlamaSentencePieceTokenizer, process_images, tokenizer_image_token
from llava.model.builder import load_pretrained_model
from llava.model.pruning import PruningConfig

LLAMA2_MODEL = Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "llama2" / "tokenizer.model"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def checkpoint_with_tokenizer_model(tiny_path: str, folder: Path, model_file: bytes) -> Path:
    """A copy of the tiny checkpoint whose only tokenizer file is the given sentencepiece tokenizer.model."""
    shutil.copytree(tiny_path, folder)
    for name in TOKENIZER_FILES:
        (folder / name).unlink(missing_ok=True)
    (folder / "tokenizer.model").write_bytes(model_file)
    return folder


def small_sentencepiece_model(vocab_size: int) -> bytes:
    """A Llama-style (BPE, unk=0, bos=1, eos=2) sentencepiece model small enough for the tiny LLM's vocab."""
    lines = ["a red square on a blue background", "what is in the picture", "the cat sat on the mat",
             "describe the image in detail", "answer the question using a single word or phrase",
             "user assistant a chat between a curious human and an artificial intelligence"] * 20
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=out, vocab_size=vocab_size,
                                   model_type="bpe", character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
                                   pad_id=-1, minloglevel=2)
    return out.getvalue()


@pytest.mark.skipif(not LLAMA2_MODEL.is_file(), reason=f"Llama-2 tokenizer.model not found at {LLAMA2_MODEL}")
def test_llama2_tokenizer_model_gives_sentencepiece_exact_ids(tiny_llava15_path, tmp_path):
    folder = checkpoint_with_tokenizer_model(tiny_llava15_path, tmp_path / "ckpt", LLAMA2_MODEL.read_bytes())
    tokenizer, _, _, _ = load_pretrained_model(folder, torch_dtype=torch.float32)
    assert isinstance(tokenizer, LlamaSentencePieceTokenizer)
    sp = spm.SentencePieceProcessor(model_file=str(LLAMA2_MODEL))
    for text in ["What  is in the  picture?", "A   cat  sat.\n\nAnswer  briefly.", "two  spaces"]:
        assert tokenizer(text).input_ids == [sp.bos_id()] + sp.encode(text)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, sp.unk_id())
    # the LLaVA prompt path: the text around <image> is encoded chunk by chunk, each chunk as sentencepiece does
    prompt = "USER: <image>\nWhat  is  it? ASSISTANT:"
    before, after = prompt.split("<image>")
    expected = [1] + sp.encode(before) + [-200] + sp.encode(after)
    assert tokenizer_image_token(prompt, tokenizer) == expected


def test_folder_without_tokenizer_model_uses_autotokenizer_and_override(tiny_llava15_path, tmp_path):
    tokenizer, _, _, _ = load_pretrained_model(tiny_llava15_path, torch_dtype=torch.float32)
    assert not isinstance(tokenizer, LlamaSentencePieceTokenizer)
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        load_pretrained_model(tiny_llava15_path, tokenizer_backend="sentencepiece")
    with pytest.raises(ValueError, match="tokenizer_backend"):
        load_pretrained_model(tiny_llava15_path, tokenizer_backend="fast")


def test_generation_and_query_decoding_with_the_sentencepiece_tokenizer(tiny_llava15_path, tmp_path, monkeypatch):
    """Prompt ids, generate, batch_decode and the query recovered from input_ids (relevance) all work with
    the sentencepiece tokenizer; forcing transformers' tokenizer on the same folder is possible too."""
    model_file = small_sentencepiece_model(vocab_size=150)
    folder = checkpoint_with_tokenizer_model(tiny_llava15_path, tmp_path / "ckpt", model_file)
    tokenizer, model, processor, _ = load_pretrained_model(
        folder, torch_dtype=torch.float32, pruning=PruningConfig(method="script", visual_token_num=4))
    assert isinstance(tokenizer, LlamaSentencePieceTokenizer)
    assert len(tokenizer) <= model.config.vocab_size
    question = "what is in the picture"
    source = model.relevance_source()  # the layer's clip_text source
    queries = []
    segments = source.segments
    monkeypatch.setattr(source, "segments", lambda text: queries.append(text) or segments(text))
    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], "<image>\n" + question)
    conv.append_message(conv.roles[1], None)
    ids = tokenizer_image_token(conv.get_prompt(), tokenizer, return_tensors="pt")[None]
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (40, 50, 3), dtype=np.uint8))
    pixels = process_images([image], processor, model.config)
    beyond_tokenizer = list(range(len(tokenizer), model.config.vocab_size))  # the tiny LLM has a larger vocab
    out = model.generate(ids, images=pixels, image_sizes=[image.size], do_sample=False, max_new_tokens=5,
                         pad_token_id=tokenizer.pad_token_id, suppress_tokens=beyond_tokenizer)
    # (no texts=: the query for relevance is decoded from input_ids with this tokenizer)
    text = tokenizer.batch_decode(out, skip_special_tokens=True)[0]
    assert isinstance(text, str) and out.shape[1] >= 1
    assert model.last_visual_token_counts == [4]
    assert queries == [question]
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    special = {sp.bos_id(), sp.eos_id(), sp.unk_id()}
    assert text == sp.decode([i for i in out[0].tolist() if i not in special])
    forced, _, _, _ = load_pretrained_model(folder, tokenizer_backend="transformers")
    assert not isinstance(forced, LlamaSentencePieceTokenizer)
