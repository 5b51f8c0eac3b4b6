"""GPU kernels: fused pruning (Triton) and 2:4 semi-structured export.

- :mod:`.fused`: score + select + mask in one Triton kernel launch per matrix, masks
  identical to the PyTorch engine's (tie-break included); the engine calls them on CUDA.
- :mod:`.backend`: which implementation runs (``OPTISHEAR_KERNELS=auto|triton|torch``,
  :func:`set_kernel_backend`, :func:`kernel_backend`).
- :mod:`.semi_structured`: convert 2:4-pruned linears to PyTorch's semi-structured sparse
  format for faster inference, and check the outputs against the dense model.
- :mod:`.cusparselt`: :class:`CuSparseLtLinear`, a 2:4 linear on cuSPARSELt that builds its
  matmul plans once (the ``"cusparselt_cached"`` export backend).

Importing this package does not import Triton: the kernels are loaded on first use.
"""

from .backend import (
    ENV_VAR,
    KernelBackend,
    get_kernel_backend,
    kernel_backend,
    kernels_for,
    set_kernel_backend,
    triton_available,
)
from .cusparselt import CuSparseLtError, CuSparseLtLinear, cusparselt_library_available
from .fused import (
    FUSABLE_TRANSFORMS,
    KERNEL_DTYPES,
    FusedScore,
    deferred_nan_checks,
    dispatch_keep_mask,
    fused_keep_mask,
    fused_score,
    keep_mask,
    reference_keep_mask,
    triton_prune,
    try_fused_prune_,
    try_select_prune_,
)
from .semi_structured import (
    SEMI_STRUCTURED_BACKENDS,
    OutputCheck,
    SemiStructuredExport,
    check_2to4,
    check_semi_structured_support,
    compare_outputs,
    export_semi_structured,
    is_2to4,
    resolve_backend,
)

__all__ = [
    "ENV_VAR",
    "FUSABLE_TRANSFORMS",
    "KERNEL_DTYPES",
    "SEMI_STRUCTURED_BACKENDS",
    "CuSparseLtError",
    "CuSparseLtLinear",
    "FusedScore",
    "KernelBackend",
    "OutputCheck",
    "SemiStructuredExport",
    "check_2to4",
    "check_semi_structured_support",
    "compare_outputs",
    "cusparselt_library_available",
    "deferred_nan_checks",
    "dispatch_keep_mask",
    "export_semi_structured",
    "fused_keep_mask",
    "fused_score",
    "get_kernel_backend",
    "is_2to4",
    "keep_mask",
    "kernel_backend",
    "kernels_for",
    "reference_keep_mask",
    "resolve_backend",
    "set_kernel_backend",
    "triton_available",
    "triton_prune",
    "try_fused_prune_",
    "try_select_prune_",
]
