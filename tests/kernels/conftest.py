"""Kernel tests: on the GPU when there is one, else in Triton's CPU interpreter.

``TRITON_INTERPRET=1`` has to be in the environment before the kernels are decorated, i.e.
before ``optishear_lightning.kernels.triton_kernels`` is first imported. The top-level
``tests/conftest.py`` sets it, since test modules outside this folder may import the kernels
during collection; it is repeated here for runs of this folder alone from another rootdir.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from optishear_lightning.calibration import LayerStats
from optishear_lightning.dispatch import fused_score, reference_keep_mask, triton_prune
from optishear_lightning.kernels import set_kernel_backend, triton_available

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

requires_triton = pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _default_backend():
    """Every test starts and ends with the backend setting unset (env var / auto)."""
    set_kernel_backend(None)
    yield
    set_kernel_backend(None)


def random_stats(cols: int, seed: int = 0, ties: bool = False) -> LayerStats:
    """Calibration statistics of ``cols`` input channels (few distinct values with ``ties``)."""
    gen = torch.Generator().manual_seed(seed)
    if ties:
        sq_sum = torch.tensor([1.0, 4.0, 9.0])[torch.randint(0, 3, (cols,), generator=gen)]
    else:
        sq_sum = torch.rand(cols, generator=gen) * 5 + 0.01
    return LayerStats(sq_sum.to(DEVICE), n_tokens=7)


def random_weight(rows: int, cols: int, dtype=torch.float32, seed: int = 0, levels: int = 0):
    """Gaussian weights, or (``levels`` > 0) weights quantized to a few levels (many ties)."""
    gen = torch.Generator().manual_seed(seed)
    if levels:
        w = torch.randint(-levels, levels + 1, (rows, cols), generator=gen) * 0.125
    else:
        w = torch.randn(rows, cols, generator=gen)
    return w.to(dtype).to(DEVICE)


def check_kernel(method, w, stats, sparsity, pattern="unstructured", **knobs):
    """Kernel mask == reference mask, and the in-place weights == the reference's pruning."""
    ref = reference_keep_mask(method, w, stats, sparsity, pattern)
    spec = fused_score(method, w, stats)
    score = spec if spec is not None else method.score(w.float(), stats)
    keep = triton_prune(w, score, sparsity, pattern, inplace=False, **knobs)
    assert torch.equal(keep, ref), f"{(~keep ^ ~ref).sum()} of {ref.numel()} entries differ"
    pruned = w.clone()
    keep2 = triton_prune(pruned, score, sparsity, pattern, **knobs)
    assert torch.equal(keep2, ref)
    assert torch.equal(pruned, w.masked_fill(~ref, 0))
    return ref


#: (cols, dtype, method, quantization levels) of the row-selection cases: row lengths that are
#: not powers of two, every kernel dtype, tie-heavy quantized weights.
ROW_CASES = [
    (96, torch.float32, "wanda", 0),
    (100, torch.bfloat16, "magnitude", 2),
    (576, torch.float16, "wanda", 0),
    (576, torch.bfloat16, "ria", 2),
    (1536, torch.bfloat16, "wanda", 0),
    (1536, torch.float32, "magnitude", 1),
]
