"""Train the toy LLaVA end to end on CPU: tokenizers, a tiny CLIP, then a tiny LLaVA-1.5.

    python -m llava.toy.train --out DIR [--seed 0] [--quick]

Stages (all seeded):
1. scenes: ``train_scenes`` training scenes from :mod:`llava.toy.scenes` (in memory) and the val split;
2. tokenizers: a Llama-style and a CLIP-style BPE tokenizer trained on the toy text (:mod:`llava.toy.tokenizer`);
3. CLIP: ``transformers.CLIPModel`` (ViT 12 x 12 patches + text tower + projections) trained with its own
   contrastive loss on (image, caption) pairs; saved with its tokenizer and a PIL ``CLIPImageProcessor``
   config in ``DIR/clip``;
4. seeing shapes (:func:`train_vision_dense`): the vision tower and the ``mlp2x_gelu`` projector learn to
   tell, per patch token, which object covers the patch and in which grid column it lies;
4b. query relevance (:func:`train_query_alignment`): the CLIP text side learns that a question's embedding
   is farthest from its object's patches (real CLIP's inversion, undone by LLaVA's default negation);
5. LLaVA: the frozen vision tower (layer ``mm_vision_select_layer`` = -2, patch tokens), the projector and a
   small Llama trained on multi-turn QA conversations in the ``vicuna_v1`` prompt; only answer tokens (and
   their ``</s>``) are in the loss, as in LLaVA's ``preprocess_v1``, plus training-only losses that teach the
   LLM where to look (:func:`attention_targets`, :class:`ObjectReadout`). Written in LLaVA's original
   checkpoint format (config.json model_type "llava", ``model.mm_projector.*`` weights, tokenizer files) with
   ``mm_vision_tower`` = "clip", the folder beside it.

The LLaVA stage trains the same modules that ``LlavaLlamaForCausalLM`` holds (LlamaModel + lm_head +
projector) on cached vision features: the first turn is tokenised with ``tokenizer_image_token`` on the
exact prompt that evaluation uses, and the visual tokens are spliced in where ``IMAGE_TOKEN_INDEX`` is.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.conversation import conv_templates
from llava.mm_utils import tokenizer_image_token
from llava.model.tiny import original_llava_config
from llava.toy.scenes import (CATEGORIES, COLORS, EXISTENCE_CATEGORIES, PLURALS, QA, SHAPES, SceneConfig,
                              SceneObject, caption, color_qa, count_qa, existence_qa, make_scene, object_index_mask,
                              relation_qa, scene_rng, with_short_answer_prompt)
from llava.toy.tokenizer import train_clip_tokenizer, train_llama_tokenizer

CONV_MODE = "vicuna_v1"
CAPTION_PROMPT = "Describe the objects in the image from left to right."   # LLaVA stage-1 style caption turn
CLIP_SUBDIR = "clip"


@dataclass
class ClipSizes:
    image_size: int = 168          # 168 / 14 = 12 x 12 = 144 patch tokens
    patch_size: int = 14
    vision_hidden: int = 96
    vision_layers: int = 4
    vision_heads: int = 4
    text_hidden: int = 96
    text_layers: int = 1
    text_heads: int = 4
    projection_dim: int = 96
    vocab_size: int = 400


@dataclass
class LlmSizes:
    hidden: int = 128
    intermediate: int = 384
    layers: int = 3
    heads: int = 4
    vocab_size: int = 600
    init_std: float = 0.02         # weight init (LlamaConfig.initializer_range)


@dataclass
class ToyTrainConfig:
    """Everything that decides the trained toy model."""

    seed: int = 0
    train_scenes: int = 4000
    val_scenes: int = 100
    clip: ClipSizes = field(default_factory=ClipSizes)
    llm: LlmSizes = field(default_factory=LlmSizes)
    clip_steps: int = 100
    clip_batch: int = 32
    clip_lr: float = 1e-3
    llava_steps: int = 2000
    llava_batch: int = 12
    llava_lr: float = 2e-3
    rounds: int = 10               # QA turns per training conversation
    caption_turn: bool = False     # add a caption turn ("Describe the objects ...") to every conversation
    caption_first: float = 0.25    # chance that the caption turn comes first
    clip_patch_mean: bool = False  # also align the mean of the layer -2 patch features with the caption
    dense_steps: int = 1500        # stage 3: vision tower + projector trained on per-patch object classes
    dense_batch: int = 32
    dense_lr: float = 1.5e-3
    align_steps: int = 300         # query alignment: CLIP text tower + projections taught to point questions at patches
    align_batch: int = 64
    align_lr: float = 1e-3
    align_negated: bool = True     # as with real CLIP, the asked object's patches get the LOWEST cosine to the
                                   # question (LLaVA's pruning negates the relevance by default)
    tune_vision: bool = False      # also train the CLIP vision tower in the LLaVA stage (as LLaVA-NeXT does)
    vision_lr: float = 5e-4
    dense_weight: float = 1.0      # weight of the per-patch object-identity loss on the projector output (0: off)
    dense_background_weight: float = 0.2   # class weight of "no object" patches in that loss
    dense_min_cover: float = 0.2   # a patch is labelled with an object covering at least this fraction of it
    attn_weight: float = 1.0       # weight of the attention-supervision loss (0: off)
    attn_word_layers: tuple[int, ...] = (0,)  # LLM layers whose heads 0 / 1, at each answer position, are taught to
                                              # attend to the words naming object A / B of the question
    attn_layers: tuple[int, ...] = (1,)       # ... and, in these layers, to the patches of object A / B
    readout_weight: float = 1.0    # weight of the probes that read objects A and B's class and column from the
                                   # residual stream after the first of attn_layers (0: off)
    warmup: int = 30
    threads: int = 2               # torch CPU threads; results are reproducible for a fixed thread count
    log_every: int = 25
    val_every: int = 500           # steps between val evaluations logged in the vision and LLaVA stages (no
                                   # effect on the weights)


# ----------------------------------------------------------------------------------------------- helpers
def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to 5% of ``peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def system_prompt() -> str:
    return conv_templates[CONV_MODE].system


def eval_prompt(question: str) -> str:
    """The first-turn prompt exactly as LLaVA's evaluation builds it (``<image>`` first, open assistant turn)."""
    conv = conv_templates[CONV_MODE].copy()
    conv.append_message(conv.roles[0], "<image>\n" + question)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def training_qas(objects: list[SceneObject], rng: np.random.Generator, rounds: int, cfg: SceneConfig) -> list[QA]:
    """``rounds`` questions about one scene, categories drawn uniformly (yes/no balanced for existence)."""
    qas: list[QA] = []
    for _ in range(rounds * 3):
        if len(qas) == rounds:
            break
        cat = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        if cat in ("random", "popular", "adversarial"):
            qa = existence_qa(rng, objects, cat, positive=bool(rng.random() < 0.5))
        elif cat == "color":
            qa = color_qa(rng, objects)
        elif cat == "count":
            qa = count_qa(rng, objects)
        else:
            qa = relation_qa(rng, objects, cfg)
        if qa is not None:
            qas.append(qa)
    return qas


def tokenizer_corpus(scenes, n_conversations: int = 400) -> list[str]:
    """Text the tokenizers are trained on: prompts, captions and questions/answers."""
    conv = conv_templates[CONV_MODE]
    texts = [f"{system_prompt()} {conv.roles[0]}: {conv.roles[1]}:", CAPTION_PROMPT] * 20
    texts += [caption(s) for s in scenes]
    texts += [with_short_answer_prompt(q.question) + " " + q.answer for s in scenes[:n_conversations] for q in s.qas]
    return texts


# ----------------------------------------------------------------------------------------------- CLIP
def build_clip(sizes: ClipSizes, clip_tokenizer):
    from transformers import CLIPConfig, CLIPModel

    text_cfg = dict(vocab_size=len(clip_tokenizer), hidden_size=sizes.text_hidden,
                    intermediate_size=4 * sizes.text_hidden, num_hidden_layers=sizes.text_layers,
                    num_attention_heads=sizes.text_heads, max_position_embeddings=77,
                    bos_token_id=clip_tokenizer.bos_token_id, eos_token_id=clip_tokenizer.eos_token_id,
                    pad_token_id=clip_tokenizer.pad_token_id, projection_dim=sizes.projection_dim)
    vision_cfg = dict(hidden_size=sizes.vision_hidden, intermediate_size=4 * sizes.vision_hidden,
                      num_hidden_layers=sizes.vision_layers, num_attention_heads=sizes.vision_heads,
                      image_size=sizes.image_size, patch_size=sizes.patch_size, projection_dim=sizes.projection_dim)
    return CLIPModel(CLIPConfig(text_config=text_cfg, vision_config=vision_cfg, projection_dim=sizes.projection_dim))


def build_image_processor(sizes: ClipSizes):
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": sizes.image_size},
                                 crop_size={"height": sizes.image_size, "width": sizes.image_size})


def pixel_values(images, image_processor, batch: int = 256) -> torch.Tensor:
    """(N, 3, S, S) float32 pixels through the processor (LLaVA-1.5's "pad" is a no-op on square scenes)."""
    from llava.mm_utils import process_images

    class _Cfg:
        image_aspect_ratio = "pad"

    return torch.cat([process_images(images[i:i + batch], image_processor, _Cfg) for i in range(0, len(images), batch)])


def train_clip(clip, pixels: torch.Tensor, caption_ids: torch.Tensor, caption_mask: torch.Tensor,
               cfg: ToyTrainConfig, log) -> list[float]:
    """Contrastive training (CLIPModel's own symmetric InfoNCE loss); returns the loss curve."""
    gen = torch.Generator().manual_seed(cfg.seed + 11)
    opt = torch.optim.AdamW(clip.parameters(), lr=cfg.clip_lr, weight_decay=0.05)
    clip.train()
    losses = []
    for step in range(cfg.clip_steps):
        _set_lr(opt, cosine_lr(step, cfg.clip_steps, cfg.clip_lr, cfg.warmup))
        idx = torch.randperm(len(pixels), generator=gen)[: cfg.clip_batch]
        out = clip(input_ids=caption_ids[idx], attention_mask=caption_mask[idx], pixel_values=pixels[idx],
                   return_loss=True, output_hidden_states=cfg.clip_patch_mean)
        loss = out.loss
        if cfg.clip_patch_mean:
            loss = loss + patch_mean_contrastive_loss(clip, out)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
        opt.step()
        losses.append(float(out.loss.detach()))
        if step % cfg.log_every == 0 or step == cfg.clip_steps - 1:
            log(f"clip step {step:4d}  loss {np.mean(losses[-cfg.log_every:]):.4f}")
    clip.eval()
    return losses


def patch_mean_contrastive_loss(clip, out) -> torch.Tensor:
    """Symmetric InfoNCE between the caption embeddings and the projected MEAN of the layer -2 patch features.

    Makes the average of the patch tokens (what uniform attention reads) describe the scene's objects."""
    patches = out.vision_model_output.hidden_states[-2][:, 1:]                  # (B, P, Dv)
    img = clip.visual_projection(clip.vision_model.post_layernorm(patches.mean(1)))
    img = nn.functional.normalize(img, dim=-1)
    txt = nn.functional.normalize(out.text_embeds, dim=-1)
    logits = clip.logit_scale.exp() * img @ txt.T                               # (B, B)
    target = torch.arange(len(logits), device=logits.device)
    return 0.5 * (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target))


@torch.no_grad()
def clip_retrieval_accuracy(clip, pixels: torch.Tensor, caption_ids: torch.Tensor, caption_mask: torch.Tensor) -> float:
    """Image -> caption top-1 accuracy among the given pairs (a sanity number for the CLIP stage)."""
    img = clip.get_image_features(pixel_values=pixels)
    txt = clip.get_text_features(input_ids=caption_ids, attention_mask=caption_mask)
    img = getattr(img, "pooler_output", img)
    txt = getattr(txt, "pooler_output", txt)
    sims = nn.functional.normalize(img, dim=-1) @ nn.functional.normalize(txt, dim=-1).T
    return float((sims.argmax(-1) == torch.arange(len(sims))).float().mean())


@torch.no_grad()
def vision_features(vision_model, pixels: torch.Tensor, select_layer: int = -2, batch: int = 128) -> torch.Tensor:
    """(N, P, Dv) patch features of hidden layer ``select_layer`` (CLS dropped), LLaVA's "patch" feature."""
    feats = []
    for i in range(0, len(pixels), batch):
        out = vision_model(pixel_values=pixels[i:i + batch], output_hidden_states=True)
        feats.append(out.hidden_states[select_layer][:, 1:])
    return torch.cat(feats)


# ----------------------------------------------------------------------------------------------- dense labels
N_OBJECT_CLASSES = 1 + len(COLORS) * len(SHAPES)      # 0 = no object, then one class per (colour, shape)


def object_class(obj: SceneObject) -> int:
    """1 + colour index * n_shapes + shape index."""
    return 1 + list(COLORS).index(obj.color) * len(SHAPES) + SHAPES.index(obj.shape)


def patch_object_labels(objects: list[SceneObject], image_size: int, patch_size: int,
                        min_cover: float) -> np.ndarray:
    """(P,) int64 class of the object covering most of each patch (row-major patches, as the ViT orders
    them), 0 where no object covers at least ``min_cover`` of the patch."""
    if image_size % patch_size:
        raise ValueError(f"image_size must be a multiple of patch_size ({patch_size}), got {image_size}")
    g = image_size // patch_size
    mask = object_index_mask(objects, image_size)                                   # (S, S)
    blocks = mask.reshape(g, patch_size, g, patch_size).transpose(0, 2, 1, 3).reshape(g * g, -1)  # (P, p*p)
    cover = np.stack([(blocks == k + 1).sum(1) for k in range(len(objects))], 1)   # (P, n_objects)
    classes = np.array([object_class(o) for o in objects])
    best = cover.argmax(1)
    enough = cover.max(1) >= min_cover * patch_size * patch_size
    return np.where(enough, classes[best], 0).astype(np.int64)


def dense_object_loss(head: nn.Linear, image_tokens: torch.Tensor, labels: torch.Tensor,
                      background_weight: float) -> torch.Tensor:
    """Cross-entropy of a linear read-out of every projected visual token (B, P, D) against (B, P) labels."""
    logits = head(image_tokens)                                                    # (B, P, C)
    weight = torch.ones(logits.shape[-1], device=logits.device, dtype=logits.dtype)
    weight[0] = background_weight
    return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), weight=weight)


def question_objects(qa: QA) -> tuple[list[str], list[str]]:
    """The words that name object A and object B of a question, in question order (B is A except for
    ``relation``); ([], []) for captions. Colour questions name a shape, count questions its plural."""
    words = qa.question.rstrip("?").split()
    if qa.category == "caption":
        return [], []
    if qa.category == "color":
        a = [w for w in words if w in SHAPES]
        return a, a
    if qa.category == "count":
        a = [w for w in words if w in PLURALS.values()]
        return a, a
    named = [i for i, w in enumerate(words) if w in COLORS]          # colour word, then its shape word
    pairs = [words[i:i + 2] for i in named]
    if qa.category == "relation":
        return pairs[0], pairs[1]
    return pairs[0], pairs[0]


def asked_objects(qa: QA, objects: list[SceneObject]) -> tuple[list[int], list[int]]:
    """Classes of the scene's objects that object A and object B of a question refer to (see
    :func:`question_objects`): every object of the shape for colour/count questions, the named object if
    present otherwise; empty for captions and absent objects."""
    a_words, b_words = question_objects(qa)

    def classes(words: list[str]) -> list[int]:
        if len(words) == 1:                                             # a shape (or its plural)
            shape = next(s for s in SHAPES if words[0] in (s, PLURALS[s]))
            return [object_class(o) for o in objects if o.shape == shape]
        return [object_class(o) for o in objects if [o.color, o.shape] == words]

    return classes(a_words), classes(b_words)


def find_words(ids: list[int], start: int, words: list[str], word_ids) -> list[list[int]]:
    """Token positions of each of ``words`` in ``ids``, searched in order from ``start`` (each word after the
    previous one); ``word_ids(w)`` lists the id sequences a word can have inside a sentence."""
    found = []
    for w in words:
        candidates = word_ids(w)
        match = next(((i, len(sub)) for i in range(start, len(ids)) for sub in candidates
                      if ids[i:i + len(sub)] == sub), None)
        if match is not None:
            found.append(list(range(match[0], match[0] + match[1])))
            start = match[0] + match[1]
        else:
            raise ValueError(f"word {w!r} not found in the token ids after position {start}")
    return found


@dataclass(frozen=True)
class AttentionTarget:
    """One supervised attention row: at query position ``query`` of batch row ``row``, head ``head`` of the
    layers of ``kind`` ("words" or "patches") should put its mass on ``keys`` (positions in the spliced
    sequence)."""

    row: int
    head: int
    query: int
    keys: tuple[int, ...]
    kind: str


def attention_targets(encoded: list[tuple], conversations: list[list[QA]], scene_objects: list[list[SceneObject]],
                      patch_labels: torch.Tensor, image_pos: torch.Tensor, word_ids) -> list[AttentionTarget]:
    """Targets of the attention supervision for a batch of encoded conversations.

    ``encoded[b]`` is ``(ids, labels, answer_positions, question_starts)`` of row ``b`` (text positions, before
    splicing), ``patch_labels`` (B, P) the patch classes, ``image_pos`` (B,) the image token's text position.
    At each answer position head 0 is taught to look at object A and head 1 at object B
    (:func:`question_objects`): in the "words" layers at the tokens that name it, in the "patches" layers
    at the patches it covers, or at the first token (``<s>``) when an existence question names an absent
    object (an explicit "not found", which is what the binding-error negatives need)."""
    n_patches = patch_labels.shape[1]

    def spliced(b: int, t: int) -> int:
        return t + n_patches - 1 if t > int(image_pos[b]) else t

    targets = []
    for b, ((ids, _, answers, starts), qas) in enumerate(zip(encoded, conversations)):
        for answer, start, qa in zip(answers, starts, qas):
            q = spliced(b, answer)
            a_words, b_words = question_objects(qa)
            found = find_words(ids, start, a_words + (b_words if qa.category == "relation" else []), word_ids)
            positions = (found[:len(a_words)], found[len(a_words):] if qa.category == "relation" else found)
            for head, (names, pos, classes) in enumerate(zip((a_words, b_words), positions,
                                                             asked_objects(qa, scene_objects[b]))):
                if names:
                    toks = [t for p in pos for t in p]
                    targets.append(AttentionTarget(b, head, q, tuple(spliced(b, t) for t in toks), "words"))
                patches = (torch.nonzero(torch.isin(patch_labels[b], torch.tensor(classes))).flatten()
                           if classes else torch.zeros(0, dtype=torch.long))
                if len(patches):
                    keys = tuple(int(image_pos[b]) + int(p) for p in patches)
                    targets.append(AttentionTarget(b, head, q, keys, "patches"))
                elif names and qa.category in EXISTENCE_CATEGORIES:
                    # the asked object is absent: look at the first token (<s>) instead, "nothing found"
                    targets.append(AttentionTarget(b, head, q, (0,), "patches"))
    return targets


def attention_supervision_loss(attentions, targets: list[AttentionTarget], word_layers: tuple[int, ...],
                               patch_layers: tuple[int, ...]) -> torch.Tensor:
    """Mean over targets and supervised layers of -log(attention mass of the target head on its keys).

    ``attentions[l]`` is layer l's (B, H, T, T) attention; "words" targets are applied in ``word_layers``,
    "patches" targets in ``patch_layers``."""
    losses = []
    for kind, layers in (("words", word_layers), ("patches", patch_layers)):
        chosen = [t for t in targets if t.kind == kind]
        if not chosen or not layers:
            continue
        device = attentions[0].device
        n = torch.tensor([len(t.keys) for t in chosen], device=device)
        group = torch.repeat_interleave(torch.arange(len(chosen), device=device), n)            # (E,)
        row = torch.tensor([t.row for t in chosen], device=device)[group]
        head = torch.tensor([t.head for t in chosen], device=device)[group]
        query = torch.tensor([t.query for t in chosen], device=device)[group]
        keys = torch.tensor([k for t in chosen for k in t.keys], device=device)
        for layer in layers:
            values = attentions[layer][row, head, query, keys]                                   # (E,)
            mass = torch.zeros(len(chosen), dtype=values.dtype, device=device).index_add_(0, group, values)
            losses.append(-torch.log(mass + 1e-6).mean())
    if not losses:
        return attentions[0].new_zeros(())
    return torch.stack(losses).mean()


class ObjectReadout(nn.Module):
    """Training-only probes on the residual stream after the patch-supervised layer, at an answer position
    and RMS-normalised as the next layer sees it: for object A and object B of the question, the class
    histogram and the mean grid column of the patches the supervised heads were taught to look at. They make
    the LLM write what it found into the residual stream strongly enough for the answer to use it."""

    def __init__(self, hidden: int, grid: int, objects: int = 2):
        super().__init__()
        self.objects = objects
        self.classes = nn.Linear(hidden, objects * N_OBJECT_CLASSES)
        self.column = nn.Linear(hidden, objects)
        self.grid = grid

    def loss(self, hidden_states: torch.Tensor, targets: list[AttentionTarget], patch_labels: torch.Tensor,
             image_pos: torch.Tensor) -> torch.Tensor:
        """hidden_states: (B, T, D) output of the layer; targets: the batch's targets ("patches" ones are used;
        ``head`` 0 / 1 = object A / B)."""
        chosen = [t for t in targets if t.kind == "patches"]
        if not chosen:
            return hidden_states.new_zeros(())
        x = torch.stack([hidden_states[t.row, t.query] for t in chosen])                          # (G, D)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        obj = torch.tensor([t.head for t in chosen])                                              # (G,)
        hist = torch.zeros(len(chosen), N_OBJECT_CLASSES)
        cols = torch.zeros(len(chosen))
        on_image = torch.ones(len(chosen), dtype=torch.bool)
        for g, t in enumerate(chosen):
            patches = torch.tensor(t.keys) - int(image_pos[t.row])
            if (patches < 0).any():                       # "not found" target (<s>): class 0, no column
                hist[g, 0], on_image[g] = 1.0, False
                continue
            hist[g] = torch.bincount(patch_labels[t.row, patches], minlength=N_OBJECT_CLASSES).float() / len(patches)
            cols[g] = (patches % self.grid).float().mean() / (self.grid - 1)
        rows = torch.arange(len(chosen))
        logits = self.classes(x).view(len(chosen), self.objects, N_OBJECT_CLASSES)[rows, obj]    # (G, C)
        class_loss = -(hist * nn.functional.log_softmax(logits, -1)).sum(-1).mean()
        column = self.column(x)[rows, obj]                                                        # (G,)
        column_loss = (nn.functional.mse_loss(column[on_image], cols[on_image]) * 10
                       if on_image.any() else x.new_zeros(()))
        return class_loss + column_loss


# ----------------------------------------------------------------------------------------------- LLaVA
class ToyLlava(nn.Module):
    """The trainable part of LLaVA-1.5: Llama (``model.*``, ``lm_head``) + ``model.mm_projector`` (mlp2x_gelu).

    Its state dict uses LLaVA's checkpoint names, so it loads into ``LlavaLlamaForCausalLM`` unchanged."""

    def __init__(self, sizes: LlmSizes, vocab_size: int, mm_hidden: int, tokenizer):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        self.llama_config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=sizes.hidden, intermediate_size=sizes.intermediate,
            num_hidden_layers=sizes.layers, num_attention_heads=sizes.heads, num_key_value_heads=sizes.heads,
            max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
            initializer_range=sizes.init_std,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=0)
        self.llm = LlamaForCausalLM(self.llama_config)
        self.mm_projector = nn.Sequential(nn.Linear(mm_hidden, sizes.hidden), nn.GELU(),
                                          nn.Linear(sizes.hidden, sizes.hidden))

    def splice(self, input_ids: torch.Tensor, labels: torch.Tensor, features: torch.Tensor):
        """Replace the single IMAGE_TOKEN_INDEX of each row by its projected features.

        input_ids/labels: (B, L) with exactly one image token per row and right padding; features: (B, P, Dv).
        Returns inputs_embeds (B, L + P - 1, D), labels (B, L + P - 1) and attention_mask."""
        B, L = input_ids.shape
        P = features.shape[1]
        pos = (input_ids == IMAGE_TOKEN_INDEX).int().argmax(dim=1)            # (B,)
        text = self.llm.get_input_embeddings()(input_ids.clamp(min=0))        # (B, L, D)
        image = self.mm_projector(features)                                   # (B, P, D)
        out_len = L + P - 1
        j = torch.arange(out_len, device=input_ids.device).expand(B, out_len)  # output positions
        is_image = (j >= pos[:, None]) & (j < pos[:, None] + P)
        text_src = torch.where(j < pos[:, None], j, j - P + 1).clamp(0, L - 1)
        img_src = (j - pos[:, None]).clamp(0, P - 1)
        embeds = torch.where(is_image[..., None],
                             torch.gather(image, 1, img_src[..., None].expand(-1, -1, image.shape[-1])),
                             torch.gather(text, 1, text_src[..., None].expand(-1, -1, text.shape[-1])))
        new_labels = torch.where(is_image, torch.full_like(j, IGNORE_INDEX), torch.gather(labels, 1, text_src))
        valid = torch.gather((input_ids != -1).long(), 1, text_src)          # -1 marks padding below
        return embeds, new_labels, (valid.bool() | is_image).long()

    def forward(self, input_ids, labels, features, output_attentions: bool = False, output_hidden_states: bool = False):
        embeds, labels, mask = self.splice(input_ids, labels, features)
        return self.llm(inputs_embeds=embeds, attention_mask=mask, labels=labels, output_attentions=output_attentions,
                        output_hidden_states=output_hidden_states)

    def llava_state_dict(self) -> dict[str, torch.Tensor]:
        state = {k: v.detach().contiguous() for k, v in self.llm.state_dict().items()}
        for k, v in self.mm_projector.state_dict().items():
            state[f"model.mm_projector.{k}"] = v.detach().contiguous()
        return state


class ConversationEncoder:
    """Token ids and labels of a multi-turn conversation in the vicuna_v1 prompt (answers + </s> in the loss)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        conv = conv_templates[CONV_MODE]
        self.roles = conv.roles
        self._cache: dict[str, list[int]] = {}

    def _ids(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = list(self.tok(text, add_special_tokens=False).input_ids)
        return self._cache[text]

    def first_turn(self, question: str) -> list[int]:
        key = "\0first\0" + question
        if key not in self._cache:
            self._cache[key] = tokenizer_image_token(eval_prompt(question), self.tok)
        return self._cache[key]

    def word_ids(self, word: str) -> list[list[int]]:
        """The ways ``word`` is tokenised inside a question: after a space, and as the last word (merged
        with the question mark, which Metaspace does not split off)."""
        return [self._ids("a " + w)[len(self._ids("a")):] for w in (word, word + "?")]

    def encode(self, qas: list[QA]) -> tuple[list[int], list[int]]:
        ids, labels, _, _ = self.encode_with_positions(qas)
        return ids, labels

    def encode_with_positions(self, qas: list[QA]) -> tuple[list[int], list[int], list[int], list[int]]:
        """ids, labels and, per turn, the index of the last prompt token (where the answer is predicted) and
        the index where the turn's question can start (after the image token in the first turn)."""
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        starts: list[int] = []
        for i, qa in enumerate(qas):
            question = qa.question if qa.category == "caption" else with_short_answer_prompt(qa.question)
            prompt = self.first_turn(question) if i == 0 else self._ids(f"{self.roles[0]}: {question} {self.roles[1]}:")
            answer = self._ids(qa.answer) + [self.tok.eos_token_id]
            starts.append(len(ids) + (prompt.index(IMAGE_TOKEN_INDEX) + 1 if i == 0 else 0))
            ids += prompt + answer
            labels += [IGNORE_INDEX] * len(prompt) + answer
            positions.append(len(ids) - len(answer) - 1)
        return ids, labels, positions, starts


def collate(rows: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest row: input ids padded with -1 (masked), labels with IGNORE_INDEX."""
    L = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), L), -1, dtype=torch.long)
    labels = torch.full((len(rows), L), IGNORE_INDEX, dtype=torch.long)
    for r, (i, l) in enumerate(rows):
        ids[r, : len(i)] = torch.tensor(i)
        labels[r, : len(l)] = torch.tensor(l)
    return ids, labels


@torch.no_grad()
def first_token_accuracy(model: ToyLlava, encoder: ConversationEncoder, scenes, features: torch.Tensor,
                         batch: int = 50) -> dict[str, float]:
    """Per-category accuracy of the greedy first answer token on single-turn questions (teacher forced)."""
    model.eval()
    hits: dict[str, list[bool]] = {c: [] for c in CATEGORIES}
    items = [(i, qa) for i, s in enumerate(scenes) for qa in s.qas]
    for b in range(0, len(items), batch):
        chunk = items[b:b + batch]
        rows = [encoder.encode([qa]) for _, qa in chunk]
        ids, labels = collate(rows)
        embeds, new_labels, mask = model.splice(ids, labels, features[[i for i, _ in chunk]])
        logits = model.llm(inputs_embeds=embeds, attention_mask=mask).logits
        first = (new_labels != IGNORE_INDEX).int().argmax(dim=1)               # first answer position
        pred = logits[torch.arange(len(chunk)), first - 1].argmax(-1)
        gold = new_labels[torch.arange(len(chunk)), first]
        for (_, qa), ok in zip(chunk, (pred == gold).tolist()):
            hits[qa.category].append(ok)
    model.train()
    return {c: 100.0 * float(np.mean(v)) for c, v in hits.items() if v}


def training_conversation(objects: list[SceneObject], scene_caption: str, rng: np.random.Generator,
                          cfg: ToyTrainConfig, scene_cfg: SceneConfig) -> list[QA]:
    """``cfg.rounds`` short-answer QAs plus one caption turn (dense supervision that teaches reading the image)."""
    qas = training_qas(objects, rng, cfg.rounds, scene_cfg)
    if not cfg.caption_turn:
        return qas
    where = 0 if rng.random() < cfg.caption_first else int(rng.integers(1, len(qas) + 1))
    qas.insert(where, QA(CAPTION_PROMPT, scene_caption, "caption"))
    return qas


def train_vision_dense(vision, projector: nn.Module, pixels: torch.Tensor, labels: torch.Tensor,
                       cfg: ToyTrainConfig, log, val: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[float]:
    """Stage 3: train the vision tower and the projector so that every projected patch token (B, P, D) tells,
    through linear read-outs (dropped afterwards), which object covers that patch (:func:`patch_object_labels`)
    and in which column of the patch grid it lies (for left/right questions).

    This is where the toy model learns to see shapes; the LLM stage then starts from visual tokens that
    carry each object's colour, shape and position. Returns the loss curve; logs the val per-patch accuracy."""
    gen = torch.Generator().manual_seed(cfg.seed + 31)
    grid = int(round(labels.shape[1] ** 0.5))
    head = nn.Linear(cfg.llm.hidden, N_OBJECT_CLASSES)
    column_head = nn.Linear(cfg.llm.hidden, grid)
    columns = torch.arange(labels.shape[1]) % grid                                   # (P,)
    params = (list(vision.parameters()) + list(projector.parameters()) + list(head.parameters())
              + list(column_head.parameters()))
    opt = torch.optim.AdamW(params, lr=cfg.dense_lr, weight_decay=0.01)

    def tokens(px: torch.Tensor) -> torch.Tensor:
        return projector(vision(pixel_values=px, output_hidden_states=True).hidden_states[-2][:, 1:])  # (B, P, D)

    vision.train()
    losses = []
    for step in range(cfg.dense_steps):
        _set_lr(opt, cosine_lr(step, cfg.dense_steps, cfg.dense_lr, cfg.warmup))
        idx = torch.randint(len(pixels), (cfg.dense_batch,), generator=gen)
        x = tokens(pixels[idx])                                                        # (B, P, D)
        loss = dense_object_loss(head, x, labels[idx], cfg.dense_background_weight)
        loss = loss + nn.functional.cross_entropy(column_head(x).flatten(0, 1), columns.repeat(len(idx)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if step % (cfg.log_every * 4) == 0 or step == cfg.dense_steps - 1:
            msg = f"dense step {step:4d}  loss {np.mean(losses[-cfg.log_every * 4:]):.4f}"
            if val is not None and (step % cfg.val_every == 0 or step == cfg.dense_steps - 1):
                vision.eval()
                with torch.no_grad():
                    pred = torch.cat([head(tokens(val[0][i:i + 64])).argmax(-1) for i in range(0, len(val[0]), 64)])
                vision.train()
                on_object = val[1] > 0
                obj_acc = 100 * float((pred[on_object] == val[1][on_object]).float().mean())
                bg_acc = 100 * float((pred[~on_object] == 0).float().mean())
                msg += f"  val patch accuracy: objects {obj_acc:.1f}% background {bg_acc:.1f}%"
            log(msg)
    vision.eval()
    return losses


def query_patch_loss(text_embeds: torch.Tensor, patch_embeds: torch.Tensor, targets: torch.Tensor,
                     scale: torch.Tensor, negate: bool = False) -> torch.Tensor:
    """-log of the softmax mass, over each image's patches, of ``scale * cos(question, patch)`` (``-cos`` if
    ``negate``) on the patches of the objects the question asks about, averaged over the batch.

    text_embeds: (B, E) projected question embeddings; patch_embeds: (B, N, E) projected patch embeddings;
    targets: (B, N) bool, at least one True per row; scale: () the CLIP logit scale (already exp'd)."""
    cos = torch.einsum("be,bne->bn", nn.functional.normalize(text_embeds, dim=-1),
                       nn.functional.normalize(patch_embeds, dim=-1))                        # (B, N)
    logp = torch.log_softmax(scale * (-cos if negate else cos), dim=-1)
    return -torch.logsumexp(logp.masked_fill(~targets, float("-inf")), dim=-1).mean()


def relevance_examples(objects: list[SceneObject], labels: torch.Tensor, rng: np.random.Generator,
                       scene_cfg: SceneConfig, tries: int = 4) -> tuple[str, torch.Tensor] | None:
    """One training question about a scene whose asked objects are in it, and the (N,) mask of their patches
    (object A and B of :func:`asked_objects`); None when none of ``tries`` drawn questions has any."""
    for qa in training_qas(objects, rng, tries, scene_cfg):
        classes = sorted({c for side in asked_objects(qa, objects) for c in side})
        target = torch.isin(labels, torch.tensor(classes, dtype=labels.dtype)) if classes else None
        if target is not None and bool(target.any()):
            return qa.question, target
    return None


def train_query_alignment(clip, clip_tokenizer, features: torch.Tensor, objects: list[list[SceneObject]],
                          labels: torch.Tensor, cfg: ToyTrainConfig, log, val=None) -> list[float]:
    """Query alignment (between the vision and the LLaVA stage): teach the CLIP text tower,
    ``text_projection``, ``visual_projection`` and the vision ``post_layernorm`` that a question's embedding
    lies closest to the patches of the object it asks about (farthest with ``cfg.align_negated``, the
    inversion real CLIP shows on penultimate-layer patches, which LLaVA's default ``negate_relevance``
    undoes), with patches embedded as QCRS embeds them (``visual_projection(post_layernorm(layer -2 patch))``).

    The vision encoder is frozen, so LLaVA's visual tokens do not change; only the query relevance that the
    query-conditioned pruning methods read does. features: (N_img, P, Dv) cached layer -2 features; labels:
    (N_img, P) patch classes; val: optional (features, objects, labels). Draws no global random numbers."""
    gen = torch.Generator().manual_seed(cfg.seed + 41)
    scene_cfg = SceneConfig()
    vision = clip.vision_model
    params = (list(clip.text_model.parameters()) + list(clip.text_projection.parameters())
              + list(clip.visual_projection.parameters()) + list(vision.post_layernorm.parameters())
              + [clip.logit_scale])
    opt = torch.optim.AdamW(params, lr=cfg.align_lr, weight_decay=0.0)

    def batch_loss(feats, objs, labs, rng):
        examples = [(i, relevance_examples(objs[i], labs[i], rng, scene_cfg)) for i in range(len(objs))]
        examples = [(i, e) for i, e in examples if e is not None]
        rows = torch.tensor([i for i, _ in examples])
        text = clip_tokenizer([e[0] for _, e in examples], padding=True, return_tensors="pt")
        text_embeds = clip.get_text_features(input_ids=text.input_ids, attention_mask=text.attention_mask)
        text_embeds = getattr(text_embeds, "pooler_output", text_embeds)                      # (B, E)
        patch_embeds = clip.visual_projection(vision.post_layernorm(feats[rows]))            # (B, P, E)
        targets = torch.stack([e[1] for _, e in examples])                                    # (B, P)
        loss = query_patch_loss(text_embeds, patch_embeds, targets, clip.logit_scale.exp(), cfg.align_negated)
        score = torch.einsum("be,bpe->bp", text_embeds, patch_embeds) * (-1 if cfg.align_negated else 1)
        top1 = targets[torch.arange(len(rows)), score.argmax(-1)].float().mean()              # top patch on target
        return loss, float(top1)

    def evaluate() -> str:
        with torch.no_grad():
            loss, top1 = batch_loss(val[0], val[1], val[2], np.random.default_rng([cfg.seed, 78]))
        return f"  val loss {float(loss):.3f}, top patch on the asked object {100 * top1:.1f}%"

    losses = []
    if val is not None:
        log("align step    -  before" + evaluate())
    for step in range(cfg.align_steps):
        _set_lr(opt, cosine_lr(step, cfg.align_steps, cfg.align_lr, cfg.warmup))
        idx = torch.randint(len(features), (cfg.align_batch,), generator=gen)
        loss, _ = batch_loss(features[idx], [objects[i] for i in idx.tolist()], labels[idx],
                             np.random.default_rng([cfg.seed, 77, step]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if step % (cfg.log_every * 4) == 0 or step == cfg.align_steps - 1:
            msg = f"align step {step:4d}  loss {np.mean(losses[-cfg.log_every * 4:]):.4f}"
            if val is not None and step == cfg.align_steps - 1:
                msg += evaluate()
            log(msg)
    return losses


def train_llava(model: ToyLlava, encoder: ConversationEncoder, objects: list[list[SceneObject]],
                captions: list[str], features: torch.Tensor, cfg: ToyTrainConfig, log, val=None,
                vision=None, pixels: torch.Tensor | None = None,
                patch_labels: torch.Tensor | None = None) -> list[float]:
    """Train projector + LLM on random multi-turn conversations (QAs + a caption) about the training scenes.

    With ``vision`` (the CLIP vision model) and ``pixels``, the vision tower is trained too and features are
    recomputed every step; otherwise the cached ``features`` are used."""
    gen = torch.Generator().manual_seed(cfg.seed + 23)
    groups = [{"params": list(model.parameters()), "peak": cfg.llava_lr}]
    if vision is not None:
        vision.train()
        groups.append({"params": list(vision.parameters()), "peak": cfg.vision_lr})
    head = None
    if cfg.dense_weight > 0 or cfg.attn_weight > 0:
        if patch_labels is None:
            raise ValueError("patch_labels must be given when cfg.dense_weight or cfg.attn_weight > 0")
    if cfg.dense_weight > 0:
        head = nn.Linear(cfg.llm.hidden, N_OBJECT_CLASSES)     # dropped after training (not in the checkpoint)
        groups[0]["params"] += list(head.parameters())
    scene_cfg = SceneConfig()
    model.train()
    losses: list[float] = []
    dense_losses: list[float] = []
    attn_losses: list[float] = []
    readout_losses: list[float] = []
    bad = [l for l in (*cfg.attn_word_layers, *cfg.attn_layers) if not 0 <= l < cfg.llm.layers]
    if cfg.attn_weight > 0 and bad:
        raise ValueError(f"attn_word_layers / attn_layers must be LLM layers 0..{cfg.llm.layers - 1}, got {bad}")
    readout = None
    if cfg.attn_weight > 0:
        model.llm.set_attn_implementation("eager")      # attention weights are needed for the supervision
        if cfg.readout_weight > 0:
            readout = ObjectReadout(cfg.llm.hidden, int(round(features.shape[1] ** 0.5)))
            groups[0]["params"] += list(readout.parameters())
    opt = torch.optim.AdamW(groups, lr=cfg.llava_lr, weight_decay=0.0, betas=(0.9, 0.98))
    for step in range(cfg.llava_steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, cfg.llava_steps, group["peak"], cfg.warmup)
        idx = torch.randint(len(objects), (cfg.llava_batch,), generator=gen).tolist()
        convs = [training_conversation(objects[i], captions[i], np.random.default_rng([cfg.seed, 99, step, b]),
                                       cfg, scene_cfg) for b, i in enumerate(idx)]
        encoded = [encoder.encode_with_positions(c) for c in convs]
        ids, labels = collate([(e[0], e[1]) for e in encoded])
        if vision is not None:
            feats = vision(pixel_values=pixels[idx], output_hidden_states=True).hidden_states[-2][:, 1:]
        else:
            feats = features[idx]
        out = model(ids, labels, feats, output_attentions=cfg.attn_weight > 0,
                    output_hidden_states=readout is not None)
        loss = out.loss
        if cfg.attn_weight > 0:
            image_pos = (ids == IMAGE_TOKEN_INDEX).int().argmax(dim=1)
            targets = attention_targets(encoded, convs, [objects[i] for i in idx], patch_labels[idx], image_pos,
                                        encoder.word_ids)
            att_loss = attention_supervision_loss(out.attentions, targets, cfg.attn_word_layers, cfg.attn_layers)
            loss = loss + cfg.attn_weight * att_loss
            attn_losses.append(float(att_loss.detach()))
            if readout is not None:
                ro_loss = readout.loss(out.hidden_states[cfg.attn_layers[0] + 1], targets, patch_labels[idx], image_pos)
                loss = loss + cfg.readout_weight * ro_loss
                readout_losses.append(float(ro_loss.detach()))
        if head is not None:
            dense = dense_object_loss(head, model.mm_projector(feats), patch_labels[idx], cfg.dense_background_weight)
            loss = loss + cfg.dense_weight * dense
            dense_losses.append(float(dense.detach()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        losses.append(float(out.loss.detach()))
        if step % cfg.log_every == 0 or step == cfg.llava_steps - 1:
            msg = f"llava step {step:4d}  loss {np.mean(losses[-cfg.log_every:]):.4f}"
            if dense_losses:
                msg += f"  dense {np.mean(dense_losses[-cfg.log_every:]):.3f}"
            if attn_losses:
                msg += f"  attn {np.mean(attn_losses[-cfg.log_every:]):.3f}"
            if readout_losses:
                msg += f"  readout {np.mean(readout_losses[-cfg.log_every:]):.3f}"
            if val is not None and step % cfg.val_every == 0:      # train() evaluates the final model
                if vision is not None:
                    vision.eval()
                    val = (val[0], vision_features(vision, val[2]), val[2])
                    vision.train()
                acc = first_token_accuracy(model, encoder, *val[:2])
                msg += "  val " + " ".join(f"{k}={v:.0f}" for k, v in acc.items())
            log(msg)
    model.eval()
    if vision is not None:
        vision.eval()
    return losses


# ----------------------------------------------------------------------------------------------- saving
def llava_config(cfg: ToyTrainConfig, tokenizer, vocab_size: int) -> dict:
    """config.json in LLaVA-1.5's original format (model_type "llava", mm_* keys)."""
    s = cfg.llm
    return original_llava_config(
        name="toy-llava-v1.5", arch="llava-1.5", hidden=s.hidden, intermediate=s.intermediate, layers=s.layers,
        heads=s.heads, vocab_size=vocab_size, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, vision_tower=CLIP_SUBDIR, vision_hidden=cfg.clip.vision_hidden,
        max_positions=2048,
    )


def _save_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def save_checkpoint(out: Path, cfg: ToyTrainConfig, clip, clip_tokenizer, image_processor, model: ToyLlava,
                    tokenizer, metrics: dict) -> None:
    """Write the LLaVA folder (original format) with the CLIP in ``out/clip``."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    clip_dir = out / CLIP_SUBDIR
    clip.save_pretrained(clip_dir)
    clip_tokenizer.save_pretrained(clip_dir)
    image_processor.save_pretrained(clip_dir)
    pp = json.loads((clip_dir / "preprocessor_config.json").read_text())
    pp["image_processor_type"] = "CLIPImageProcessor"
    _save_json(clip_dir / "preprocessor_config.json", pp)
    tokenizer.save_pretrained(out)
    tmp = out / "model.safetensors.tmp"
    save_file(model.llava_state_dict(), str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")
    _save_json(out / "config.json", llava_config(cfg, tokenizer, model.llama_config.vocab_size))
    _save_json(out / "generation_config.json", {"bos_token_id": tokenizer.bos_token_id,
                                                 "eos_token_id": tokenizer.eos_token_id, "pad_token_id": 0})
    _save_json(out / "toy_training.json", {"config": asdict(cfg), "metrics": metrics})


# ----------------------------------------------------------------------------------------------- main
def load_toy_llava(path: str | os.PathLike, cfg: ToyTrainConfig, tokenizer) -> ToyLlava:
    """The LLM + projector of a toy checkpoint folder, as a :class:`ToyLlava` (to continue training)."""
    from safetensors.torch import load_file

    state = load_file(str(Path(path) / "model.safetensors"))
    model = ToyLlava(cfg.llm, len(tokenizer), cfg.clip.vision_hidden, tokenizer)
    model.llm.load_state_dict({k: v.float() for k, v in state.items() if ".mm_projector." not in k})
    model.mm_projector.load_state_dict({k.split("mm_projector.")[1]: v.float()
                                        for k, v in state.items() if ".mm_projector." in k})
    return model


def train(out_dir: str | os.PathLike, cfg: ToyTrainConfig = ToyTrainConfig(), log=print,
          resume: str | os.PathLike | None = None) -> dict:
    """Run every stage and write the checkpoint into ``out_dir``; returns the metrics.

    With ``resume`` (a toy checkpoint folder) the tokenizers and the CLIP are taken from it and the
    LLaVA stage continues from its weights for ``cfg.llava_steps`` more steps."""
    if cfg.threads < 1 or cfg.val_every < 1:
        name = "threads" if cfg.threads < 1 else "val_every"
        raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.train_scenes < cfg.clip_batch:
        raise ValueError(f"train_scenes must be >= clip_batch ({cfg.clip_batch}), got {cfg.train_scenes}")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    out = Path(out_dir)
    train_scenes = [make_scene(cfg.seed, "train", i) for i in range(cfg.train_scenes)]
    val_scenes = [make_scene(cfg.seed, "val", i) for i in range(cfg.val_scenes)]
    log(f"scenes: {len(train_scenes)} train, {len(val_scenes)} val ({time.time() - t0:.0f}s)")

    if resume is not None:
        from transformers import AutoTokenizer, CLIPModel

        tokenizer = AutoTokenizer.from_pretrained(str(resume), use_fast=False)
        clip_tokenizer = AutoTokenizer.from_pretrained(str(Path(resume) / CLIP_SUBDIR))
    else:
        corpus = tokenizer_corpus(train_scenes)
        tokenizer = train_llama_tokenizer(corpus, cfg.llm.vocab_size)
        tokenizer.pad_token = "<unk>"
        clip_tokenizer = train_clip_tokenizer(corpus, cfg.clip.vocab_size)
    image_processor = build_image_processor(cfg.clip)
    train_pixels = pixel_values([s.image for s in train_scenes], image_processor)
    val_pixels = pixel_values([s.image for s in val_scenes], image_processor)
    caps = clip_tokenizer([caption(s) for s in train_scenes], padding=True, return_tensors="pt")
    vcaps = clip_tokenizer([caption(s) for s in val_scenes], padding=True, return_tensors="pt")
    log(f"tokenizers: llama {len(tokenizer)}, clip {len(clip_tokenizer)}; pixels {tuple(train_pixels.shape)} "
        f"({time.time() - t0:.0f}s)")

    if resume is not None:
        clip = CLIPModel.from_pretrained(str(Path(resume) / CLIP_SUBDIR)).eval()
        clip_losses = []
    else:
        clip = build_clip(cfg.clip, clip_tokenizer)
        clip_losses = train_clip(clip, train_pixels, caps.input_ids, caps.attention_mask, cfg, log)
    clip_acc = clip_retrieval_accuracy(clip, val_pixels, vcaps.input_ids, vcaps.attention_mask)
    log(f"clip: val image->caption top-1 {100 * clip_acc:.1f}% among {len(val_scenes)} ({time.time() - t0:.0f}s)")

    torch.manual_seed(cfg.seed + 5)
    model = (load_toy_llava(resume, cfg, tokenizer) if resume is not None
             else ToyLlava(cfg.llm, len(tokenizer), cfg.clip.vision_hidden, tokenizer))
    need_labels = (cfg.dense_weight > 0 or cfg.attn_weight > 0
                   or ((cfg.dense_steps > 0 or cfg.align_steps > 0) and resume is None))
    train_labels = labels_of(train_scenes, cfg) if need_labels else None
    val_labels = labels_of(val_scenes, cfg) if need_labels else None
    dense_losses = []
    if resume is None and cfg.dense_steps > 0:
        dense_losses = train_vision_dense(clip.vision_model, model.mm_projector, train_pixels, train_labels, cfg, log,
                                          val=(val_pixels, val_labels))
        log(f"dense stage done ({time.time() - t0:.0f}s)")
    train_feats = vision_features(clip.vision_model, train_pixels)
    val_feats = vision_features(clip.vision_model, val_pixels)
    align_losses = []
    if resume is None and cfg.align_steps > 0:
        align_losses = train_query_alignment(clip, clip_tokenizer, train_feats, [s.objects for s in train_scenes],
                                             train_labels, cfg, log,
                                             val=(val_feats, [s.objects for s in val_scenes], val_labels))
        log(f"query alignment done ({time.time() - t0:.0f}s)")
    encoder = ConversationEncoder(tokenizer)
    llava_losses = train_llava(model, encoder, [s.objects for s in train_scenes],
                               [caption(s) for s in train_scenes], train_feats, cfg, log,
                               val=(val_scenes, val_feats, val_pixels),
                               vision=clip.vision_model if cfg.tune_vision else None,
                               pixels=train_pixels if cfg.tune_vision else None,
                               patch_labels=train_labels)
    if cfg.tune_vision:
        val_feats = vision_features(clip.vision_model, val_pixels)
    val_acc = first_token_accuracy(model, encoder, val_scenes, val_feats)
    metrics = {"clip_val_retrieval_top1": 100 * clip_acc, "clip_final_loss": None if resume is not None else float(np.mean(clip_losses[-20:])),
               "dense_final_loss": float(np.mean(dense_losses[-20:])) if dense_losses else None,
               "align_final_loss": float(np.mean(align_losses[-20:])) if align_losses else None,
               "llava_final_loss": float(np.mean(llava_losses[-20:])), "val_first_token_accuracy": val_acc,
               "train_seconds": time.time() - t0, "resumed_from": None if resume is None else str(resume)}
    save_checkpoint(out, cfg, clip, clip_tokenizer, image_processor, model, tokenizer, metrics)
    log(f"saved {out} ({time.time() - t0:.0f}s); val accuracy " + json.dumps({k: round(v, 1) for k, v in val_acc.items()}))
    return metrics


def labels_of(scenes, cfg: ToyTrainConfig) -> torch.Tensor:
    """(N, P) per-patch object classes of the scenes (see :func:`patch_object_labels`)."""
    return torch.from_numpy(np.stack([patch_object_labels(s.objects, cfg.clip.image_size, cfg.clip.patch_size,
                                                          cfg.dense_min_cover) for s in scenes]))


def quick_config(seed: int = 0) -> ToyTrainConfig:
    """A seconds-long configuration for tests (the model learns little)."""
    return ToyTrainConfig(seed=seed, train_scenes=64, val_scenes=8, clip_steps=2, clip_batch=32, llava_steps=2,
                          llava_batch=4, rounds=2, warmup=1, log_every=1, dense_steps=2, dense_batch=8,
                          align_steps=2, align_batch=8,
                          clip=ClipSizes(vision_hidden=32, vision_layers=1, text_hidden=32, text_layers=1,
                                         vision_heads=2, text_heads=2, projection_dim=16),
                          llm=LlmSizes(hidden=32, intermediate=64, layers=2, heads=2, vocab_size=400))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the toy CLIP + LLaVA-1.5 on synthetic scenes (CPU).")
    parser.add_argument("--out", required=True, help="output checkpoint folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    parser.add_argument("--llava-steps", type=int, default=None)
    parser.add_argument("--clip-steps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default 2; another count gives slightly different weights)")
    parser.add_argument("--init-std", type=float, default=None)
    parser.add_argument("--clip-patch-mean", action="store_true", help="extra contrastive loss on mean patch features")
    parser.add_argument("--tune-vision", action="store_true", help="train the vision tower in the LLaVA stage")
    parser.add_argument("--resume", default=None, help="continue the LLaVA stage of this toy checkpoint")
    parser.add_argument("--llava-lr", type=float, default=None)
    parser.add_argument("--dense-weight", type=float, default=None, help="per-patch object-identity loss weight")
    parser.add_argument("--attn-weight", type=float, default=None, help="attention-supervision loss weight")
    parser.add_argument("--readout-weight", type=float, default=None, help="weight of the object read-out probes")
    parser.add_argument("--llava-batch", type=int, default=None)
    parser.add_argument("--llm-layers", type=int, default=None)
    parser.add_argument("--train-scenes", type=int, default=None)
    parser.add_argument("--dense-steps", type=int, default=None, help="steps of the per-patch vision stage (0: skip)")
    parser.add_argument("--rounds", type=int, default=None, help="QA turns per training conversation")
    parser.add_argument("--align-steps", type=int, default=None,
                        help="steps of the question-to-patch alignment of the CLIP text side (0: skip)")
    args = parser.parse_args(argv)
    cfg = quick_config(args.seed) if args.quick else ToyTrainConfig(seed=args.seed)
    cfg.tune_vision = cfg.tune_vision or args.tune_vision
    cfg.clip_patch_mean = cfg.clip_patch_mean or args.clip_patch_mean
    overrides = {  # command-line option (argparse dest) -> (config object, field); None keeps the default
        "llava_steps": (cfg, "llava_steps"), "clip_steps": (cfg, "clip_steps"), "dense_steps": (cfg, "dense_steps"),
        "llava_lr": (cfg, "llava_lr"), "llava_batch": (cfg, "llava_batch"), "rounds": (cfg, "rounds"),
        "align_steps": (cfg, "align_steps"),
        "train_scenes": (cfg, "train_scenes"), "dense_weight": (cfg, "dense_weight"),
        "attn_weight": (cfg, "attn_weight"), "readout_weight": (cfg, "readout_weight"),
        "init_std": (cfg.llm, "init_std"), "threads": (cfg, "threads"), "llm_layers": (cfg.llm, "layers"),
    }
    for dest, (target, name) in overrides.items():
        if getattr(args, dest) is not None:
            setattr(target, name, getattr(args, dest))
    train(args.out, cfg, log=lambda m: print(m, flush=True), resume=args.resume)


if __name__ == "__main__":
    main()
