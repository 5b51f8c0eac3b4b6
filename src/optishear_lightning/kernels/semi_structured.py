"""2:4 semi-structured sparse weights: backend choice, checks, conversion of one tensor.

A weight pruned with the ``"2:4"`` pattern keeps at most 2 of every 4 consecutive weights along
the input dimension. :func:`to_semi_structured` turns such a weight into PyTorch's
``SparseSemiStructuredTensor`` (half the values plus 2-bit indices), whose matmuls run on the
GPU's sparse tensor cores; :func:`check_semi_structured_support` says first, clearly, why a
weight cannot be converted. Converting a whole model (and checking it against the dense one)
is the engine's :func:`optishear_lightning.export.export_semi_structured`.

Backends (``torch.sparse``):

- ``"cusparselt"``: NVIDIA cuSPARSELt; float16, bfloat16, int8 (float8 for ``_scaled_mm``
  only); the one that runs on Hopper (H100/H200) and newer;
- ``"cutlass"``: PyTorch's CUTLASS kernels; compute capability 8.x (Ampere/Ada) only;
  float16, bfloat16, int8 and, in recent PyTorch releases, float32;
- ``"cusparselt_cached"``: the same cuSPARSELt kernels through
  :class:`~optishear_lightning.kernels.cusparselt.CuSparseLtLinear`, which builds each matmul
  plan once instead of on every call (PyTorch's ``_cslt_sparse_mm`` rebuilds it, ~0.45 ms of
  host time per matmul on the H200);
- ``"auto"``: ``"cusparselt_cached"`` when PyTorch has cuSPARSELt and its library loads,
  else ``"cusparselt"`` when PyTorch has it, else CUTLASS.

The dtype and minimum-shape tables of the PyTorch backends are read from the installed PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ._deprecated import MOVED_FROM_SEMI_STRUCTURED, moved_attribute
from .cusparselt import check_cusparselt_support, cusparselt_library_available
from .two_four import check_2to4, is_2to4, sparse_tensor_core_capability

__all__ = [
    "BF16_RTOL",
    "SEMI_STRUCTURED_BACKENDS",
    "OutputCheck",
    "check_2to4",
    "check_semi_structured_support",
    "compare_outputs",
    "is_2to4",
    "resolve_backend",
    "to_semi_structured",
]

SEMI_STRUCTURED_BACKENDS = ("auto", "cusparselt", "cutlass", "cusparselt_cached")

#: Norm-wise tolerance of one bfloat16 matmul against another: a few units in the last place
#: of bfloat16 (8 significant bits) relative to the largest output.
BF16_RTOL = 2.0**-6


def _class_for(backend: str):
    import torch.sparse as ts

    name = {
        "cutlass": "SparseSemiStructuredTensorCUTLASS",
        "cusparselt": "SparseSemiStructuredTensorCUSPARSELT",
    }[backend]
    cls = getattr(ts, name, None)
    if cls is None:
        raise RuntimeError(
            f"This PyTorch ({torch.__version__}) has no torch.sparse.{name}: semi-structured "
            "sparsity needs PyTorch 2.1 or newer."
        )
    return cls


def _cusparselt_available() -> bool:
    backend = getattr(torch.backends, "cusparselt", None)
    return bool(backend is not None and backend.is_available())


def resolve_backend(backend: str = "auto") -> str:
    """The backend a name stands for (``"auto"``: cached cuSPARSELt plans, else CUTLASS).

    Raises:
        ValueError: an unknown name.
    """
    name = str(backend).strip().lower()
    if name not in SEMI_STRUCTURED_BACKENDS:
        raise ValueError(
            f"Unknown semi-structured backend {backend!r}: use one of "
            f"{', '.join(SEMI_STRUCTURED_BACKENDS)}."
        )
    if name == "auto":
        if not _cusparselt_available():
            return "cutlass"
        # The cached plans are 4x PyTorch's cuSPARSELt path on the H200 (and faster than
        # dense, which PyTorch's path is not): see benchmarks/results/semi_structured_h200.md.
        return "cusparselt_cached" if cusparselt_library_available() else "cusparselt"
    return name


def check_semi_structured_support(
    weight: torch.Tensor, backend: str = "auto", name: str = "weight"
) -> str:
    """Raise a clear error unless ``weight`` can become a semi-structured sparse tensor.

    Checks, in order: backend name, dtype, shape (the backend's minimum sizes and multiples),
    2:4 sparsity, then the environment (a CUDA tensor, compute capability, backend present).

    Returns:
        The resolved backend name.

    Raises:
        ValueError: unknown backend, unsupported shape, weight not 2:4, CPU tensor.
        TypeError: a dtype the backend lacks.
        RuntimeError: GPU or PyTorch build without the backend.
    """
    resolved = resolve_backend(backend)
    if resolved == "cusparselt_cached":
        check_cusparselt_support(weight, name)
        return resolved
    cls = _class_for(resolved)
    constraints = getattr(cls, "_DTYPE_SHAPE_CONSTRAINTS", None) or {}
    if weight.dtype not in constraints:
        supported = ", ".join(str(d).replace("torch.", "") for d in constraints) or "none"
        raise TypeError(
            f"{name} is {str(weight.dtype).replace('torch.', '')}, which the {resolved} "
            f"semi-structured backend does not support (it takes: {supported}). Cast the model "
            "(e.g. model.to(torch.bfloat16)) or choose another backend."
        )
    if weight.dim() != 2:
        raise ValueError(f"{name} must be 2-D (out_features, in_features), got {weight.shape}.")
    rows, cols = weight.shape
    limits = constraints[weight.dtype]
    min_rows, min_cols = limits.sparse_min_rows, limits.sparse_min_cols
    if rows < min_rows or rows % min_rows or cols < min_cols or cols % min_cols:
        raise ValueError(
            f"{name} is {rows}x{cols}; the {resolved} backend needs out_features a multiple of "
            f"{min_rows} and in_features a multiple of {min_cols} (both at least that) for "
            f"{str(weight.dtype).replace('torch.', '')}. Leave this layer dense."
        )
    check_2to4(weight, name)
    major, minor = sparse_tensor_core_capability(weight, name)
    if resolved == "cutlass" and major != 8:
        raise RuntimeError(
            f"PyTorch's CUTLASS semi-structured kernels run on compute capability 8.x only; "
            f"this GPU is {major}.{minor}: use backend='cusparselt'."
        )
    if resolved == "cusparselt" and not _cusparselt_available():
        raise RuntimeError(
            "This PyTorch build has no cuSPARSELt (torch.backends.cusparselt.is_available() is "
            "False): use backend='cutlass' on an Ampere/Ada GPU, or a CUDA build with cuSPARSELt."
        )
    return resolved


@dataclass
class OutputCheck:
    """Norm-wise comparison of a candidate output with a reference output.

    ``ok`` when ``max|candidate - reference| <= atol + rtol * max|reference|``.
    """

    max_abs_err: float
    ref_max_abs: float
    rtol: float
    atol: float

    @property
    def rel_err(self) -> float:
        """``max|diff| / max|reference|`` (0 when the reference is all zeros)."""
        return self.max_abs_err / self.ref_max_abs if self.ref_max_abs else 0.0

    @property
    def ok(self) -> bool:
        return self.max_abs_err <= self.atol + self.rtol * self.ref_max_abs

    def __str__(self) -> str:
        return (
            f"max|diff| {self.max_abs_err:.3g} vs max|ref| {self.ref_max_abs:.3g} "
            f"(rel {self.rel_err:.3g}, tolerance rtol {self.rtol:.3g} atol {self.atol:.3g})"
        )


def compare_outputs(
    reference: torch.Tensor, candidate: torch.Tensor, rtol: float = BF16_RTOL, atol: float = 0.0
) -> OutputCheck:
    """Compare two outputs norm-wise (see :class:`OutputCheck`); computed in float32."""
    if reference.shape != candidate.shape:
        raise ValueError(f"Output shapes differ: {reference.shape} vs {candidate.shape}.")
    ref = reference.detach().float()
    diff = (candidate.detach().float() - ref).abs()
    return OutputCheck(
        max_abs_err=float(diff.max()) if diff.numel() else 0.0,
        ref_max_abs=float(ref.abs().max()) if ref.numel() else 0.0,
        rtol=rtol,
        atol=atol,
    )


def to_semi_structured(weight: torch.Tensor, backend: str) -> torch.Tensor:
    """``weight`` as PyTorch's semi-structured sparse tensor of ``backend``.

    Args:
        weight: a 2:4-sparse weight that :func:`check_semi_structured_support` accepts.
        backend: ``"cusparselt"`` or ``"cutlass"`` (``"auto"`` is resolved first; the cached
            cuSPARSELt backend is a module, :class:`~optishear_lightning.kernels.cusparselt.
            CuSparseLtLinear`, not a tensor).

    Raises:
        ValueError: ``backend`` resolves to ``"cusparselt_cached"`` or is unknown.
        RuntimeError: a PyTorch without semi-structured sparsity.
    """
    resolved = resolve_backend(backend)
    if resolved == "cusparselt_cached":
        raise ValueError("The cusparselt_cached backend converts linears (CuSparseLtLinear).")
    return _class_for(resolved).from_dense(weight.detach().contiguous())


def __getattr__(name: str) -> Any:
    # The model-level export used to live here: its names resolve for one more release.
    return moved_attribute(__name__, name, MOVED_FROM_SEMI_STRUCTURED)
