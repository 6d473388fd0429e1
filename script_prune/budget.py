"""Per-row token budgets: the one resolver and the one "keeps every token" rule.

A budget is given either as an ``int`` >= 1 (tokens kept per visual row: an image, a crop, a
frame) or as a ``float`` in (0, 1) (the fraction of each row kept, for dynamic-resolution
families whose rows differ in length). :func:`resolve_budget` turns it into a token count for
a row of ``n`` tokens; :func:`keeps_all` is the single place that says a count leaves a row
unpruned (``k >= n``); :func:`kept_tokens` is what a selection then keeps.
"""

from __future__ import annotations

import math
import numbers
from fractions import Fraction

__all__ = ["check_budget", "keeps_all", "kept_tokens", "resolve_budget"]


def check_budget(budget: object, name: str = "budget") -> int | float:
    """``budget`` validated: an int >= 1 or a float in (0, 1); ValueError naming ``name`` otherwise."""
    if isinstance(budget, bool):
        raise ValueError(f"{name} must be an int >= 1 or a float in (0, 1), got {budget!r}")
    if isinstance(budget, numbers.Integral):
        if int(budget) < 1:
            raise ValueError(f"{name} must be >= 1 tokens per row, got {budget}")
        return int(budget)
    if isinstance(budget, numbers.Real) and math.isfinite(budget) and 0.0 < float(budget) < 1.0:
        return float(budget)
    raise ValueError(f"{name} must be an int >= 1 (tokens per row) or a float in (0, 1) (fraction per row), got {budget!r}")


def resolve_budget(budget: int | float, n: int) -> int:
    """Tokens kept in a row of ``n`` tokens.

    int: the budget itself (may exceed ``n``; see :func:`keeps_all`); float ``f`` in (0, 1):
    ``max(1, floor(f * n))`` with ``f`` taken as the decimal written (``Fraction(repr(f))``), so
    ``0.29 * 100`` gives 29, not 28.
    """
    budget = check_budget(budget)
    if isinstance(budget, int):
        return budget
    return max(1, math.floor(Fraction(repr(budget)) * n))


def keeps_all(k: int, n: int) -> bool:
    """True when keeping ``k`` of ``n`` tokens leaves the row exactly unpruned (``k >= n``)."""
    return k >= n


def kept_tokens(budget: int | float, n: int) -> int:
    """Tokens a selection method keeps of a row of ``n``: the resolved budget, or all ``n`` when it keeps all."""
    k = resolve_budget(budget, n)
    return n if keeps_all(k, n) else k
