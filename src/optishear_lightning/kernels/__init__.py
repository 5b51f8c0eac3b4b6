"""GPU kernels: the leaves of the package (they import only PyTorch, Triton and each other).

- :mod:`.fused`: score + select + mask in one Triton kernel launch per matrix
  (:func:`launch_prune`, taking plain tensors and numbers), masks identical to the PyTorch
  engine's (tie-break included). Which pruning runs on them is the engine's dispatch,
  :mod:`optishear_lightning.dispatch`.
- :mod:`.backend`: which implementation runs (``OPTISHEAR_KERNELS=auto|triton|torch``,
  :func:`set_kernel_backend`, :func:`kernel_backend`).
- :mod:`.semi_structured`: 2:4 semi-structured sparse tensors (backends, checks, conversion of
  one weight); converting a whole model is :mod:`optishear_lightning.export`.
- :mod:`.cusparselt`: :class:`CuSparseLtLinear`, a 2:4 linear on cuSPARSELt that builds its
  matmul plans once (the ``"cusparselt_cached"`` export backend).
- :mod:`.two_four`: the 2:4 checks both share.

Importing this package does not import Triton: the kernels are loaded on first use. The names
that moved to :mod:`optishear_lightning.dispatch` and :mod:`optishear_lightning.export`
(``triton_prune``, ``fused_score``, ``export_semi_structured``, ...) still resolve here for one
release, with a ``DeprecationWarning``.
"""

from typing import Any

from ._deprecated import MOVED_FROM_PACKAGE, moved_attribute
from .backend import (
    ENV_VAR,
    KernelBackend,
    get_kernel_backend,
    kernel_backend,
    kernels_for,
    set_kernel_backend,
    triton_available,
)
from .cusparselt import (
    CuSparseLtError,
    CuSparseLtLinear,
    check_cusparselt_support,
    cusparselt_library_available,
)
from .fused import (
    FUSABLE_TRANSFORMS,
    KERNEL_DTYPES,
    FusedScore,
    check_operands,
    launch_prune,
)
from .semi_structured import (
    SEMI_STRUCTURED_BACKENDS,
    OutputCheck,
    check_semi_structured_support,
    compare_outputs,
    resolve_backend,
    to_semi_structured,
)
from .two_four import check_2to4, is_2to4, sparse_tensor_core_capability

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
    "check_2to4",
    "check_cusparselt_support",
    "check_operands",
    "check_semi_structured_support",
    "compare_outputs",
    "cusparselt_library_available",
    "get_kernel_backend",
    "is_2to4",
    "kernel_backend",
    "kernels_for",
    "launch_prune",
    "resolve_backend",
    "set_kernel_backend",
    "sparse_tensor_core_capability",
    "to_semi_structured",
    "triton_available",
]


def __getattr__(name: str) -> Any:
    # Names that moved to the engine (dispatch, export) resolve for one more release.
    return moved_attribute(__name__, name, MOVED_FROM_PACKAGE)
