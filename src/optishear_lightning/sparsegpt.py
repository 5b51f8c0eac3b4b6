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

import torch

from .masks import SparsityPattern, num_pruned, parse_pattern

__all__ = ["sparsegpt_prune"]


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


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    gram: torch.Tensor,
    sparsity: float | None,
    pattern: str | SparsityPattern = "unstructured",
    group: str = "row",
    blocksize: int = 128,
    percdamp: float = 0.01,
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

    Returns:
        ``(new_weight, keep_mask)``: the reconstructed weight in ``weight``'s dtype, with
        exact zeros where ``keep_mask`` is ``False``.
    """
    pat = parse_pattern(pattern)
    rows, cols = weight.shape
    W = weight.detach().float().clone()
    H = gram.detach().float().to(W.device).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    H.diagonal().add_(damp)
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)

    prune_mask = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    by_row = group == "row"
    if group not in ("row", "layer"):
        raise ValueError(f"Unknown comparison group {group!r}: use 'row' or 'layer'.")
    unit = 1 if by_row else rows
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if not pat.is_nm:
            # Cumulative quotas: the blocks' counts add up to exactly num_pruned(total, s).
            quota = num_pruned(i2 * unit, sparsity) - num_pruned(i1 * unit, sparsity)
            tmp = W1**2 / (torch.diag(Hinv1).reshape(1, -1)) ** 2
            _prune_lowest(tmp, quota, mask1, by_row)
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if pat.is_nm and i % pat.m == 0:
                diag = torch.diag(Hinv1)[i : i + pat.m].reshape(1, -1)
                tmp = W1[:, i : i + pat.m] ** 2 / diag**2
                sub = torch.zeros_like(tmp, dtype=torch.bool)
                _prune_lowest(tmp, pat.m - pat.n, sub, by_row=True)
                mask1[:, i : i + pat.m] = sub
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        prune_mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    # Inputs that never fire were zeroed to make them the cheapest to prune; the ones that
    # stay unpruned get their weight back so that the mask alone says what is zero.
    keep_dead = ~prune_mask & dead.unsqueeze(0)
    W[keep_dead] = weight.float()[keep_dead]
    W[prune_mask] = 0
    return W.to(weight.dtype), ~prune_mask
