"""The fused pruning kernels' launcher: score + select + mask in one Triton launch per matrix.

A leaf of the package: it takes plain tensors, numbers and strings, and knows nothing of
pruning methods, sparsity patterns or the engine's dispatch (which lives in
:mod:`optishear_lightning.dispatch`: it turns a method's recipe into a :class:`FusedScore`, picks
PyTorch or the kernels and reports NaN scores).

What the kernel computes, :class:`FusedScore`: ``S_ij = C(C(N_ij * T(|W_ij|)) * x_j)`` with ``T``
one of :data:`FUSABLE_TRANSFORMS` and every vector or scalar (``x``, column and row sums, scalar
normalisers) passed in, computed by the reference's own PyTorch code: sums run in PyTorch's
reduction order, which a kernel cannot reproduce, and transcendental functions are not
correctly rounded on either side, so only single correctly rounded float32 operations
(multiply, add, ``sqrt_rn``, ``div_rn``) happen in the kernel. Given a score tensor instead,
the kernel only selects and masks.

The masks are those of :func:`~optishear_lightning.masks.keep_mask_from_scores` with
``group="row"`` or an N:M pattern, tie-break included.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from ._deprecated import MOVED_FROM_FUSED, moved_attribute

__all__ = [
    "FUSABLE_TRANSFORMS",
    "KERNEL_DTYPES",
    "NORMS",
    "FusedScore",
    "check_operands",
    "launch_prune",
]

#: Weight and score dtypes the kernels read (converted to float32 exactly on load).
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: Transforms of ``|W|`` that the kernel computes bit-identically to PyTorch.
FUSABLE_TRANSFORMS = ("identity", "sqrt", "square")
#: The kernel's normalisers ``N`` (see :class:`FusedScore`).
NORMS = ("none", "scalar", "row", "column", "relative", "ria")

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


def _kernel_module():
    # Imported on first launch: importing Triton is slow, and TRITON_INTERPRET must be set
    # before it (see optishear_lightning.kernels.backend).
    from . import triton_kernels

    return triton_kernels


def _kernels_for_device(device: torch.device):
    """The kernel module, if its kernels can run on ``device`` (CUDA, or the interpreter)."""
    kernels = _kernel_module()
    if device.type != "cuda" and not kernels.INTERPRETED:
        raise RuntimeError(
            f"The Triton kernels got {device} tensors but were not built for Triton's CPU "
            "interpreter: set TRITON_INTERPRET=1 before optishear_lightning.kernels."
            "triton_kernels is first imported, or move the tensors to a CUDA device."
        )
    return kernels


def check_operands(
    weight: Tensor, score: FusedScore | Tensor, *, inplace: bool = True, return_mask: bool = True
) -> None:
    """Raise unless :func:`launch_prune` can read ``weight`` and ``score``.

    Raises:
        ValueError: nothing to do, not 2-D, no unit stride along the input dimension, scores
            of another shape or device.
        TypeError: a dtype the kernels do not read.
    """
    if not (inplace or return_mask):
        raise ValueError("Pruning with inplace=False and return_mask=False does nothing.")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got {weight.shape}.")
    if weight.dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"The pruning kernels read float32, bfloat16 or float16 weights, got {weight.dtype}."
        )
    if weight.stride(-1) != 1:
        raise ValueError("The pruning kernels need unit stride along the input dimension.")
    if isinstance(score, FusedScore):
        return
    if score.shape != weight.shape:
        raise ValueError(f"scores {tuple(score.shape)} != weight {tuple(weight.shape)}.")
    if score.dtype not in KERNEL_DTYPES:
        raise TypeError(f"The kernels read float32/bfloat16/float16 scores, got {score.dtype}.")
    if score.device != weight.device:
        raise ValueError(f"scores are on {score.device}, the weight on {weight.device}.")


def _check_selection(cols: int, k: int | None, nm: tuple[int, int] | None) -> None:
    """Raise unless exactly one of ``k`` (per row) and ``nm`` (``(n, m)``) is valid."""
    if (k is None) == (nm is None):
        raise ValueError("launch_prune needs exactly one of k (per row) and nm ((n, m) groups).")
    if nm is not None:
        n, m = nm
        if not 1 <= n < m or cols % m:
            raise ValueError(f"N:M groups need 1 <= n < m and m dividing {cols}, got {n}:{m}.")
    elif not 0 <= k <= cols:
        raise ValueError(f"k={k} weights of a row of {cols} cannot be pruned.")


def launch_prune(
    weight: Tensor,
    score: FusedScore | Tensor,
    *,
    k: int | None = None,
    nm: tuple[int, int] | None = None,
    inplace: bool = True,
    return_mask: bool = True,
    nan_count: Tensor | None = None,
    max_resident: int | None = None,
    num_warps: int | None = None,
    coarse_bits: int | None = None,
    small: int | None = None,
    select: str | None = None,
    nm_impl: str | None = None,
    nm_block: int | None = None,
) -> Tensor | None:
    """Prune the ``k`` lowest scores of each row, or keep ``n`` of every ``m``: one launch.

    Runs wherever the kernels can (CUDA, or the CPU under ``TRITON_INTERPRET=1``), whatever
    the backend setting. NaN scores are counted, never raised: the kernel leaves every row
    (N:M: group) with a NaN score unwritten and adds their number to ``nan_count``.

    Args:
        weight: ``(out, in)`` float32/bfloat16/float16 weight with unit stride along ``in``.
        score: a :class:`FusedScore` (scores computed in the kernel) or a score tensor shaped
            like ``weight`` (select only; float32/bfloat16/float16).
        k: weights pruned per row (unstructured), or ``None`` with ``nm``.
        nm: ``(n, m)``: keep ``n`` of every ``m`` consecutive weights of a row.
        inplace: zero the pruned weights of ``weight``.
        return_mask: also write and return the ``bool`` keep mask.
        nan_count: a 1-element int32 tensor on the weight's device that the kernel adds the
            number of NaN scores to (``None``: a scratch counter nobody reads).
        max_resident, num_warps, coarse_bits, small, select: launch knobs for tests and
            tuning (see :func:`~optishear_lightning.kernels.triton_kernels.launch_rows`).
            ``None`` keeps the heuristics.
        nm_impl, nm_block: N:M launch knobs (see
            :func:`~optishear_lightning.kernels.triton_kernels.launch_nm`).

    Returns:
        The keep mask (``True`` = kept), or ``None`` when ``return_mask=False``.

    Raises:
        ValueError: bad shapes or selection (see :func:`check_operands`).
        TypeError: a dtype the kernels do not read.
        RuntimeError: CPU tensors while the kernels were not built for the interpreter.
    """
    check_operands(weight, score, inplace=inplace, return_mask=return_mask)
    rows, cols = weight.shape
    _check_selection(cols, k, nm)
    device = weight.device
    if isinstance(score, FusedScore):
        scores, consts, spec_tensors = None, score.constants(), score.tensors(device)
    else:
        scores = score if score.stride(-1) == 1 else score.contiguous()
        consts, spec_tensors = _SELECT_ONLY, (None, None, None, None)
    kernels = _kernels_for_device(device)
    keep = torch.empty((rows, cols), dtype=torch.bool, device=device) if return_mask else None
    if nan_count is None:
        # A count nobody reads goes to a shared scratch counter: no allocation and no fill
        # kernel per launch (launch overhead dominates the N:M kernel on small matrices).
        nan_count = _scratch_counter(device)
    target = weight.detach()
    if rows and cols:
        with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
            if nm is not None:
                kernels.launch_nm(
                    target, scores, keep, nan_count, spec_tensors, consts, nm[0], nm[1],
                    write_weight=inplace, num_warps=num_warps, nm_impl=nm_impl, block=nm_block,
                )  # fmt: skip
            else:
                kernels.launch_rows(
                    target, scores, keep, nan_count, spec_tensors, consts, k,
                    write_weight=inplace, max_resident=max_resident or kernels.MAX_RESIDENT,
                    num_warps=num_warps, small=small, coarse_bits=coarse_bits, select=select,
                )  # fmt: skip
    return keep


_SCRATCH_COUNTERS: dict[torch.device, Tensor] = {}


def _scratch_counter(device: torch.device) -> Tensor:
    """The shared, never read NaN counter of ``device``, made on first use."""
    if device not in _SCRATCH_COUNTERS:
        _SCRATCH_COUNTERS[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return _SCRATCH_COUNTERS[device]


def __getattr__(name: str) -> Any:
    # The engine's dispatch used to live here: its names resolve for one more release.
    return moved_attribute(__name__, name, MOVED_FROM_FUSED)
