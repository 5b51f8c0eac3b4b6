"""Model-wise search objectives: how far the pruned model's outputs are from the dense model's.

An objective compares the pruned and the dense logits of the same tokens, a chunk at a time
(the logits of a whole window set are never held at once), and reduces the accumulated sum to
one number, lower is better. Adding one is a subclass and one line in :data:`OBJECTIVES`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

__all__ = ["OBJECTIVES", "KLDivergence", "LogitFrobenius", "Objective", "get_objective"]

ObjectiveName = Literal["kl", "logit_frobenius"]


class Objective:
    """Interface: ``partial`` sums over a chunk of tokens, ``reduce`` makes the final value."""

    name: str = ""

    def partial(self, pruned: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """A 0-d float32 tensor summed over the chunk's tokens (``(..., vocab)`` logits)."""
        raise NotImplementedError

    def reduce(self, total: float, n_tokens: int) -> float:
        """The objective from the sum of all partials and the number of tokens."""
        raise NotImplementedError


class LogitFrobenius(Objective):
    """``||logits_pruned - logits_dense||_F`` over all tokens (the OptiShear paper's).

    It also counts shifts of a token's logits by a constant, which change no probability.
    """

    name = "logit_frobenius"

    def partial(self, pruned: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return (pruned - dense).pow(2).sum()

    def reduce(self, total: float, n_tokens: int) -> float:
        return math.sqrt(max(total, 0.0))


class KLDivergence(Objective):
    """Mean ``KL(p_dense || p_pruned)`` of the next-token distributions, per token.

    Perplexity is a function of the next-token distribution alone, and KL is invariant to what
    softmax ignores, so this is the objective closest to what pruning is judged by.
    """

    name = "kl"

    def partial(self, pruned: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        log_p = torch.log_softmax(dense, dim=-1)
        log_q = torch.log_softmax(pruned, dim=-1)
        return (log_p.exp() * (log_p - log_q)).sum()

    def reduce(self, total: float, n_tokens: int) -> float:
        return max(total, 0.0) / max(n_tokens, 1)


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (KLDivergence(), LogitFrobenius())}


def get_objective(name: str | Objective) -> Objective:
    """Look an objective up by name."""
    if isinstance(name, Objective):
        return name
    if name not in OBJECTIVES:
        raise ValueError(f"Unknown search objective {name!r}; choose one of {sorted(OBJECTIVES)}.")
    return OBJECTIVES[name]
