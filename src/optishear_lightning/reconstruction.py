"""Weight reconstruction on a fixed mask: update the kept weights so that ``ŴX ≈ WX``.

A mask-only method (magnitude, Wanda, RIA, a searched metric) zeroes weights and leaves the rest
as they were; SparseGPT also moves the weights it keeps to make up for the ones it removed. The
functions here give every method that second half, *after* its mask is fixed (the mask never
changes, so fine-tuning and exported masks behave exactly as without reconstruction):

- ``"obs"``: SparseGPT's optimal-brain-surgeon update with the given mask (columns left to
  right in blocks of 128, each pruned weight's error spread onto the later columns through
  the Cholesky factor of the damped inverse Hessian). One pass; it only moves weights to the
  right of each pruned one, so it is not the least-squares optimum for the mask.
- ``"lsq"``: the least-squares optimum itself. For each output row with kept set ``K`` it
  solves ``H_KK ŵ_K = (H w)_K`` (``H = X^T X`` plus the same 1% dampening), for all rows at
  once by preconditioned conjugate gradients (the operator is one masked matrix product per
  iteration, so it runs at matmul speed on a GPU). Started from the OBS solution.

Both minimise the layer's reconstruction error ``||(W - Ŵ) X||``; which one prunes a model
better is measured in ``benchmarks/``. :func:`layer_error` computes that error from the Gram
matrix.
"""

from __future__ import annotations

from typing import Literal

import torch

from .sparsegpt import damped_hessian, sparsegpt_prune

__all__ = [
    "RECONSTRUCTIONS",
    "Reconstruction",
    "check_reconstruction",
    "layer_error",
    "reconstruct_weight",
]

Reconstruction = Literal["obs", "lsq"]
RECONSTRUCTIONS: tuple[str, ...] = ("obs", "lsq")


def check_reconstruction(value: str | None) -> str | None:
    """Validate a ``reconstruct`` setting (``None``, ``"obs"`` or ``"lsq"``)."""
    if value is None:
        return None
    key = str(value).lower()
    if key in ("none", "null", ""):
        return None
    if key not in RECONSTRUCTIONS:
        raise ValueError(
            f"Unknown reconstruction {value!r}: use None (masks only), 'obs' (SparseGPT's "
            "update on the chosen mask) or 'lsq' (least-squares optimum on the mask)."
        )
    return key


@torch.no_grad()
def layer_error(dense: torch.Tensor, pruned: torch.Tensor, gram: torch.Tensor) -> float:
    """``||(W - Ŵ) X||_F`` from the Gram matrix ``X^T X``."""
    delta = (dense.float() - pruned.float()).to(gram.device)
    return float(((delta @ gram.float()) * delta).sum().clamp_min(0).sqrt())


@torch.no_grad()
def _masked_lsq(
    weight: torch.Tensor,
    gram: torch.Tensor,
    keep: torch.Tensor,
    start: torch.Tensor,
    percdamp: float,
    iters: int,
    rtol: float,
) -> torch.Tensor:
    """Row-wise ``argmin ||(w - v) X||`` over ``v`` supported on ``keep``, by Jacobi-PCG."""
    H, dead = damped_hessian(gram, percdamp)
    w = weight.float().clone()
    w[:, dead] = 0
    m = keep.to(w.dtype)
    b = (w @ H) * m
    x = start.float() * m
    r = b - (x @ H) * m
    inv_diag = torch.diag(H).reciprocal().unsqueeze(0) * m
    z = r * inv_diag
    p = z.clone()
    rz = (r * z).sum(1, keepdim=True)
    tiny = torch.finfo(w.dtype).tiny
    stop = rtol**2 * (b * b).sum(1, keepdim=True).clamp_min(tiny)
    for _ in range(iters):
        Ap = (p @ H) * m
        alpha = rz / (p * Ap).sum(1, keepdim=True).clamp_min(tiny)
        x += alpha * p
        r -= alpha * Ap
        if bool(((r * r).sum(1, keepdim=True) <= stop).all()):
            break
        z = r * inv_diag
        rz_new = (r * z).sum(1, keepdim=True)
        p = z + (rz_new / rz.clamp_min(tiny)) * p
        rz = rz_new
    return x * m


@torch.no_grad()
def reconstruct_weight(
    method: str,
    dense: torch.Tensor,
    gram: torch.Tensor,
    keep: torch.Tensor,
    percdamp: float = 0.01,
    blocksize: int = 128,
    lsq_iters: int = 200,
    lsq_rtol: float = 1e-4,
) -> torch.Tensor:
    """The reconstructed weight for a fixed keep mask (zeros exactly where ``keep`` is False).

    Args:
        method: ``"obs"`` or ``"lsq"`` (see the module docstring).
        dense: the weight before pruning, ``(out_features, in_features)``.
        gram: ``X^T X`` of the layer's calibration inputs.
        keep: the keep mask (``bool``, same shape as ``dense``).
        percdamp: dampening as a fraction of the mean Hessian diagonal.
        blocksize: OBS column block size.
        lsq_iters: conjugate-gradient iterations at most (``"lsq"``).
        lsq_rtol: stop when every row's residual is below this fraction of its right-hand side.

    Returns:
        The new weight in ``dense``'s dtype, on ``dense``'s device.
    """
    gram = gram.to(dense.device)
    keep = keep.to(dense.device, torch.bool)
    obs, _ = sparsegpt_prune(dense, gram, None, blocksize=blocksize, percdamp=percdamp, keep=keep)
    if method == "obs":
        return obs
    if method != "lsq":
        raise ValueError(f"Unknown reconstruction {method!r}; use one of {RECONSTRUCTIONS}.")
    solved = _masked_lsq(dense, gram, keep, obs, percdamp, lsq_iters, lsq_rtol)
    # Inputs that never fired have no information: the kept ones keep their dense value.
    dead = torch.diag(gram) == 0
    solved[:, dead] = dense.float()[:, dead]
    solved[~keep] = 0
    return solved.to(dense.dtype)
