"""The pruning setting of a LLaVA model: ``model.set_pruning(PruningConfig(...))`` is
``script_prune.patch.apply(model.hf, method, budget=visual_token_num, relevance=ClipText(...), **method_params())``.

Budget semantics: ``visual_token_num`` tokens are kept per image ROW — one row per LLaVA-1.5 image,
one row per LLaVA-NeXT crop (the base image and every anyres tile each keep ``visual_token_num``;
NeXT newline tokens come on top, see ``llava_arch``). A budget >= the tokens per row (576 for
CLIP-L/336) leaves the model exactly unpruned.

Relevance (methods whose ``MethodSpec.inputs`` name ``image_embeds`` / ``query_embeds``, e.g. script):
the CLIP text tower embeds the user's question and CLIP's visual projection maps the patch features
to the joint space. ``negate_relevance`` (default True) is passed to the method as its ``negate``
parameter when the method has one: with CLIP's penultimate-layer patch features the similarity to
the text embedding is inverted (CDPruner's maintainers report it; the authors' Script release and
CDPruner both negate), so negation is what makes "relevant" mean relevant on LLaVA.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

import script_prune as sp

ATTENTION_INPUTS = ("cls_attention", "keys")


@dataclass
class PruningConfig:
    """Which ``script_prune`` method runs, with which per-row budget and parameters."""

    method: str = "script"
    visual_token_num: int = 576  # tokens kept per image row / per NeXT crop
    params: dict = field(default_factory=dict)  # method parameters passed to script_prune
    negate_relevance: bool = True  # passed as the method's `negate` param when it has one

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or self.method not in sp.list_methods():
            raise ValueError(f"method must be one of {sp.list_methods()}, got {self.method!r}")
        if isinstance(self.visual_token_num, bool) or not isinstance(self.visual_token_num, int):
            raise ValueError(f"visual_token_num must be an int >= 1, got {self.visual_token_num!r}")
        if self.visual_token_num < 1:
            raise ValueError(f"visual_token_num must be >= 1, got {self.visual_token_num}")
        if not isinstance(self.params, dict):
            raise ValueError(f"params must be a dict of method parameters, got {type(self.params).__name__}")
        if not isinstance(self.negate_relevance, bool):
            raise ValueError(f"negate_relevance must be a bool, got {self.negate_relevance!r}")
        sp.check_params(self.method, self.params)  # names, types and ranges, before any model runs

    @property
    def spec(self) -> sp.MethodSpec:
        return sp.get_method(self.method)

    @property
    def needs_relevance(self) -> bool:
        """True when the method reads CLIP image/query embeddings (then the text tower is loaded)."""
        return self.spec.needs_relevance

    @property
    def needs_attention(self) -> bool:
        """True when the method reads the vision tower's [CLS] attention and keys (VisionZip)."""
        return any(name in self.spec.inputs for name in ATTENTION_INPUTS)

    @property
    def in_llm(self) -> bool:
        """True for methods that act inside the LLM (MethodSpec.stage == "llm", e.g. FastV)."""
        return self.spec.stage == "llm"

    def method_params(self) -> dict[str, Any]:
        """The keyword parameters for script_prune: ``params`` plus ``negate`` when the method has it."""
        params = dict(self.params)
        if "negate" in self.spec.params and "negate" not in params:
            params["negate"] = self.negate_relevance
        return params

    def is_noop_for(self, tokens_per_row: int) -> bool:
        """A budget >= the row length keeps every token: skip pruning (exactly unpruned)."""
        return sp.keeps_all(self.visual_token_num, tokens_per_row)


def as_pruning_config(pruning: PruningConfig | dict | None) -> PruningConfig | None:
    """Accept a PruningConfig, a dict of its fields, or None."""
    if pruning is None or isinstance(pruning, PruningConfig):
        return pruning
    if isinstance(pruning, dict):
        return PruningConfig(**pruning)
    raise ValueError(f"pruning must be a PruningConfig, a dict or None, got {type(pruning).__name__}")
