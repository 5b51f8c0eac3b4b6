"""Which implementation prunes: the Triton kernels or the PyTorch reference.

The setting is one of

- ``"auto"`` (default): the kernels for CUDA tensors when Triton is installed, PyTorch otherwise;
- ``"triton"``: the kernels wherever they apply, also on the CPU through Triton's interpreter
  (slow; for tests), which needs ``TRITON_INTERPRET=1`` in the environment before the kernels
  are first imported; missing Triton or interpreter is an error instead of a silent fallback;
- ``"torch"``: always the PyTorch reference.

It comes from :func:`set_kernel_backend` (or the :func:`kernel_backend` context manager) when
set, else from the ``OPTISHEAR_KERNELS`` environment variable, read at every call so that a
launcher or test can set it late. Under ``"auto"`` and ``"triton"`` alike, what the kernels do
not cover (per-layer comparison groups, float64 tensors, metrics whose scores they cannot
reproduce bit for bit: see :mod:`.fused`) runs on PyTorch.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch

__all__ = [
    "ENV_VAR",
    "KernelBackend",
    "get_kernel_backend",
    "kernel_backend",
    "kernels_for",
    "set_kernel_backend",
    "triton_available",
]

KernelBackend = Literal["auto", "triton", "torch"]
ENV_VAR = "OPTISHEAR_KERNELS"
_CHOICES = ("auto", "triton", "torch")
_KERNEL_MODULE = f"{__package__}.triton_kernels"

_override: str | None = None


def _check(name: str, source: str) -> str:
    value = str(name).strip().lower()
    if value not in _CHOICES:
        raise ValueError(f"{source}={name!r}: use one of {', '.join(_CHOICES)}.")
    return value


def set_kernel_backend(name: KernelBackend | None) -> None:
    """Set the backend for this process; ``None`` goes back to ``OPTISHEAR_KERNELS``/auto."""
    global _override
    _override = None if name is None else _check(name, "set_kernel_backend")


def get_kernel_backend() -> str:
    """The backend in force: the :func:`set_kernel_backend` value, else the env var, else auto."""
    if _override is not None:
        return _override
    return _check(os.environ.get(ENV_VAR, "auto") or "auto", ENV_VAR)


@contextmanager
def kernel_backend(name: KernelBackend | None) -> Iterator[None]:
    """Use ``name`` inside the ``with`` block, then restore the previous setting.

    Example:
        >>> with kernel_backend("torch"):
        ...     get_kernel_backend()
        'torch'
    """
    global _override
    previous = _override
    set_kernel_backend(name)
    try:
        yield
    finally:
        _override = previous


def triton_available() -> bool:
    """Whether Triton can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def _interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def kernels_for(device: torch.device) -> bool:
    """Whether pruning of tensors on ``device`` should use the Triton kernels.

    Raises:
        RuntimeError: the backend is forced to ``"triton"`` but the kernels cannot run there
            (Triton missing; a CPU tensor without ``TRITON_INTERPRET=1``; another device type).
    """
    mode = get_kernel_backend()
    if mode == "torch":
        return False
    if mode == "auto":
        return device.type == "cuda" and triton_available()
    if not triton_available():
        raise RuntimeError(
            f"{ENV_VAR}=triton (or set_kernel_backend('triton')) but Triton is not installed: "
            "pip install triton (CUDA builds of torch ship it), or use 'auto' or 'torch'."
        )
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        raise RuntimeError(
            f"The Triton kernels do not run on {device.type} tensors; use the 'torch' or "
            "'auto' kernel backend there."
        )
    loaded = sys.modules.get(_KERNEL_MODULE)
    interpreted = loaded.INTERPRETED if loaded is not None else _interpreter_requested()
    if not interpreted:
        when = "was imported without it" if loaded is not None else "is not set"
        raise RuntimeError(
            f"The Triton backend was forced for a CPU tensor, which needs Triton's interpreter, "
            f"but TRITON_INTERPRET=1 {when}. Start Python with TRITON_INTERPRET=1 in the "
            f"environment (it must be set before {_KERNEL_MODULE} is first imported), move the "
            "weights to a CUDA device, or use the 'auto'/'torch' kernel backend."
        )
    return True
