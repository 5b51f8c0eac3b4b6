"""2:4 sparsity checks shared by the semi-structured backends (PyTorch's and cuSPARSELt).

A weight is 2:4 sparse when every run of 4 consecutive weights along the input dimension has
at most 2 nonzeros; sparse tensor cores (compute capability 8.0+) multiply such weights at
half the cost.
"""

from __future__ import annotations

import torch

__all__ = ["check_2to4", "is_2to4", "sparse_tensor_core_capability"]


def is_2to4(weight: torch.Tensor) -> bool:
    """Whether every run of 4 consecutive weights along the input dimension has <= 2 nonzeros."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    nonzero = (weight.detach().reshape(weight.shape[0], -1, 4) != 0).sum(-1)
    return bool((nonzero <= 2).all())


def check_2to4(weight: torch.Tensor, name: str = "weight") -> None:
    """Raise ``ValueError`` unless ``weight`` is 2:4 sparse (see :func:`is_2to4`)."""
    if weight.dim() != 2:
        raise ValueError(f"{name} must be 2-D (out_features, in_features), got {weight.shape}.")
    rows, cols = weight.shape
    if cols % 4:
        raise ValueError(f"{name} has {cols} input features: 2:4 sparsity needs a multiple of 4.")
    nonzero = (weight.detach().reshape(rows, -1, 4) != 0).sum(-1)
    bad = nonzero > 2
    if bool(bad.any()):
        row, group = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name} is not 2:4 sparse: {int(bad.sum())} of {bad.numel()} groups of 4 keep more "
            f"than 2 weights (first: row {row}, columns {4 * group}-{4 * group + 3}). Prune it "
            "with pattern='2:4' first."
        )


def sparse_tensor_core_capability(weight: torch.Tensor, name: str = "weight") -> tuple[int, int]:
    """The compute capability of ``weight``'s GPU.

    Raises:
        ValueError: ``weight`` is not on a CUDA GPU.
        RuntimeError: the GPU has no sparse tensor cores (compute capability below 8.0).
    """
    if weight.device.type != "cuda":
        raise ValueError(
            f"{name} is on {weight.device}: semi-structured sparse matmuls run on CUDA GPUs "
            "only. Move the model to the GPU first (model.cuda())."
        )
    major, minor = torch.cuda.get_device_capability(weight.device)
    if major < 8:
        raise RuntimeError(
            f"Semi-structured sparsity needs sparse tensor cores (compute capability 8.0+), "
            f"this GPU is {major}.{minor}."
        )
    return major, minor
