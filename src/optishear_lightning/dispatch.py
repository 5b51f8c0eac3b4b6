"""The engine's kernel dispatch: which pruning runs on the fused Triton kernels, and how.

Each pruning method describes what the fused kernel needs to compute its scores, a
:class:`FusedRecipe` returned by its ``fused_recipe()`` (``None``: not fusable). This module
binds a recipe to a weight and its calibration statistics (:func:`fused_score`, giving the
kernel's :class:`~optishear_lightning.kernels.fused.FusedScore`), decides between PyTorch and
the kernels (the backend setting of :mod:`optishear_lightning.kernels.backend`, the weight's
dtype, layout and comparison group), launches the kernel with plain numbers
(:func:`~optishear_lightning.kernels.fused.launch_prune`) and reports NaN scores as the
PyTorch path does. Adding a fusable metric touches only the metric's definition.

What runs fused (scores computed inside the kernel, bit-identical to the reference): every
method whose recipe's transform of ``|W|`` is in
:data:`~optishear_lightning.kernels.fused.FUSABLE_TRANSFORMS` (magnitude, Wanda, RIA, the
meta metrics with ``F1`` in identity/sqrt/square). Select only (scores from PyTorch, then the
kernel selects and masks): any other method. PyTorch only: per-layer comparison groups
(``group="layer"``: one selection over a whole matrix does not fit one program), float64
weights or scores, weights without unit stride along the input dimension.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .kernels.backend import get_kernel_backend, kernels_for
from .kernels.fused import (
    FUSABLE_TRANSFORMS,
    KERNEL_DTYPES,
    FusedScore,
    check_operands,
    launch_prune,
)
from .masks import (
    NAN_SCORES_ERROR,
    SparsityPattern,
    check_pattern_fits,
    keep_mask_from_scores,
    num_pruned,
    parse_pattern,
    validate_sparsity,
)

__all__ = [
    "FUSABLE_TRANSFORMS",
    "FusedRecipe",
    "deferred_nan_checks",
    "dispatch_keep_mask",
    "fused_keep_mask",
    "fused_score",
    "keep_mask",
    "reference_keep_mask",
    "triton_prune",
    "try_fused_prune_",
    "try_select_prune_",
]

Tensor = torch.Tensor
WeightNorm = Literal["none", "factor", "relative", "ria"]


@dataclass(frozen=True)
class FusedRecipe:
    """What the fused kernel needs to score like a method: ``C(C(N * T(|W|)) * x)``.

    Every vector or scalar is computed by the method's own PyTorch code (the functions given
    here), so that the kernel's scores are bit-identical to the method's ``score``.

    Attributes:
        transform: ``T``, the transform of ``|W|``: one of
            :data:`~optishear_lightning.kernels.fused.FUSABLE_TRANSFORMS`.
        activation: ``(stats, device) -> x``, the per-input-channel factor (a vector of
            ``in_features`` values), or ``None`` for none. A method with an activation is not
            fused without statistics (its ``score`` reports them missing).
        weight_norm: ``N``, the normaliser of ``|W|``: ``"none"``; ``"factor"``
            (``weight_stats(|W|)`` is a factor shaped ``()``/``(1, 1)``, ``(out, 1)`` or
            ``(1, in)``; other shapes are not fused); ``"relative"``
            (``1 / max(row + col, tiny)``) or ``"ria"`` (``N * T`` becomes
            ``|W| / col + |W| / row``), both with ``weight_stats(|W|) -> (row, col)`` sums.
        weight_stats: the function of the float32 ``|W|`` that ``weight_norm`` needs.
        clamp: clamp ``N * T`` and the product to the finite float32 range (``C``).
    """

    transform: str = "identity"
    activation: Callable[[Any, torch.device], Tensor] | None = None
    weight_norm: WeightNorm = "none"
    weight_stats: Callable[[Tensor], Any] | None = None
    clamp: bool = False

    def __post_init__(self) -> None:
        if self.transform not in FUSABLE_TRANSFORMS:
            raise ValueError(
                f"FusedRecipe.transform={self.transform!r}: the kernel computes only "
                f"{', '.join(FUSABLE_TRANSFORMS)} exactly (return no recipe instead)."
            )
        if self.weight_norm not in ("none", "factor", "relative", "ria"):
            raise ValueError(f"Unknown FusedRecipe.weight_norm {self.weight_norm!r}.")
        if (self.weight_norm == "none") != (self.weight_stats is None):
            raise ValueError("FusedRecipe.weight_stats goes with a weight_norm other than 'none'.")


def _as_vector(v: Tensor) -> Tensor | None:
    # float64 statistics make the reference's scores float64: not the kernel's float32 scores.
    # bfloat16/float16 promote to float32 exactly in the reference's product, as they do here.
    return None if v.dtype not in KERNEL_DTYPES else v.float()


def _recipe_of(method: Any) -> FusedRecipe | None:
    recipe = getattr(method, "fused_recipe", None)
    return recipe() if callable(recipe) else None


def fused_score(method: Any, weight: Tensor, stats: Any) -> FusedScore | None:
    """The kernel's scoring of ``weight`` by ``method``, or ``None`` if not fusable.

    Args:
        method: a pruning method (its ``fused_recipe()`` says how; without one, or with
            ``None``, the method is not fusable).
        weight: the weight (its float32 ``|W|`` is needed for the normalisers).
        stats: the layer's :class:`~optishear_lightning.calibration.LayerStats`, or ``None``.
    """
    recipe = _recipe_of(method)
    if recipe is None:
        return None
    x = None
    if recipe.activation is not None:
        if stats is None:
            return None  # the reference reports the missing statistics
        x = _as_vector(recipe.activation(stats, weight.device))
        if x is None:
            return None
    spec = FusedScore(transform=recipe.transform, clamp=recipe.clamp, x=x)
    if recipe.weight_norm == "none":
        return spec
    w = weight.detach().float().abs()
    if recipe.weight_norm in ("relative", "ria"):
        spec.norm = recipe.weight_norm
        spec.norm_row, spec.norm_col = recipe.weight_stats(w)
        return spec
    factor = recipe.weight_stats(w)
    rows, cols = w.shape
    if factor.numel() == 1:
        spec.norm, spec.norm_scalar = "scalar", factor
    elif factor.shape == (rows, 1):
        spec.norm, spec.norm_row = "row", factor
    elif factor.shape == (1, cols):
        spec.norm, spec.norm_col = "column", factor
    else:
        return None
    return spec


def triton_prune(
    weight: Tensor,
    score: FusedScore | Tensor,
    sparsity: float | None = None,
    pattern: str | SparsityPattern = "unstructured",
    *,
    inplace: bool = True,
    return_mask: bool = True,
    check_nan: bool = True,
    nan_count: Tensor | None = None,
    **knobs: Any,
) -> Tensor | None:
    """Prune per output row (or per N:M group) with one Triton kernel launch.

    Same masks as :func:`~optishear_lightning.masks.keep_mask_from_scores` with
    ``group="row"``, tie-break included. Runs wherever the kernels can (CUDA, or the CPU under
    ``TRITON_INTERPRET=1``), whatever the backend setting: the dispatch is the caller's.

    Args:
        weight: ``(out, in)`` float32/bfloat16/float16 weight with unit stride along ``in``.
        score: a :class:`~optishear_lightning.kernels.fused.FusedScore` (scores computed in the
            kernel, see :func:`fused_score`) or a score tensor shaped like ``weight`` (select
            only; float32/bfloat16/float16).
        sparsity: fraction of each row to prune (ignored for N:M).
        pattern: ``"unstructured"`` or ``"N:M"``.
        inplace: zero the pruned weights of ``weight``.
        return_mask: also write and return the ``bool`` keep mask.
        check_nan: raise if a score is NaN (one device sync). The kernel never writes a row
            (N:M: a group) with a NaN score, but other rows are pruned before the error.
        nan_count: a 1-element int32 tensor on the weight's device that the kernel adds the
            number of NaN scores to, for a caller that checks once for many launches
            (``check_nan`` then usually ``False``; see :func:`deferred_nan_checks`).
        **knobs: launch knobs for tests and tuning (``max_resident``, ``num_warps``,
            ``coarse_bits``, ``small``, ``select``, ``nm_impl``, ``nm_block``: see
            :func:`~optishear_lightning.kernels.fused.launch_prune`).

    Returns:
        The keep mask (``True`` = kept), or ``None`` when ``return_mask=False``.

    Raises:
        ValueError: bad shapes, sparsity or pattern; NaN scores (with ``check_nan``).
        TypeError: a dtype the kernels do not read.
        RuntimeError: CPU tensors while the kernels were not built for the interpreter.
    """
    pat = parse_pattern(pattern)
    check_operands(weight, score, inplace=inplace, return_mask=return_mask)
    if pat.is_nm:
        check_pattern_fits(weight.shape, pat, "weight")
        selection: dict[str, Any] = {"nm": (pat.n, pat.m)}
    elif sparsity is None:
        raise ValueError("Unstructured pruning needs a sparsity in [0, 1).")
    else:
        selection = {"k": num_pruned(weight.shape[1], validate_sparsity(sparsity))}
    if nan_count is None and check_nan:
        nan_count = torch.zeros(1, dtype=torch.int32, device=weight.device)
    keep = launch_prune(
        weight, score, inplace=inplace, return_mask=return_mask, nan_count=nan_count,
        **selection, **knobs,
    )  # fmt: skip
    if check_nan and int(nan_count.item()):
        raise ValueError(NAN_SCORES_ERROR)
    return keep


#: Why the kernels were switched off for this process under the "auto" backend, if they were.
_auto_failure: str | None = None

# NaN counters of the innermost active deferred_nan_checks() of this thread, by device.
_deferred = threading.local()


@contextmanager
def deferred_nan_checks() -> Iterator[None]:
    """Check the engine's kernel launches for NaN scores once, on exit, not after each launch.

    Each launch otherwise reads its NaN counter back (a device sync), which keeps the GPU idle
    while Python prepares the next matrix; inside this context the launches add to one counter
    per device and run back to back. Nested contexts check at the outermost exit. The error
    is the same ``ValueError`` as without the context, raised when the block ends (the kernels
    never write a row or N:M group whose scores contain a NaN; other rows are pruned).

    Example:
        >>> with deferred_nan_checks():  # doctest: +SKIP
        ...     for lin in block_linears:
        ...         METHODS["wanda"].prune_(lin.weight, stats[lin], 0.5, pattern)
    """
    if getattr(_deferred, "counters", None) is not None:
        yield  # the outermost context checks
        return
    _deferred.counters = {}
    try:
        yield
        counters = _deferred.counters
    finally:
        _deferred.counters = None
    if any(int(c.item()) for c in counters.values()):
        raise ValueError(NAN_SCORES_ERROR)


def _deferred_counter(device: torch.device) -> Tensor | None:
    counters = getattr(_deferred, "counters", None)
    if counters is None:
        return None
    if device not in counters:
        counters[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return counters[device]


def _kernel_ready(weight: Tensor, pattern: SparsityPattern, group: str) -> bool:
    """Whether the dispatch sends this weight to the kernels (may raise: see kernels_for)."""
    if not kernels_for(weight.device):
        return False
    if _auto_failure is not None and get_kernel_backend() == "auto":
        return False
    return (
        (pattern.is_nm or group == "row")
        and weight.dim() == 2
        and weight.dtype in KERNEL_DTYPES
        and weight.stride(-1) == 1
    )


def _engine_launch(
    weight: Tensor,
    score: FusedScore | Tensor,
    sparsity: float | None,
    pattern: SparsityPattern,
    inplace: bool = True,
) -> Tensor | None:
    global _auto_failure
    counter = _deferred_counter(weight.device)
    try:
        return triton_prune(
            weight, score, sparsity, pattern, inplace=inplace,
            check_nan=counter is None, nan_count=counter,
        )  # fmt: skip
    except ValueError:  # NaN scores, bad arguments: what the PyTorch path raises too
        raise
    except Exception as error:
        if get_kernel_backend() != "auto":
            raise
        # A Triton that cannot compile or launch for this GPU must not break pruning under
        # "auto": such failures come before the kernel writes anything, so PyTorch takes over.
        _auto_failure = f"{type(error).__name__}: {error}"
        warnings.warn(
            f"The Triton pruning kernels failed ({_auto_failure}); pruning with PyTorch from "
            "now on. OPTISHEAR_KERNELS=torch avoids the attempt, =triton makes it an error.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def try_fused_prune_(
    weight: Tensor,
    method: Any,
    stats: Any,
    sparsity: float | None,
    pattern: str | SparsityPattern,
    group: str = "row",
) -> Tensor | None:
    """Engine hook: prune ``weight`` in place with the fused kernel and return the keep mask.

    Returns ``None`` (the caller then runs the PyTorch path) when the backend setting sends
    this weight to PyTorch or when ``method`` is not fusable; under ``"auto"`` also when the
    kernels fail to compile or launch (with a warning, once: they stay off afterwards).
    """
    return _try_fused(weight, method, stats, sparsity, parse_pattern(pattern), group, True)


def _try_fused(
    weight: Tensor,
    method: Any,
    stats: Any,
    sparsity: float | None,
    pattern: SparsityPattern,
    group: str,
    inplace: bool,
) -> Tensor | None:
    """The fused kernel's keep mask, or ``None`` where the dispatch says PyTorch."""
    if not _kernel_ready(weight, pattern, group):
        return None
    spec = fused_score(method, weight, stats)
    if spec is None:
        return None
    return _engine_launch(weight, spec, sparsity, pattern, inplace=inplace)


def try_select_prune_(
    weight: Tensor,
    scores: Tensor,
    sparsity: float | None,
    pattern: str | SparsityPattern,
    group: str = "row",
) -> Tensor | None:
    """Engine hook: select from precomputed ``scores`` and mask ``weight`` in one kernel.

    Returns ``None`` when the PyTorch path should run instead.
    """
    pat = parse_pattern(pattern)
    if not _kernel_ready(weight, pat, group):
        return None
    if (
        scores.shape != weight.shape
        or scores.dtype not in KERNEL_DTYPES
        or scores.device != weight.device
    ):
        return None
    return _engine_launch(weight, scores, sparsity, pat)


def keep_mask(
    scores: Tensor,
    sparsity: float | None,
    pattern: str | SparsityPattern = "unstructured",
    group: str = "row",
) -> Tensor:
    """:func:`~optishear_lightning.masks.keep_mask_from_scores` with the engine's dispatch.

    The select-only kernel where the backend setting sends ``scores`` to the kernels (CUDA
    under ``"auto"``), else (CPU, layer groups, float64, ...) PyTorch: the same mask.
    """
    pat = parse_pattern(pattern)
    if _kernel_ready(scores, pat, group):
        keep = _engine_launch(scores, scores, sparsity, pat, inplace=False)
        if keep is not None:
            return keep
    return keep_mask_from_scores(scores, sparsity, pat, group)


def dispatch_keep_mask(
    method: Any,
    weight: Tensor,
    stats: Any,
    sparsity: float | None,
    pattern: str | SparsityPattern = "unstructured",
    group: str = "row",
) -> Tensor:
    """Keep mask of ``method`` on ``weight`` (untouched), with the engine's dispatch.

    The fused kernel where the backend setting sends ``weight`` to the kernels and ``method``
    is fusable; otherwise ``method.score(weight, stats)`` and :func:`keep_mask`. The same
    mask as ``keep_mask_from_scores(method.score(weight, stats), ...)`` either way.
    """
    pat = parse_pattern(pattern)
    keep = _try_fused(weight, method, stats, sparsity, pat, group, inplace=False)
    if keep is not None:
        return keep
    return keep_mask(method.score(weight, stats), sparsity, pat, group)


def fused_keep_mask(
    method: Any,
    weight: Tensor,
    stats: Any,
    sparsity: float | None,
    pattern: str | SparsityPattern = "unstructured",
) -> Tensor:
    """Keep mask of ``method`` from the kernels, ``weight`` untouched (row or N:M groups).

    Fused when ``method`` is fusable, else PyTorch scores and the select-only kernel.
    """
    spec = fused_score(method, weight, stats)
    if spec is None:
        spec = method.score(weight.detach().float(), stats)
    return triton_prune(weight, spec, sparsity, pattern, inplace=False)


def reference_keep_mask(
    method: Any,
    weight: Tensor,
    stats: Any,
    sparsity: float | None,
    pattern: str | SparsityPattern = "unstructured",
    group: str = "row",
) -> Tensor:
    """The PyTorch reference: ``keep_mask_from_scores(method.score(W, stats), ...)``."""
    scores = method.score(weight.detach().float(), stats)
    return keep_mask_from_scores(scores, sparsity, pattern, group)
