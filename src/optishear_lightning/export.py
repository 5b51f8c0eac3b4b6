"""2:4 export: convert a pruned model's 2:4-sparse linears for sparse tensor-core inference.

:func:`export_semi_structured` validates every layer first, replaces each 2:4-pruned weight by
a semi-structured sparse tensor (or, for the ``"cusparselt_cached"`` backend, the whole linear
by a :class:`~optishear_lightning.kernels.cusparselt.CuSparseLtLinear`), checks each converted
layer, and optionally the model's output, against the dense-with-zeros model, and puts the
dense layers back if a check fails. The tensor-level pieces (backends, checks, conversion of
one weight) are in :mod:`optishear_lightning.kernels.semi_structured`.

Example:
    >>> report = export_semi_structured(model, example_inputs=ids[:, :128])  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .kernels.cusparselt import CuSparseLtLinear
from .kernels.semi_structured import (
    BF16_RTOL,
    OutputCheck,
    check_semi_structured_support,
    compare_outputs,
    resolve_backend,
    to_semi_structured,
)
from .models import named_prunable_linears

__all__ = ["SemiStructuredExport", "export_semi_structured"]


@dataclass
class SemiStructuredExport:
    """What :func:`export_semi_structured` converted and how the checks went."""

    backend: str
    names: list[str] = field(default_factory=list)
    layer_checks: dict[str, OutputCheck] = field(default_factory=dict)
    model_check: OutputCheck | None = None


def _model_output(model: nn.Module, inputs: Any) -> torch.Tensor:
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


def _sparse_linear(
    lin: nn.Linear, backend: str
) -> tuple[nn.Module | torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """The converted layer and its forward: a semi-structured weight or a CuSparseLtLinear."""
    if backend == "cusparselt_cached":
        module = CuSparseLtLinear(lin)
        return module, module.forward
    sparse = to_semi_structured(lin.weight, backend)
    return sparse, lambda x: F.linear(x, sparse, lin.bias)


def _install(
    model: nn.Module, name: str, lin: nn.Linear, converted: nn.Module | torch.Tensor
) -> None:
    if isinstance(converted, nn.Module):
        _set_module(model, name, converted)
    else:
        lin.weight = nn.Parameter(converted, requires_grad=False)


def _linears_to_convert(model: nn.Module, names: Iterable[str] | None) -> dict[str, nn.Linear]:
    """The named linears, or every decoder block's prunable linears when ``names`` is None."""
    if names is None:
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
    return linears


@torch.no_grad()
def export_semi_structured(
    model: nn.Module,
    backend: str = "auto",
    *,
    names: Iterable[str] | None = None,
    check_layers: bool = True,
    check_tokens: int = 128,
    example_inputs: Any = None,
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
        ValueError, TypeError, RuntimeError: see
            :func:`~optishear_lightning.kernels.semi_structured.check_semi_structured_support`;
            also a layer or model output outside tolerance (after restoring the dense weights).
    """
    linears = _linears_to_convert(model, names)
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
