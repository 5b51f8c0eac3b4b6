"""2:4 semi-structured export: sparse tensor-core inference for 2:4-pruned linears.

A weight pruned with the ``"2:4"`` pattern keeps at most 2 of every 4 consecutive weights along
the input dimension. :func:`export_semi_structured` replaces such weights by PyTorch's
``SparseSemiStructuredTensor`` (half the values plus 2-bit indices), whose matmuls run on the
GPU's sparse tensor cores, and checks every converted layer (and optionally the whole model)
against the dense-with-zeros product.

Backends (``torch.sparse``):

- ``"cusparselt"``: NVIDIA cuSPARSELt; float16, bfloat16, int8 (float8 for ``_scaled_mm``
  only); the one that runs on Hopper (H100/H200) and newer;
- ``"cutlass"``: PyTorch's CUTLASS kernels; compute capability 8.x (Ampere/Ada) only;
  float16, bfloat16, int8 and, in recent PyTorch releases, float32;
- ``"cusparselt_cached"``: the same cuSPARSELt kernels through
  :class:`~optishear_lightning.kernels.cusparselt.CuSparseLtLinear`, which builds each matmul
  plan once instead of on every call (PyTorch's ``_cslt_sparse_mm`` rebuilds it, ~0.45 ms of
  host time per matmul on the H200); the linears are replaced by that module;
- ``"auto"``: ``"cusparselt_cached"`` when PyTorch has cuSPARSELt and its library loads,
  else ``"cusparselt"`` when PyTorch has it, else CUTLASS.

The dtype and minimum-shape tables of the PyTorch backends are read from the installed PyTorch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "SEMI_STRUCTURED_BACKENDS",
    "OutputCheck",
    "SemiStructuredExport",
    "check_2to4",
    "check_semi_structured_support",
    "compare_outputs",
    "export_semi_structured",
    "is_2to4",
    "resolve_backend",
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
        from .cusparselt import cusparselt_library_available

        # The cached plans are 4x PyTorch's cuSPARSELt path on the H200 (and faster than
        # dense, which PyTorch's path is not): see benchmarks/results/semi_structured_h200.md.
        return "cusparselt_cached" if cusparselt_library_available() else "cusparselt"
    return name


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
        return _check_cached_support(weight, name)
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
    major, minor = _sparse_tensor_core_gpu(weight, name)
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


def _sparse_tensor_core_gpu(weight: torch.Tensor, name: str) -> tuple[int, int]:
    """The compute capability of ``weight``'s GPU; raises on CPU or pre-Ampere GPUs."""
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


def _check_cached_support(weight: torch.Tensor, name: str) -> str:
    from .cusparselt import cusparselt_library_available

    if weight.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(
            f"{name} is {str(weight.dtype).replace('torch.', '')}; the cusparselt_cached backend "
            "takes float16 or bfloat16: cast the model (e.g. model.to(torch.bfloat16))."
        )
    if weight.dim() != 2:
        raise ValueError(f"{name} must be 2-D (out_features, in_features), got {weight.shape}.")
    rows, cols = weight.shape
    if rows % 16 or cols % 16 or min(rows, cols) < 32:
        raise ValueError(
            f"{name} is {rows}x{cols}; the cusparselt_cached backend needs both sizes multiples "
            "of 16 and at least 32. Leave this layer dense."
        )
    check_2to4(weight, name)
    _sparse_tensor_core_gpu(weight, name)
    if not cusparselt_library_available():
        raise RuntimeError(
            "The cuSPARSELt library (libcusparseLt.so.0) could not be loaded: use a CUDA build "
            "of PyTorch with cuSPARSELt, or backend='cusparselt'/'cutlass'."
        )
    return "cusparselt_cached"


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


@dataclass
class SemiStructuredExport:
    """What :func:`export_semi_structured` converted and how the checks went."""

    backend: str
    names: list[str] = field(default_factory=list)
    layer_checks: dict[str, OutputCheck] = field(default_factory=dict)
    model_check: OutputCheck | None = None


def _model_output(model: nn.Module, inputs):
    out = model(inputs) if not isinstance(inputs, dict) else model(**inputs)
    return getattr(out, "logits", out)


def _restore(
    model: nn.Module, linears: dict[str, nn.Linear], names: Iterable[str], backend: str
) -> None:
    for name in names:
        lin = linears[name]
        if backend == "cusparselt_cached":  # the linear was swapped out whole, unchanged
            _set_module(model, name, lin)
            continue
        # to_dense() is an exact matmul with the identity (one nonzero term per output).
        lin.weight = nn.Parameter(lin.weight.to_dense(), requires_grad=False)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _sparse_linear(lin: nn.Linear, backend: str):
    """The converted layer's forward: a semi-structured weight or a CuSparseLtLinear."""
    if backend == "cusparselt_cached":
        from .cusparselt import CuSparseLtLinear

        module = CuSparseLtLinear(lin)
        return module, module.forward
    sparse = _class_for(backend).from_dense(lin.weight.detach().contiguous())
    return sparse, lambda x: F.linear(x, sparse, lin.bias)


def _install(model: nn.Module, name: str, lin: nn.Linear, converted) -> None:
    if isinstance(converted, nn.Module):
        _set_module(model, name, converted)
    else:
        lin.weight = nn.Parameter(converted, requires_grad=False)


@torch.no_grad()
def export_semi_structured(
    model: nn.Module,
    backend: str = "auto",
    *,
    names: Iterable[str] | None = None,
    check_layers: bool = True,
    check_tokens: int = 128,
    example_inputs=None,
    model_rtol: float = 2.0**-4,
    rtol: float = BF16_RTOL,
) -> SemiStructuredExport:
    """Convert the 2:4-pruned linears of ``model`` to semi-structured sparse weights, in place.

    Every layer is validated before any is converted. Each converted layer is then checked
    against the dense-with-zeros product on random inputs (``check_layers``), and, given
    ``example_inputs``, the model's output (logits) is compared with its dense output. A
    failed check restores the dense weights and raises.

    Args:
        model: the pruned model, on a CUDA GPU, in a dtype of the backend (bfloat16, float16).
        backend: ``"auto"``, ``"cusparselt"``, ``"cutlass"`` or ``"cusparselt_cached"`` (the
            linears are replaced by :class:`~optishear_lightning.kernels.cusparselt.
            CuSparseLtLinear` modules; the original modules come back if a check fails).
        names: module names of the linears to convert (default: the prunable linears of every
            decoder block, as :func:`~optishear_lightning.models.named_prunable_linears`).
        check_layers: compare every converted layer's output on ``check_tokens`` random inputs.
        check_tokens: rows of the random layer inputs.
        example_inputs: model inputs (token ids, or a dict of keyword arguments) for an
            end-to-end comparison.
        model_rtol: norm-wise tolerance of the end-to-end comparison (errors of many bfloat16
            layers add up).
        rtol: norm-wise tolerance of each layer comparison.

    Returns:
        A :class:`SemiStructuredExport`.

    Raises:
        ValueError, TypeError, RuntimeError: see :func:`check_semi_structured_support`; also
            a layer or model output outside tolerance (after restoring the dense weights).
    """
    if names is None:
        from ..models import named_prunable_linears

        linears = named_prunable_linears(model)
    else:
        modules = dict(model.named_modules())
        linears = {}
        for name in names:
            module = modules.get(name)
            if not isinstance(module, nn.Linear):
                raise ValueError(f"{name!r} is not an nn.Linear of this model.")
            linears[name] = module
    if not linears:
        raise ValueError("No linear layers to convert.")
    resolved = resolve_backend(backend)
    for name, lin in linears.items():
        check_semi_structured_support(lin.weight, resolved, f"{name}.weight")
    result = SemiStructuredExport(backend=resolved)
    dense_out = _model_output(model, example_inputs) if example_inputs is not None else None
    generator = torch.Generator(device="cpu").manual_seed(0)
    try:
        for name, lin in linears.items():
            dense = lin.weight.detach()
            converted, sparse_forward = _sparse_linear(lin, resolved)
            if check_layers:
                x = torch.randn(check_tokens, lin.in_features, generator=generator)
                x = x.to(device=dense.device, dtype=dense.dtype)
                check = compare_outputs(F.linear(x, dense, lin.bias), sparse_forward(x), rtol)
                result.layer_checks[name] = check
                if not check.ok:
                    raise ValueError(f"{name}: semi-structured output differs from dense: {check}.")
            _install(model, name, lin, converted)
            result.names.append(name)
        if dense_out is not None:
            result.model_check = compare_outputs(
                dense_out, _model_output(model, example_inputs), model_rtol
            )
            if not result.model_check.ok:
                raise ValueError(
                    f"Model output with semi-structured weights differs from the dense "
                    f"model's: {result.model_check}."
                )
    except BaseException:
        _restore(model, linears, result.names, resolved)
        raise
    return result
