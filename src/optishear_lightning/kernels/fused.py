"""Fused score + select + mask with the Triton kernels, and the engine's dispatch hooks.

What runs fused (scores computed inside the kernel, bit-identical to the reference):

- ``magnitude`` (``|W|``), ``wanda`` (``|W| * sqrt(x)``) and ``ria`` (``|W|/colsum +
  |W|/rowsum``, times ``sqrt(x)^0.5``);
- every :class:`~optishear_lightning.search.space.MetaMetric` whose ``F1`` (the transform of
  ``|W|``) is ``identity``, ``sqrt`` or ``square``, with any normalisers and any ``F2``.

Everything that is a vector or a scalar (the activation factor, column and row sums, the
scalar normalisers) is computed by the reference's own PyTorch code and passed in: sums run in
PyTorch's reduction order, which a kernel cannot reproduce, and transcendental functions
(``exp``, ``log``, ``sigmoid``, ``softmax``) are not correctly rounded on either side, so only
single correctly rounded float32 operations (multiply, add, ``sqrt_rn``, ``div_rn``) happen in
the kernel. RIA and meta metrics with a ``|W|`` normaliser still make one float32 copy of
``|W|`` for those sums (as the reference does).

Select only (scores from PyTorch, then the kernel selects and masks): meta metrics with
``F1`` in ``exp``, ``log``, ``sigmoid``, ``softmax``; any other registered score function.

PyTorch only: per-layer comparison groups (``group="layer"``: one selection over a whole matrix
does not fit one program), float64 weights or scores, weights without unit stride along the
input dimension.
"""

from __future__ import annotations

import inspect
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from ..masks import (
    _NAN_SCORES_ERROR,
    SparsityPattern,
    check_pattern_fits,
    keep_mask_from_scores,
    num_pruned,
    parse_pattern,
    validate_sparsity,
)
from .backend import get_kernel_backend, kernels_for

__all__ = [
    "FUSABLE_TRANSFORMS",
    "KERNEL_DTYPES",
    "FusedScore",
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

#: Weight and score dtypes the kernels read (converted to float32 exactly on load).
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: Transforms of ``|W|`` that the kernel computes bit-identically to PyTorch.
FUSABLE_TRANSFORMS = ("identity", "sqrt", "square")

Tensor = torch.Tensor


@dataclass(eq=False)
class FusedScore:
    """How the kernel scores ``W``: ``S_ij = C(C(N_ij * T(|W_ij|)) * x_j)``.

    Attributes:
        transform: ``T``: ``"identity"``, ``"sqrt"`` or ``"square"``.
        norm: ``N``: ``"none"`` (1), ``"scalar"`` (``norm_scalar``), ``"row"``
            (``norm_row[i]``), ``"column"`` (``norm_col[j]``), ``"relative"``
            (``1 / max(norm_row[i] + norm_col[j], tiny)``) or ``"ria"`` (then ``N * T`` is
            replaced by ``|W|/norm_col[j] + |W|/norm_row[i]``).
        clamp: clamp ``N * T`` and the product to the finite float32 range (``C``).
        x: per-input-channel factor ``x_j`` (float32), or ``None`` for none.
        norm_row, norm_col, norm_scalar: float32 vectors (``out``, ``in``) and a 1-element
            tensor, as ``norm`` needs them.
    """

    transform: str = "identity"
    norm: str = "none"
    clamp: bool = False
    x: Tensor | None = None
    norm_row: Tensor | None = None
    norm_col: Tensor | None = None
    norm_scalar: Tensor | None = None

    def constants(self) -> dict[str, Any]:
        """The kernels' compile-time metric arguments."""
        from .triton_kernels import NORM_CODES, TRANSFORM_CODES

        return dict(
            SOURCE=0,
            TRANSFORM=TRANSFORM_CODES[self.transform],
            NORM=NORM_CODES[self.norm],
            HAS_X=self.x is not None,
            CLAMP=self.clamp,
        )

    def tensors(self, device: torch.device) -> tuple[Tensor | None, ...]:
        """``(x, norm_row, norm_col, norm_scalar)`` as contiguous float32 on ``device``."""
        return tuple(
            None if t is None else t.to(device=device, dtype=torch.float32).reshape(-1).contiguous()
            for t in (self.x, self.norm_row, self.norm_col, self.norm_scalar)
        )


_SELECT_ONLY = dict(SOURCE=1, TRANSFORM=0, NORM=0, HAS_X=False, CLAMP=False)


def _as_vector(v: Tensor) -> Tensor | None:
    # float64 statistics make the reference's scores float64: not the kernel's float32 scores.
    # bfloat16/float16 promote to float32 exactly in the reference's product, as they do here.
    return None if v.dtype not in KERNEL_DTYPES else v.float()


def fused_score(method: Any, weight: Tensor, stats: Any) -> FusedScore | None:
    """The kernel's recipe for ``method``'s scores of ``weight``, or ``None`` if not fusable.

    Args:
        method: a :class:`~optishear_lightning.metrics.ScoreMethod` (magnitude, Wanda, RIA
            are fusable) or a :class:`~optishear_lightning.search.space.MetaMetric`.
        weight: the weight (its float32 ``|W|`` is needed for column/row sums).
        stats: the layer's :class:`~optishear_lightning.calibration.LayerStats`.
    """
    # Imported here: metrics imports this package (for its dispatch hooks).
    from ..metrics import ScoreMethod, magnitude_score, ria_score, wanda_score

    if isinstance(method, ScoreMethod):
        fn = method.score
        if fn is magnitude_score:
            return FusedScore()
        if stats is None:
            return None  # the reference reports the missing statistics
        if fn is wanda_score:  # |W| * sqrt(x), as metrics.wanda_score
            x = _as_vector(stats.act_sq_mean.sqrt())
            return None if x is None else FusedScore(x=x)
        if fn is ria_score:  # as metrics.ria_score with its default exponent
            power = inspect.signature(ria_score).parameters["a"].default
            x = _as_vector(stats.act_sq_mean.sqrt().pow(power))
            if x is None:
                return None
            w = weight.detach().float().abs()
            tiny = torch.finfo(w.dtype).tiny
            return FusedScore(
                norm="ria",
                x=x,
                norm_col=w.sum(dim=0, keepdim=True).clamp_min(tiny),
                norm_row=w.sum(dim=1, keepdim=True).clamp_min(tiny),
            )
        return None
    space = sys.modules.get(f"{__package__.rsplit('.', 1)[0]}.search.space")
    if space is not None and isinstance(method, space.MetaMetric):
        return _meta_metric_score(method, weight, stats, space.NORMALISERS)
    return None


def _meta_metric_score(metric: Any, weight: Tensor, stats: Any, normalisers: dict):
    if metric.f1 not in FUSABLE_TRANSFORMS or stats is None:
        return None
    spec = FusedScore(transform=metric.f1, clamp=True, x=metric.x_part(stats, weight.device))
    if metric.a == "none":
        return spec  # NORMALISERS["none"] is a 1: multiplying by it changes nothing
    w = weight.detach().float().abs()
    if metric.a == "relative_sum":
        # The reference reciprocates the broadcast sum: pass both sums, add in the kernel.
        spec.norm = "relative"
        spec.norm_row = w.sum(dim=1, keepdim=True)
        spec.norm_col = w.sum(dim=0, keepdim=True)
        return spec
    factor = normalisers[metric.a](w)
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


def _kernel_module():
    from . import triton_kernels

    return triton_kernels


def triton_prune(
    weight: Tensor,
    score: FusedScore | Tensor,
    sparsity: float | None = None,
    pattern: str | SparsityPattern = "unstructured",
    *,
    inplace: bool = True,
    return_mask: bool = True,
    check_nan: bool = True,
    max_resident: int | None = None,
    num_warps: int | None = None,
    coarse_bits: int | None = None,
    small: int | None = None,
    select: str | None = None,
    nm_impl: str | None = None,
    nm_block: int | None = None,
    nan_count: Tensor | None = None,
) -> Tensor | None:
    """Prune per output row (or per N:M group) with one Triton kernel launch.

    Same masks as :func:`~optishear_lightning.masks.keep_mask_from_scores` with
    ``group="row"``, tie-break included. Runs wherever the kernels can (CUDA, or the CPU under
    ``TRITON_INTERPRET=1``), whatever the backend setting: the dispatch is the caller's.

    Args:
        weight: ``(out, in)`` float32/bfloat16/float16 weight with unit stride along ``in``.
        score: a :class:`FusedScore` (scores computed in the kernel) or a score tensor shaped
            like ``weight`` (select only; float32/bfloat16/float16).
        sparsity: fraction of each row to prune (ignored for N:M).
        pattern: ``"unstructured"`` or ``"N:M"``.
        inplace: zero the pruned weights of ``weight``.
        return_mask: also write and return the ``bool`` keep mask.
        check_nan: raise if a score is NaN (one device sync). The kernel never writes a row
            (N:M: a group) with a NaN score, but other rows are pruned before the error.
        max_resident, num_warps, coarse_bits, small, select: launch knobs for tests and
            tuning (see :func:`~optishear_lightning.kernels.triton_kernels.launch_rows`): the
            longest row held in registers (longer rows are streamed in chunks), warps a
            program, the k-th-key search of resident rows (``"two_level"`` or ``"bisect"``),
            the bisection's key bits counted over the whole row before the candidate bucket is
            copied out (32: never), the bucket scratch size (a power of two). ``None`` keeps
            the heuristics.
        nm_impl, nm_block: N:M launch knobs (see
            :func:`~optishear_lightning.kernels.triton_kernels.launch_nm`).
        nan_count: a 1-element int32 tensor on the weight's device that the kernel adds the
            number of NaN scores to, for a caller that checks once for many launches
            (``check_nan`` then usually ``False``; see :func:`deferred_nan_checks`).

    Returns:
        The keep mask (``True`` = kept), or ``None`` when ``return_mask=False``.

    Raises:
        ValueError: bad shapes, sparsity or pattern; NaN scores (with ``check_nan``).
        TypeError: a dtype the kernels do not read.
        RuntimeError: CPU tensors while the kernels were not built for the interpreter.
    """
    pat = parse_pattern(pattern)
    if not (inplace or return_mask):
        raise ValueError("triton_prune with inplace=False and return_mask=False does nothing.")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got {weight.shape}.")
    if weight.dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"The pruning kernels read float32, bfloat16 or float16 weights, got {weight.dtype}."
        )
    if weight.stride(-1) != 1:
        raise ValueError("The pruning kernels need unit stride along the input dimension.")
    rows, cols = weight.shape
    device = weight.device
    if isinstance(score, FusedScore):
        scores, consts, spec_tensors = None, score.constants(), score.tensors(device)
    else:
        if score.shape != weight.shape:
            raise ValueError(f"scores {tuple(score.shape)} != weight {tuple(weight.shape)}.")
        if score.dtype not in KERNEL_DTYPES:
            raise TypeError(f"The kernels read float32/bfloat16/float16 scores, got {score.dtype}.")
        if score.device != device:
            raise ValueError(f"scores are on {score.device}, the weight on {device}.")
        scores = score if score.stride(-1) == 1 else score.contiguous()
        consts, spec_tensors = _SELECT_ONLY, (None, None, None, None)
    if pat.is_nm:
        check_pattern_fits(weight.shape, pat, "weight")
    elif sparsity is None:
        raise ValueError("Unstructured pruning needs a sparsity in [0, 1).")
    else:
        k = num_pruned(cols, validate_sparsity(sparsity))

    kernels = _kernel_module()
    if device.type != "cuda" and not kernels.INTERPRETED:
        raise RuntimeError(
            f"The Triton kernels got {device} tensors but were not built for Triton's CPU "
            "interpreter: set TRITON_INTERPRET=1 before optishear_lightning.kernels."
            "triton_kernels is first imported, or move the tensors to a CUDA device."
        )
    keep = torch.empty((rows, cols), dtype=torch.bool, device=device) if return_mask else None
    if nan_count is None:
        # A count nobody reads goes to a shared scratch counter: no allocation and no fill
        # kernel per launch (launch overhead dominates the N:M kernel on small matrices).
        nan_count = (
            torch.zeros(1, dtype=torch.int32, device=device)
            if check_nan
            else _device_counter(_SCRATCH_COUNTERS, device)
        )
    target = weight.detach()
    if rows and cols:
        with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
            if pat.is_nm:
                kernels.launch_nm(
                    target, scores, keep, nan_count, spec_tensors, consts, pat.n, pat.m,
                    write_weight=inplace, num_warps=num_warps, nm_impl=nm_impl, block=nm_block,
                )  # fmt: skip
            else:
                kernels.launch_rows(
                    target, scores, keep, nan_count, spec_tensors, consts, k,
                    write_weight=inplace, max_resident=max_resident or kernels.MAX_RESIDENT,
                    num_warps=num_warps, small=small, coarse_bits=coarse_bits, select=select,
                )  # fmt: skip
    if check_nan and int(nan_count.item()):
        raise ValueError(_NAN_SCORES_ERROR)
    return keep


_SCRATCH_COUNTERS: dict[torch.device, Tensor] = {}


def _device_counter(counters: dict[torch.device, Tensor], device: torch.device) -> Tensor:
    """``counters``' zeroed 1-element int32 counter for ``device``, made on first use."""
    if device not in counters:
        counters[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return counters[device]


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
        raise ValueError(_NAN_SCORES_ERROR)


def _deferred_counter(device: torch.device) -> Tensor | None:
    counters = getattr(_deferred, "counters", None)
    return None if counters is None else _device_counter(counters, device)


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
    weight: Tensor, score, sparsity, pattern: SparsityPattern, inplace: bool = True
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
