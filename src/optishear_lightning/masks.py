"""Mask layouts: which weights a score tensor prunes.

Pure tensor functions. A *keep mask* is a ``bool`` tensor shaped like the weight, ``True``
where the weight survives. Every layout prunes the lowest scores of its comparison group:

- ``unstructured`` with ``group="row"`` (Wanda's per-output comparison group): each output
  row loses exactly ``floor(in_features * sparsity)`` weights;
- ``unstructured`` with ``group="layer"``: the whole matrix loses
  ``floor(numel * sparsity)`` weights;
- ``N:M`` (e.g. ``2:4``): each run of ``M`` consecutive weights along the input dimension keeps
  exactly ``N``.

Ties are broken deterministically: among equal scores the weight with the lower index (column
index within a row or N:M group, row-major index for ``layer``) is pruned first. This is what a
stable ascending sort gives, and the Triton kernels reproduce it bit for bit.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = [
    "NAN_SCORES_ERROR",
    "SparsityPattern",
    "apply_keep_mask",
    "check_group",
    "check_pattern_fits",
    "keep_mask_from_scores",
    "num_pruned",
    "parse_pattern",
    "validate_sparsity",
]

Group = Literal["row", "layer"]

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
#: The error of NaN scores, the same from PyTorch and from the kernels (the engine's dispatch,
#: optishear_lightning.dispatch, raises it for them: the kernels only count NaN scores).
NAN_SCORES_ERROR = (
    "Pruning scores contain NaN: the calibration activations or weights are not "
    "finite. Check the model in float32 or bfloat16 and the calibration data."
)


@dataclass(frozen=True)
class SparsityPattern:
    """A mask layout: unstructured, or ``n`` kept out of every ``m`` along the input dim."""

    n: int = 0
    m: int = 0

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    @property
    def sparsity(self) -> float | None:
        """The sparsity an N:M pattern implies (``None`` for unstructured)."""
        return (self.m - self.n) / self.m if self.is_nm else None

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"


def parse_pattern(pattern: str | SparsityPattern) -> SparsityPattern:
    """Parse ``"unstructured"`` or ``"N:M"`` (``N`` kept of every ``M``; ``"2:4"`` is 50%).

    Raises:
        ValueError: unknown text, or ``N >= M`` / ``N < 1``.
    """
    if isinstance(pattern, SparsityPattern):
        return pattern
    text = str(pattern).strip().lower()
    if text in ("unstructured", "dense", ""):
        return SparsityPattern()
    match = _NM.match(text)
    if not match:
        raise ValueError(
            f"Unknown sparsity pattern {pattern!r}: use 'unstructured' or 'N:M' such as '2:4'."
        )
    n, m = int(match.group(1)), int(match.group(2))
    if not 1 <= n < m:
        raise ValueError(
            f"N:M pattern {pattern!r} needs 1 <= N < M (N weights kept of every M), e.g. '2:4'."
        )
    return SparsityPattern(n, m)


def check_group(group: str, pattern: SparsityPattern | None = None) -> Group:
    """Check a comparison group (and that N:M patterns keep their own, ``"row"``); return it.

    Raises:
        ValueError: an unknown group, or ``"layer"`` with an N:M pattern.
    """
    if group not in ("row", "layer"):
        raise ValueError(f"Unknown comparison group {group!r}: use 'row' or 'layer'.")
    if pattern is not None and pattern.is_nm and group != "row":
        raise ValueError("N:M patterns use their own groups; leave group='row'.")
    return group  # type: ignore[return-value]


def validate_sparsity(sparsity: float, what: str = "sparsity") -> float:
    """Check a sparsity ratio is a finite number in [0, 1) and return it as ``float``.

    Any real scalar is accepted (``0.5``, ``np.float32(0.5)``, ``torch.tensor(0.5)``); text is
    not, even when it looks like a number.
    """
    if isinstance(sparsity, (str, bytes)):
        raise ValueError(f"{what} must be a number in [0, 1), not the text {sparsity!r}.")
    try:
        value = float(sparsity)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number in [0, 1), got {sparsity!r}.") from None
    if not (0.0 <= value < 1.0) or math.isnan(value):
        raise ValueError(f"{what} must be in [0, 1) (0.5 prunes half the weights), got {value}.")
    return value


def check_pattern_fits(shape: tuple[int, ...] | torch.Size, pattern: SparsityPattern, name: str):
    """Raise ``ValueError`` if a weight's input dimension is not a multiple of ``M``."""
    if pattern.is_nm and shape[-1] % pattern.m != 0:
        raise ValueError(
            f"{name} has {shape[-1]} input features, not divisible by M={pattern.m} of the "
            f"{pattern} pattern; use an M that divides it or 'unstructured'."
        )


def num_pruned(group_size: int, sparsity: float) -> int:
    """How many of ``group_size`` weights a sparsity prunes: ``floor(group_size * sparsity)``.

    The tiny epsilon keeps binary floating point from turning ``100 * 0.29`` into 28.
    """
    return math.floor(group_size * sparsity + 1e-9)


def keep_mask_from_scores(
    scores: torch.Tensor,
    sparsity: float | None = None,
    pattern: str | SparsityPattern = "unstructured",
    group: Group = "row",
) -> torch.Tensor:
    """Keep mask that prunes the lowest scores of each comparison group.

    Args:
        scores: importance scores, shape ``(out_features, in_features)``; higher is kept.
        sparsity: fraction to prune (ignored for N:M, which fixes its own).
        pattern: ``"unstructured"`` or an N:M pattern.
        group: ``"row"`` (per output row, the default) or ``"layer"`` (whole matrix); only
            for unstructured.

    Returns:
        ``bool`` tensor shaped like ``scores``, ``True`` where the weight is kept.

    Raises:
        ValueError: NaN scores, a sparsity outside [0, 1), an unknown group, or an input
            dimension that N:M does not divide.

    Example:
        >>> keep_mask_from_scores(torch.tensor([[3.0, 1.0, 2.0, 1.0]]), 0.5)
        tensor([[ True, False,  True, False]])
    """
    pat = parse_pattern(pattern)
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D (out_features, in_features), got {scores.shape}.")
    if torch.isnan(scores).any():
        raise ValueError(NAN_SCORES_ERROR)
    rows, cols = scores.shape
    if pat.is_nm:
        check_pattern_fits(scores.shape, pat, "weight")
        grouped = scores.reshape(rows, cols // pat.m, pat.m)
        order = torch.sort(grouped, dim=-1, stable=True).indices
        keep = torch.ones_like(grouped, dtype=torch.bool)
        keep.scatter_(-1, order[..., : pat.m - pat.n], False)
        return keep.reshape(rows, cols)

    if sparsity is None:
        raise ValueError("Unstructured pruning needs a sparsity in [0, 1).")
    sparsity = validate_sparsity(sparsity)
    if group == "row":
        return ~_lowest_k(scores, num_pruned(cols, sparsity))
    if group == "layer":
        flat = scores.reshape(1, -1)
        return ~_lowest_k(flat, num_pruned(flat.shape[1], sparsity)).reshape(rows, cols)
    raise ValueError(f"Unknown comparison group {group!r}: use 'row' or 'layer'.")


def _lowest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, ``True`` at the ``k`` lowest scores, ties going to the lower column index.

    Equal to taking the first ``k`` of a stable ascending sort, in linear time: everything
    below the k-th smallest value, plus as many of the values equal to it as are still
    needed, leftmost first.
    """
    if k == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    kth = scores.kthvalue(k, dim=-1, keepdim=True).values
    below = scores < kth
    tied = scores == kth
    still_needed = k - below.sum(-1, keepdim=True)
    return below | (tied & (tied.cumsum(-1, dtype=torch.int32) <= still_needed))


@torch.no_grad()
def apply_keep_mask(weight: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Zero the pruned entries of ``weight`` in place and return it."""
    return weight.masked_fill_(~keep.to(weight.device), 0)
