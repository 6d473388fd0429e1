"""Slow float64 references for the multi-stage in-LLM methods (SparseVLM, PDrop, FastV), written from the papers.

One sample at a time, Python loops, transformers' own decoder layers called on explicit sequences with explicit
4-D masks (no KV cache anywhere): a stage ranks the row's present visual tokens by attention rows computed here
from the layer's q / k projections (softmax over the causal keys, mean over heads), keeps the best, and (SparseVLM
with recycling) clusters the best dropped ones by density peaks into merged tokens placed after the row's last
kept token at their centre's position. Decoded tokens see, in layer i, the entry of every final prompt slot as it
is in layer i (a merged token not born yet: its centre), which is what a cache shortened after every stage holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import script_prune as sp
from script_prune import inllm


# ------------------------------------------------------------------------------------------ pure pieces
def raters_reference(embeds: torch.Tensor, visual: list[int], text: list[int]) -> list[bool]:
    """SparseVLM's raters: softmax over the text tokens of v . t, averaged over the visual tokens, above the mean."""
    v, t = embeds[visual].double(), embeds[text].double()
    relation = (v @ t.T).softmax(dim=1).mean(dim=0)  # (T,)
    return [bool(x > relation.mean()) for x in relation]


def dpc_reference(x: torch.Tensor, clusters: int) -> tuple[torch.Tensor, list[int]]:
    """DPC-kNN clustering and mean merge, loops in float64. x (M, D) -> merged (C, D), centres (C,)."""
    x = x.double()
    m, d = x.shape
    dist = [[float((x[i] - x[j]).norm()) / math.sqrt(d) for j in range(m)] for i in range(m)]
    density = [math.exp(-sum(v * v for v in sorted(row)[:clusters]) / clusters) for row in dist]
    largest = max(max(row) for row in dist)
    delta = []
    for i in range(m):
        denser = [dist[i][j] for j in range(m) if density[j] > density[i] or (density[j] == density[i] and j < i)]
        delta.append(min(denser) if denser else largest)
    score = [delta[i] * density[i] for i in range(m)]
    centres = sorted(range(m), key=lambda i: (-score[i], i))[:clusters]
    members: list[list[int]] = [[] for _ in centres]
    for i in range(m):
        j = centres.index(i) if i in centres else min(range(clusters), key=lambda c: (dist[i][centres[c]], c))
        members[j].append(i)
    merged = torch.stack([x[group].mean(dim=0) for group in members])
    return merged, centres


def attention_rows(layer, rope_of, hidden: torch.Tensor, positions: torch.Tensor, queries: list[int]) -> torch.Tensor:
    """Head-mean causal softmax attention of the ``queries`` rows at ``layer`` (input ``hidden`` (T, D)). -> (Q, T)"""
    attn = layer.self_attn
    normed = layer.input_layernorm(hidden[None])
    t, hd = hidden.shape[0], attn.head_dim
    q = attn.q_proj(normed).view(1, t, -1, hd).transpose(1, 2)
    k = attn.k_proj(normed).view(1, t, -1, hd).transpose(1, 2)
    cos, sin = rope_of(hidden[None], positions)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q @ k.transpose(-1, -2))[0] * attn.scaling  # (H, T, T)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    probs = logits.masked_fill(~causal, float("-inf")).softmax(dim=-1).mean(dim=0)  # (T, T)
    return probs[queries]


# ------------------------------------------------------------------------------------------ the decoder
@dataclass
class Sequence:
    """One sample's prompt as a layer sees it: hidden (T, D), positions (T,) or (3, T) and per-entry facts."""

    hidden: torch.Tensor
    positions: torch.Tensor
    row: list[int]
    index: list[int]
    rater: list[bool]
    ident: list[int]
    born: dict[int, tuple[int, int]] = field(default_factory=dict)  # merged ident -> (first layer, centre ident)
    additions: torch.Tensor | None = None  # (levels, T, D) DeepStack, added after layer i < levels (0 for text)


def at(positions: torch.Tensor, picks: list[int]) -> torch.Tensor:
    return positions[..., picks]


def run_layer(layer, rope_of, hidden, positions, allowed):
    """``layer`` on (T, D) with the boolean (T, T) mask ``allowed``."""
    bias = torch.zeros(allowed.shape, dtype=hidden.dtype).masked_fill(~allowed, torch.finfo(hidden.dtype).min)
    rope = rope_of(hidden[None], positions)
    return layer(hidden[None], attention_mask=bias[None, None], position_embeddings=rope,
                 position_ids=positions[None] if positions.dim() == 1 else positions[:, None])[0]


def prune(seq: Sequence, scores: torch.Tensor, counts: dict[int, int], recycle: bool, layers_before: int,
          next_ident: list[int]) -> Sequence:
    """Keep each row's best ``counts[r]``; with ``recycle`` cluster its best dropped ones into merged tokens."""
    keep = [r < 0 for r in seq.row]
    merged_after: dict[int, list[tuple[torch.Tensor, int]]] = {}
    for r, k in counts.items():
        mine = [i for i, x in enumerate(seq.row) if x == r]
        ranked = sorted(mine, key=lambda i: (-float(scores[i]), i))
        for i in ranked[:k]:
            keep[i] = True
        dropped = ranked[k:]
        taken, clusters = inllm.recycle_count(len(dropped)) if recycle else (0, 0)
        if clusters:
            picks = dropped[:taken]
            merged, centres = dpc_reference(seq.hidden[picks], clusters)
            last = max(ranked[:k])
            merged_after[last] = [(merged[j], picks[c]) for j, c in enumerate(centres)]
    hidden, positions, row, index, rater, ident, source = [], [], [], [], [], [], []
    born = dict(seq.born)
    for i in range(len(seq.row)):
        if keep[i]:
            hidden.append(seq.hidden[i]), positions.append(at(seq.positions, [i])), row.append(seq.row[i])
            index.append(seq.index[i]), rater.append(seq.rater[i]), ident.append(seq.ident[i]), source.append(i)
        for vector, centre in merged_after.get(i, []):
            hidden.append(vector.to(seq.hidden.dtype)), positions.append(at(seq.positions, [centre]))
            row.append(seq.row[i]), index.append(-1), rater.append(False), ident.append(next_ident[0])
            born[next_ident[0]] = (layers_before, seq.ident[centre])
            source.append(centre)  # a merged token takes its centre's DeepStack features
            next_ident[0] += 1
    additions = None if seq.additions is None else seq.additions[:, source]
    return Sequence(torch.stack(hidden), torch.cat(positions, dim=-1), row, index, rater, ident, born, additions)


def reference_generate(model, method: str, params: dict, budget, seq: Sequence, steps: int,
                       next_position: torch.Tensor, row_length: int | None = None
                       ) -> tuple[list[int], dict[int, list[int]], int, torch.Tensor]:
    """Greedy tokens, kept original indices per row, final visual count and the prefill's last logits.

    ``model``: a float64 copy of the stock model; ``seq``: the sample's whole prompt (no padding);
    ``next_position``: (1,) or (3, 1) position of the first decoded token; ``row_length``: the rows' length
    the plans are made for when the prompt holds fewer of a row's tokens (LLaVA-NeXT's unpadding; default:
    what the prompt holds).
    """
    lm = model.model.language_model
    layers = list(lm.layers)
    rope_of = lambda h, p: lm.rotary_emb(h, position_ids=p[None] if p.dim() == 1 else p[:, None])  # noqa: E731
    held = {r: seq.row.count(r) for r in set(seq.row) if r >= 0}
    lengths = held if row_length is None else {r: row_length for r in held}
    n_layers = len(layers)
    params = {**sp.get_method(method).params, **params}
    plans = {r: inllm.stage_plan(method, sp.resolve_budget(budget, n), n, n_layers, params) for r, n in lengths.items()}
    offset = {"fastv": -1, "sparsevlm": -1, "pdrop": 0}[method]  # which layer's attention ranks (papers' conventions)
    recycle = bool(params.get("recycle", False))
    stages = list(zip(*plans.values()))  # per stage, one (layers_before, count) per row
    inputs: list[Sequence] = []
    next_ident = [len(seq.row)]
    current = dict(held)
    scores = None
    for i, layer in enumerate(layers):
        stage = stages[0] if stages else None
        if stage is not None and offset == 0 and stage[0][0] == i:  # PDrop: drop before layer i, by its attention
            scores = attention_rows(layer, rope_of, seq.hidden, seq.positions, [len(seq.row) - 1]).mean(dim=0)
            seq = prune(seq, scores, {r: min(c, current[r]) for r, (_, c) in zip(plans, stage)}, recycle, i, next_ident)
            current = {r: seq.row.count(r) for r in current}
            stages.pop(0)
            stage = stages[0] if stages else None
        if stage is not None and offset == -1 and stage[0][0] - 1 == i:  # FastV / SparseVLM: this layer's attention
            queries = [j for j, x in enumerate(seq.rater) if x] if method == "sparsevlm" else [len(seq.row) - 1]
            scores = attention_rows(layer, rope_of, seq.hidden, seq.positions, queries).mean(dim=0)
        inputs.append(seq)
        t = len(seq.row)
        out = run_layer(layer, rope_of, seq.hidden, seq.positions, torch.ones(t, t, dtype=torch.bool).tril())
        if seq.additions is not None and i < seq.additions.shape[0]:
            out = out + seq.additions[i]
        seq = Sequence(out, seq.positions, seq.row, seq.index, seq.rater, seq.ident, seq.born, seq.additions)
        if stage is not None and offset == -1 and stage[0][0] == i + 1:  # ... prunes this layer's output
            seq = prune(seq, scores, {r: min(c, current[r]) for r, (_, c) in zip(plans, stage)}, recycle, i + 1,
                        next_ident)
            current = {r: seq.row.count(r) for r in current}
            stages.pop(0)
    final = seq
    kept = {r: sorted(x for x, y in zip(final.index, final.row) if y == r and x >= 0) for r in lengths}
    visual = sum(1 for r in final.row if r >= 0)
    norm, head, embed = lm.norm, model.lm_head, model.get_input_embeddings()
    prefill_logits = head(norm(final.hidden[-1:]))[0]

    def entries(i: int, prompt: Sequence) -> list[int]:
        """The prompt entries of layer i that the final cache slots hold."""
        out = []
        for ident in final.ident:
            while ident in final.born and i < final.born[ident][0]:
                ident = final.born[ident][1]
            out.append(prompt.ident.index(ident))
        return out

    tokens = [int(prefill_logits.argmax())]
    for step in range(1, steps):
        decoded = embed(torch.tensor(tokens)).double()  # (d, D)
        d = decoded.shape[0]
        dpos = next_position + torch.arange(d)
        for i, layer in enumerate(layers):
            prompt = inputs[i]
            p = len(prompt.row)
            allowed = torch.zeros(p + d, p + d, dtype=torch.bool)
            allowed[:p, :p] = torch.ones(p, p, dtype=torch.bool).tril()
            allowed[p:, entries(i, prompt)] = True
            allowed[p:, p:] = torch.ones(d, d, dtype=torch.bool).tril()
            out = run_layer(layer, rope_of, torch.cat([prompt.hidden, decoded]),
                            torch.cat([prompt.positions, dpos], dim=-1), allowed)
            decoded = out[p:]
        tokens.append(int(head(norm(decoded[-1:]))[0].argmax()))
    return tokens, kept, visual, prefill_logits
