"""The vectorised SparseGPT equals the reference's column-by-column loop."""

import pytest
import torch

from optishear_lightning.masks import num_pruned, parse_pattern
from optishear_lightning.sparsegpt import sparsegpt_prune


def reference_sparsegpt(W, H, sparsity, pattern, blocksize=128, percdamp=0.01):
    """IST-DASLab/sparsegpt's fasterprune loop, with the per-row quota selection of ours."""
    pat = parse_pattern(pattern)
    W = W.clone().float()
    cols = W.shape[1]
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    mask = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if not pat.is_nm:
            tmp = W1**2 / torch.diag(Hinv1).reshape(1, -1) ** 2
            k = num_pruned(i2, sparsity) - num_pruned(i1, sparsity)
            order = torch.sort(tmp, dim=1, stable=True).indices
            mask1.scatter_(1, order[:, :k], True)
        for i in range(i2 - i1):
            w = W1[:, i]
            d = Hinv1[i, i]
            if pat.is_nm and i % pat.m == 0:
                tmp = W1[:, i : i + pat.m] ** 2 / torch.diag(Hinv1)[i : i + pat.m] ** 2
                order = torch.sort(tmp, dim=1, stable=True).indices
                mask1.scatter_(1, i + order[:, : pat.m - pat.n], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W, ~mask


@pytest.mark.parametrize(
    "pattern,sparsity,cols",
    [("unstructured", 0.5, 200), ("unstructured", 0.3, 96), ("2:4", None, 136)],
)
def test_matches_reference_loop(pattern, sparsity, cols):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, cols // 4, generator=g) @ torch.randn(cols // 4, cols, generator=g)
    x = x + 0.1 * torch.randn(400, cols, generator=g)
    W = torch.randn(24, cols, generator=g)
    H = x.t() @ x
    ours, keep = sparsegpt_prune(W, H, sparsity, pattern, blocksize=64)
    ref, ref_keep = reference_sparsegpt(W, H, sparsity, pattern, blocksize=64)
    assert torch.equal(keep, ref_keep)
    torch.testing.assert_close(ours, ref, rtol=1e-3, atol=1e-4)
    assert (ours[~keep] == 0).all()


def test_dead_inputs_keep_their_weights():
    W = torch.randn(4, 8)
    x = torch.randn(50, 8)
    x[:, 3] = 0  # channel 3 never fires
    new, keep = sparsegpt_prune(W, x.t() @ x, 0.25, "unstructured")
    assert ((~keep).sum(1) == 2).all()
    assert torch.equal(new[keep[:, 3], 3], W[keep[:, 3], 3])
