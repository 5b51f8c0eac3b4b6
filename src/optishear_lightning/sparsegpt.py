"""SparseGPT: one-shot pruning with optimal-brain-surgeon weight reconstruction.

A pure tensor function after Frantar & Alistarh (2023), reference implementation
``IST-DASLab/sparsegpt``: columns are processed left to right in blocks of 128; within a block
the mask is chosen by the OBS saliency ``w**2 / [H^-1]_jj**2`` and every pruned weight's error is
spread onto the not-yet-processed columns through the Cholesky factor of the damped inverse
Hessian ``H = X^T X`` (1% dampening).

One deliberate difference: the reference picks the pruned fraction over the whole
``rows x 128`` block, so individual rows end up with different sparsities. Here the comparison
group is the output row by default (as for every other method of this package), and each
block prunes ``floor(s * end) - floor(s * start)`` weights per row, so every row has exactly
``floor(s * in_features)`` zeros in the end. ``group="layer"`` selects over the whole block
instead, with the same exact total over the matrix.
"""

from __future__ import annotations

import warnings

import torch

from .masks import SparsityPattern, check_group, num_pruned, parse_pattern

__all__ = ["damped_hessian", "inverse_hessian_factor", "sparsegpt_prune"]


def _prune_lowest(tmp: torch.Tensor, count: int, mask: torch.Tensor, by_row: bool) -> None:
    """Mark the ``count`` lowest entries (per row, or over the block) as pruned in ``mask``."""
    if count <= 0:
        return
    if by_row:
        order = torch.sort(tmp, dim=1, stable=True).indices
        mask.scatter_(1, order[:, :count], True)
    else:
        order = torch.sort(tmp.flatten(), stable=True).indices
        mask.view(-1)[order[:count]] = True


def _obs_errors(
    w: torch.Tensor, u: torch.Tensor, pruned: torch.Tensor, chunk: int = 4096
) -> torch.Tensor:
    """The scaled errors that the reference's column-by-column loop produces, in one solve.

    Processing columns left to right, the reference computes for each pruned column ``i`` the
    error ``e_i = w_i / U_ii`` of the weight updated by all earlier errors, i.e.
    ``sum_{k<=i} U_ki e_k = w0_i`` over pruned ``k``, and ``e_i = 0`` for kept columns. That is a
    lower-triangular system per row, whose matrix is ``U^T`` restricted to the row's pruned
    columns (identity elsewhere); solving it for all rows at once replaces the Python loop.

    Args:
        w: ``(rows, c)`` weights at the start of the column range.
        u: ``(c, c)`` upper Cholesky factor of the inverse Hessian for those columns.
        pruned: ``(rows, c)`` mask of weights to prune.
        chunk: rows solved at once (bounds the ``rows x c x c`` temporary).
    """
    errors = torch.zeros_like(w)
    eye = torch.eye(u.shape[0], device=u.device, dtype=u.dtype)
    lower = u.t()
    for r1 in range(0, w.shape[0], chunk):
        m = pruned[r1 : r1 + chunk]
        both = m.unsqueeze(2) & m.unsqueeze(1)
        system = torch.where(both, lower.unsqueeze(0), eye)
        rhs = (w[r1 : r1 + chunk] * m).unsqueeze(-1)
        solved = torch.linalg.solve_triangular(system, rhs, upper=False)
        errors[r1 : r1 + chunk] = solved.squeeze(-1)
    return errors


def damped_hessian(gram: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``X^T X`` in float32 with dead inputs made harmless and ``percdamp`` of the mean diagonal
    added; returns ``(H, dead)``, where ``dead`` marks inputs that never fired."""
    H = gram.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    H.diagonal().add_(percdamp * torch.mean(torch.diag(H)))
    return H, dead


def inverse_hessian_factor(
    gram: torch.Tensor, percdamp: float = 0.01, what: str = "layer"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of the damped inverse Hessian, and the dead-input mask.

    A Hessian that is not positive definite even after ``percdamp`` (collinear inputs, too few
    calibration tokens) is dampened ten times more, up to three times, with a warning; never
    a NaN. Raises ``FloatingPointError`` if that is still not enough.
    """
    damp = percdamp
    for attempt in range(4):
        H, dead = damped_hessian(gram, damp)
        factor, info = torch.linalg.cholesky_ex(H)
        if int(info) == 0:
            inverse, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(factor), upper=True)
            if int(info) == 0 and torch.isfinite(inverse).all():
                if attempt:
                    warnings.warn(
                        f"{what}: the calibration Hessian is singular with {percdamp:g} "
                        f"dampening; used {damp:g} instead (more calibration tokens avoid "
                        "this).",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                return inverse, dead
        damp = max(damp, 1e-4) * 10
    raise FloatingPointError(
        f"{what}: the calibration Hessian is not positive definite even with {damp / 10:g} "
        "dampening; check the calibration data for NaN/Inf or use more tokens."
    )


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    gram: torch.Tensor,
    sparsity: float | None,
    pattern: str | SparsityPattern = "unstructured",
    group: str = "row",
    blocksize: int = 128,
    percdamp: float = 0.01,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune and reconstruct one weight matrix.

    Args:
        weight: ``(out_features, in_features)``; not modified.
        gram: ``X^T X`` over the calibration tokens, ``(in_features, in_features)``. Its scale
            does not matter (dampening is relative to its mean diagonal).
        sparsity: fraction pruned for unstructured patterns.
        pattern: ``"unstructured"`` or ``"N:M"``.
        group: ``"row"`` or ``"layer"`` (unstructured only).
        blocksize: lazy-batch block size (128 in the paper).
        percdamp: dampening as a fraction of the mean Hessian diagonal (1% in the paper).
        keep: a fixed keep mask: skip SparseGPT's own mask selection and only apply its OBS
            weight update to this mask (``sparsity``, ``pattern`` and ``group`` are then
            ignored). This is ``reconstruct="obs"`` for every other method.

    Returns:
        ``(new_weight, keep_mask)``: the reconstructed weight in ``weight``'s dtype, with
        exact zeros where ``keep_mask`` is ``False``.
    """
    pat = parse_pattern(pattern)
    rows, cols = weight.shape
    W = weight.detach().float().clone()
    Hinv, dead = inverse_hessian_factor(gram.to(W.device), percdamp)
    W[:, dead] = 0
    fixed = None if keep is None else ~keep.to(W.device, torch.bool)

    prune_mask = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    by_row = group == "row"
    check_group(group)
    unit = 1 if by_row else rows
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2]
        Hinv1 = Hinv[i1:i2, i1:i2]
        saliency_scale = torch.diag(Hinv1).reshape(1, -1) ** 2
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        Err1 = torch.zeros_like(W1)
        if fixed is not None:
            mask1.copy_(fixed[:, i1:i2])
            steps = [(0, i2 - i1)]
        elif not pat.is_nm:
            # Cumulative quotas: the blocks' counts add up to exactly num_pruned(total, s).
            quota = num_pruned(i2 * unit, sparsity) - num_pruned(i1 * unit, sparsity)
            _prune_lowest(W1**2 / saliency_scale, quota, mask1, by_row)
            steps = [(0, i2 - i1)]
        else:
            # N:M masks are chosen group by group on the weights updated so far.
            steps = [(g, g + pat.m) for g in range(0, i2 - i1, pat.m)]
        for g1, g2 in steps:
            if pat.is_nm and fixed is None:
                sub = torch.zeros(rows, g2 - g1, dtype=torch.bool, device=W.device)
                tmp = W1[:, g1:g2] ** 2 / saliency_scale[:, g1:g2]
                _prune_lowest(tmp, pat.m - pat.n, sub, by_row=True)
                mask1[:, g1:g2] = sub
            err = _obs_errors(W1[:, g1:g2], Hinv1[g1:g2, g1:g2], mask1[:, g1:g2])
            W1[:, g1:] -= err.matmul(Hinv1[g1:g2, g1:])
            Err1[:, g1:g2] = err
        W1[mask1] = 0
        prune_mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    # Inputs that never fire were zeroed to make them the cheapest to prune; the ones that
    # stay unpruned get their weight back so that the mask alone says what is zero.
    keep_dead = ~prune_mask & dead.unsqueeze(0)
    W[keep_dead] = weight.float()[keep_dead]
    W[prune_mask] = 0
    return W.to(weight.dtype), ~prune_mask
