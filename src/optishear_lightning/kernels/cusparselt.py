"""2:4 sparse linears on cuSPARSELt with the matmul plan built once per input shape.

``torch._cslt_sparse_mm`` (behind ``SparseSemiStructuredTensorCUSPARSELT``) builds and destroys
a cuSPARSELt matmul plan on every call. On the H200 that costs ~0.45 ms of host time per
matmul (``benchmarks/results/probe_cusparselt_h200.json``), more than a whole 2:4 GEMM of a
LLaMA-3-8B projection at 2,048 tokens, so the sparse model was slower than the dense one.
:class:`CuSparseLtLinear` calls the cuSPARSELt C API through ``ctypes`` instead: the weight
is compressed once, and the descriptors, plan, chosen algorithm and workspace of each token
count are kept, so a forward pass is one ``cusparseLtMatmul`` call.

Layout: ``y = x W^T + b`` is computed as ``D = A @ op(B)`` with ``A = W`` (structured,
``out x in``, row-major), ``B = x`` (``tokens x in``, row-major, transposed by the op) and
``D`` (``out x tokens``, column-major), which is ``y`` (``tokens x out``) row-major in memory:
no copies.

The library is the one PyTorch loads (``libcusparseLt.so.0``, from the ``nvidia-cusparselt``
wheel); enum values are read from its header when the wheel ships one, else taken from the
cuSPARSELt 0.6+ API.
"""

from __future__ import annotations

import ctypes
import glob
import os
import re
import threading
from dataclasses import dataclass

import torch
from torch import nn

from .two_four import check_2to4, sparse_tensor_core_capability

__all__ = [
    "CuSparseLtError",
    "CuSparseLtLinear",
    "check_cusparselt_support",
    "cusparselt_library_available",
]

# Opaque cuSPARSELt structs are 512 to 11,024 bytes depending on the version; they are only
# passed by pointer, so a generous buffer fits every version.
_OPAQUE_BYTES = 16384

# cudaDataType values (library_types.h, stable across CUDA versions).
_CUDA_DTYPES = {torch.float16: 2, torch.bfloat16: 14}
# cusparseOrder_t and cusparseOperation_t (cusparse.h, which cuSPARSELt includes).
_ORDER_COL, _ORDER_ROW = 1, 2
_OP_N, _OP_T = 0, 1
_SPARSITY_50 = 0
_ALG_DEFAULT = 0
# cusparseComputeType of cuSPARSELt >= 0.6 (0.4/0.5 had 16F = 0 and no 32F); overridden by
# the installed header when there is one (see _compute_32f).
_COMPUTE_32F_06 = 2


class CuSparseLtError(RuntimeError):
    """A cuSPARSELt call failed (the message names the call and the status)."""


_STATUS = {
    1: "NOT_INITIALIZED",
    2: "ALLOC_FAILED",
    3: "INVALID_VALUE",
    4: "ARCH_MISMATCH",
    7: "INTERNAL_ERROR",
    10: "NOT_SUPPORTED",
    11: "INSUFFICIENT_RESOURCES",
}


def _candidate_paths() -> list[str]:
    paths = ["libcusparseLt.so.0", "libcusparseLt.so"]
    try:  # the nvidia-cusparselt wheel that PyTorch depends on
        import nvidia.cusparselt as pkg  # type: ignore[import-not-found]

        for root in list(getattr(pkg, "__path__", [])):
            paths += sorted(glob.glob(os.path.join(root, "lib", "libcusparseLt.so*")))
    except ImportError:
        pass
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    paths += sorted(glob.glob(os.path.join(torch_lib, "libcusparseLt.so*")))
    return paths


def _header_paths() -> list[str]:
    try:
        import nvidia.cusparselt as pkg  # type: ignore[import-not-found]

        roots = list(getattr(pkg, "__path__", []))
    except ImportError:
        roots = []
    return [os.path.join(r, "include", "cusparseLt.h") for r in roots] + [
        "/usr/local/cuda/include/cusparseLt.h",
        "/usr/include/cusparseLt.h",
    ]


def _compute_32f() -> int:
    """``CUSPARSE_COMPUTE_32F`` as the installed header defines it (else the 0.6+ value)."""
    for path in _header_paths():
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
        match = re.search(r"typedef\s+enum\s*\{([^}]*)\}\s*cusparseComputeType\s*;", text)
        if not match:
            continue
        value = -1
        for entry in match.group(1).split(","):
            entry = re.sub(r"//.*|/\*.*?\*/", "", entry).strip()
            if not entry:
                continue
            name, _, explicit = entry.partition("=")
            value = int(explicit.strip(), 0) if explicit.strip() else value + 1
            if name.strip() == "CUSPARSE_COMPUTE_32F":
                return value
    return _COMPUTE_32F_06


class _Library:
    """The loaded library, its function signatures and one process-wide handle."""

    def __init__(self) -> None:
        errors = []
        self.lib = None
        for path in _candidate_paths():
            try:
                self.lib = ctypes.CDLL(path)
                self.path = path
                break
            except OSError as error:
                errors.append(f"{path}: {error}")
        if self.lib is None:
            raise CuSparseLtError(
                "cuSPARSELt (libcusparseLt.so.0) was not found; it comes with CUDA builds of "
                "PyTorch (the nvidia-cusparselt wheel). Tried: " + "; ".join(errors[:4])
            )
        vp, i64, u32, i32, c_int = (
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_uint32,
            ctypes.c_int32,
            ctypes.c_int,
        )
        signatures = {
            "cusparseLtInit": [vp],
            "cusparseLtDenseDescriptorInit": [vp, vp, i64, i64, i64, u32, c_int, c_int],
            "cusparseLtStructuredDescriptorInit": [vp, vp, i64, i64, i64, u32, c_int, c_int, c_int],
            "cusparseLtMatDescriptorDestroy": [vp],
            "cusparseLtMatmulDescriptorInit": [vp, vp, c_int, c_int, vp, vp, vp, vp, c_int],
            "cusparseLtMatmulAlgSelectionInit": [vp, vp, vp, c_int],
            "cusparseLtMatmulPlanInit": [vp, vp, vp, vp],
            "cusparseLtMatmulPlanDestroy": [vp],
            "cusparseLtMatmulGetWorkspace": [vp, vp, vp],
            "cusparseLtMatmul": [vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, i32],
            "cusparseLtMatmulSearch": [vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, i32],
            "cusparseLtSpMMACompressedSize2": [vp, vp, vp, vp],
            "cusparseLtSpMMACompress2": [vp, vp, c_int, c_int, vp, vp, vp, vp],
        }
        for name, argtypes in signatures.items():
            fn = getattr(self.lib, name)
            fn.argtypes = argtypes
            fn.restype = c_int
        destroy = getattr(self.lib, "cusparseLtMatmulAlgSelectionDestroy", None)
        if destroy is not None:  # 0.6+
            destroy.argtypes, destroy.restype = [vp], c_int
        self.alg_destroy = destroy
        self.compute_32f = _compute_32f()
        self.handle = ctypes.create_string_buffer(_OPAQUE_BYTES)
        self.call("cusparseLtInit", ctypes.byref(self.handle))

    def call(self, name: str, *args) -> None:
        status = getattr(self.lib, name)(*args)
        if status != 0:
            raise CuSparseLtError(
                f"{name} failed with status {status} ({_STATUS.get(status, 'see cusparse.h')})."
            )


_LIBRARY: _Library | None = None
_LOCK = threading.Lock()


def _library() -> _Library:
    global _LIBRARY
    with _LOCK:
        if _LIBRARY is None:
            _LIBRARY = _Library()
        return _LIBRARY


def cusparselt_library_available() -> bool:
    """Whether the cuSPARSELt library can be loaded and initialised (needs a CUDA GPU)."""
    if not torch.cuda.is_available():
        return False
    try:
        _library()
    except (CuSparseLtError, OSError, AttributeError):
        return False
    return True


def check_cusparselt_support(weight: torch.Tensor, name: str = "weight") -> None:
    """Raise a clear error unless :class:`CuSparseLtLinear` can take ``weight``.

    Checks, in order: dtype, sizes, 2:4 sparsity, the GPU, the library.

    Raises:
        TypeError: not float16 or bfloat16.
        ValueError: sizes not multiples of 16 (or below 32), not 2:4 sparse, not on a GPU.
        RuntimeError: a GPU without sparse tensor cores, or no loadable cuSPARSELt.
    """
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
    sparse_tensor_core_capability(weight, name)
    if not cusparselt_library_available():
        raise RuntimeError(
            "The cuSPARSELt library (libcusparseLt.so.0) could not be loaded: use a CUDA build "
            "of PyTorch with cuSPARSELt, or backend='cusparselt'/'cutlass'."
        )


def _opaque() -> ctypes.Array:
    return ctypes.create_string_buffer(_OPAQUE_BYTES)


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


@dataclass
class _Plan:
    """Descriptors, plan and workspace of one (weight, token count) matmul."""

    a: ctypes.Array
    b: ctypes.Array
    d: ctypes.Array
    matmul: ctypes.Array
    alg: ctypes.Array
    plan: ctypes.Array
    workspace: torch.Tensor
    searched: bool = False

    def destroy(self, lib: _Library) -> None:
        lib.lib.cusparseLtMatmulPlanDestroy(ctypes.byref(self.plan))
        if lib.alg_destroy is not None:
            lib.alg_destroy(ctypes.byref(self.alg))
        for desc in (self.b, self.d):  # a is the weight's, destroyed with the module
            lib.lib.cusparseLtMatDescriptorDestroy(ctypes.byref(desc))


def _structured_descriptor(lib: _Library, rows: int, cols: int, dtype: torch.dtype):
    desc = _opaque()
    lib.call(
        "cusparseLtStructuredDescriptorInit",
        ctypes.byref(lib.handle), ctypes.byref(desc), rows, cols, cols, 16,
        _CUDA_DTYPES[dtype], _ORDER_ROW, _SPARSITY_50,
    )  # fmt: skip
    return desc


def _workspace(lib: _Library, plan: ctypes.Array, device: torch.device) -> torch.Tensor:
    size = ctypes.c_size_t(0)
    lib.call(
        "cusparseLtMatmulGetWorkspace",
        ctypes.byref(lib.handle),
        ctypes.byref(plan),
        ctypes.byref(size),
    )
    return torch.empty(max(int(size.value), 1), dtype=torch.uint8, device=device)


class CuSparseLtLinear(nn.Module):
    """A 2:4-sparse ``nn.Linear`` on cuSPARSELt, with plans reused across forward passes.

    The weight is compressed once (half the values plus metadata); every distinct number of
    input rows gets its own plan, built (and, with ``search=True``, tuned by
    ``cusparseLtMatmulSearch``) on first use and kept. Inference only: no gradient flows
    through it, and its ``state_dict`` holds no weight (save the model before exporting).

    Args:
        linear: the 2:4-pruned linear (CUDA, float16 or bfloat16, ``in_features`` and
            ``out_features`` multiples of 16); its weight is checked and left unchanged.
        search: tune the algorithm of each new plan on its first call (a few matmuls, once).

    Example:
        >>> lin = nn.Linear(4096, 4096, bias=False, dtype=torch.bfloat16, device="cuda")
        >>> prune_2to4_(lin.weight)  # any 2:4 pruning  # doctest: +SKIP
        >>> sparse = CuSparseLtLinear(lin)  # doctest: +SKIP
        >>> y = sparse(torch.randn(8192, 4096, dtype=torch.bfloat16, device="cuda"))  # +SKIP
    """

    def __init__(self, linear: nn.Linear, search: bool = True) -> None:
        super().__init__()
        weight = linear.weight.detach()
        if weight.device.type != "cuda":  # where the weight lives comes first for a module
            raise ValueError(
                f"cuSPARSELt runs on CUDA GPUs; the weight is on {weight.device}: move the model "
                "to the GPU first."
            )
        # The export backend's checks: dtype, sizes, 2:4, GPU, library.
        check_cusparselt_support(weight, "weight")
        out_features, in_features = weight.shape
        self.in_features, self.out_features = in_features, out_features
        self.search = search
        self.bias = (
            None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), False)
        )
        self._lib = _library()
        self._dtype, self._device = weight.dtype, weight.device
        self._a = _structured_descriptor(self._lib, out_features, in_features, weight.dtype)
        with torch.cuda.device(weight.device):
            compressed = self._compress(weight.contiguous())
        self.register_buffer("compressed", compressed, persistent=False)
        self._plans: dict[int, _Plan] = {}

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, plans={sorted(self._plans)}"
        )

    def _compress(self, weight: torch.Tensor) -> torch.Tensor:
        lib = self._lib
        size, buffer_size = ctypes.c_size_t(0), ctypes.c_size_t(0)
        lib.call(
            "cusparseLtSpMMACompressedSize2",
            ctypes.byref(lib.handle), ctypes.byref(self._a),
            ctypes.byref(size), ctypes.byref(buffer_size),
        )  # fmt: skip
        compressed = torch.empty(int(size.value), dtype=torch.uint8, device=weight.device)
        scratch = torch.empty(
            max(int(buffer_size.value), 1), dtype=torch.uint8, device=weight.device
        )
        stream = ctypes.c_void_p(torch.cuda.current_stream(weight.device).cuda_stream)
        lib.call(
            "cusparseLtSpMMACompress2",
            ctypes.byref(lib.handle), ctypes.byref(self._a), 1, _OP_N,
            _ptr(weight), _ptr(compressed), _ptr(scratch), stream,
        )  # fmt: skip
        torch.cuda.current_stream(weight.device).synchronize()  # scratch is freed on return
        return compressed

    def _plan(self, tokens: int) -> _Plan:
        plan = self._plans.get(tokens)
        if plan is not None:
            return plan
        lib, h = self._lib, ctypes.byref(self._lib.handle)
        dtype = _CUDA_DTYPES[self._dtype]
        b, d, matmul, alg, p = _opaque(), _opaque(), _opaque(), _opaque(), _opaque()
        # B = x (tokens x in, row-major), used transposed; D = y^T (out x tokens, col-major).
        lib.call(
            "cusparseLtDenseDescriptorInit",
            h, ctypes.byref(b), tokens, self.in_features, self.in_features, 16, dtype, _ORDER_ROW,
        )  # fmt: skip
        lib.call(
            "cusparseLtDenseDescriptorInit",
            h, ctypes.byref(d), self.out_features, tokens, self.out_features, 16, dtype, _ORDER_COL,
        )  # fmt: skip
        lib.call(
            "cusparseLtMatmulDescriptorInit",
            h, ctypes.byref(matmul), _OP_N, _OP_T, ctypes.byref(self._a), ctypes.byref(b),
            ctypes.byref(d), ctypes.byref(d), lib.compute_32f,
        )  # fmt: skip
        lib.call("cusparseLtMatmulAlgSelectionInit", h, ctypes.byref(alg), ctypes.byref(matmul), 0)
        lib.call(
            "cusparseLtMatmulPlanInit", h, ctypes.byref(p), ctypes.byref(matmul), ctypes.byref(alg)
        )
        plan = _Plan(self._a, b, d, matmul, alg, p, _workspace(lib, p, self._device))
        self._plans[tokens] = plan
        return plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device != self._device or x.dtype != self._dtype:
            raise ValueError(
                f"CuSparseLtLinear takes {self._dtype} inputs on {self._device}, got {x.dtype} "
                f"on {x.device}."
            )
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.stride(-1) != 1 or x2.stride(0) != self.in_features or x2.data_ptr() % 16:
            x2 = x2.contiguous()
        tokens = x2.shape[0]
        if tokens == 0:
            return x.new_empty(*lead, self.out_features)
        padded = -tokens % 16  # 16-byte-aligned dense operands: pad the rows to a multiple of 16
        if padded:
            x2 = torch.cat([x2, x2.new_zeros(padded, self.in_features)])
        out = torch.empty(x2.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        with torch.cuda.device(self._device):  # the library runs on the current device
            self._run(self._plan(x2.shape[0]), x2, out)
        if padded:
            out = out[:tokens]
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*lead, self.out_features)

    def _run(self, plan: _Plan, x: torch.Tensor, out: torch.Tensor) -> None:
        lib, h = self._lib, ctypes.byref(self._lib.handle)
        alpha, beta = ctypes.c_float(1.0), ctypes.c_float(0.0)
        stream = (ctypes.c_void_p * 1)(torch.cuda.current_stream(x.device).cuda_stream)
        if self.search and not plan.searched:
            lib.call(
                "cusparseLtMatmulSearch",
                h, ctypes.byref(plan.plan), ctypes.byref(alpha), _ptr(self.compressed), _ptr(x),
                ctypes.byref(beta), _ptr(out), _ptr(out), _ptr(plan.workspace), stream, 1,
            )  # fmt: skip
            plan.workspace = _workspace(lib, plan.plan, x.device)  # the chosen algorithm's
            plan.searched = True
        lib.call(
            "cusparseLtMatmul",
            h, ctypes.byref(plan.plan), ctypes.byref(alpha), _ptr(self.compressed), _ptr(x),
            ctypes.byref(beta), _ptr(out), _ptr(out), _ptr(plan.workspace), stream, 1,
        )  # fmt: skip

    def __del__(self) -> None:  # plans hold library objects, not Python ones
        plans, lib = getattr(self, "_plans", {}), getattr(self, "_lib", None)
        if lib is None:
            return
        try:
            for plan in plans.values():
                plan.destroy(lib)
            lib.lib.cusparseLtMatDescriptorDestroy(ctypes.byref(self._a))
        except Exception:  # interpreter shutdown: the library may be gone already
            pass
