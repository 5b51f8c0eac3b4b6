"""Sparsity report: the fraction of zero weights in a model's decoder linear layers.

The layers are those :func:`~optishear_lightning.pruning.prune` prunes
(:func:`~optishear_lightning.models.named_prunable_linears`), so the report reads back exactly
what pruning did; embeddings and the LM head are left out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..models import named_prunable_linears

__all__ = ["format_sparsity_report", "overall_sparsity", "sparsity_report"]


def _decoder_linears(model: nn.Module) -> dict[str, nn.Module]:
    try:
        return named_prunable_linears(model)
    except ValueError:
        return {}  # reported below with a hint to pass the layers explicitly


def sparsity_report(
    model: nn.Module | Mapping[str, nn.Module],
    modules: Mapping[str, nn.Module] | None = None,
) -> list[dict[str, Any]]:
    """Zero counts of the weights of a model's decoder linear layers.

    Args:
        model: The model, or directly a mapping ``{name: linear layer}`` to report on.
        modules: The layers to report on, by name. When neither this nor a mapping is given,
            the prunable linears of the model's decoder blocks are used
            (:func:`~optishear_lightning.models.named_prunable_linears`), i.e. exactly what
            :func:`~optishear_lightning.pruning.prune` prunes.

    Returns:
        One row per layer, in the given (or module) order, with keys ``name``, ``shape``
        (tuple), ``numel``, ``zeros`` and ``sparsity`` (fraction of zero weights). Biases are
        not counted.

    Raises:
        ValueError: If no layers are found (pass ``modules=`` for an unusual architecture).
        TypeError: If a given module has no ``weight`` tensor.
    """
    if modules is None and isinstance(model, Mapping):
        modules = model
    if modules is None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected an nn.Module or a mapping, got {type(model).__name__}")
        modules = _decoder_linears(model)
    if not modules:
        raise ValueError(
            "no decoder linear layers found; pass them explicitly as modules={name: nn.Linear}"
        )
    rows = []
    for name, module in modules.items():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"module {name!r} ({type(module).__name__}) has no weight tensor")
        numel = weight.numel()
        zeros = numel - int(torch.count_nonzero(weight.detach()))
        rows.append(
            {
                "name": name,
                "shape": tuple(weight.shape),
                "numel": numel,
                "zeros": zeros,
                "sparsity": zeros / numel if numel else 0.0,
            }
        )
    return rows


def overall_sparsity(rows: Sequence[Mapping[str, Any]]) -> float:
    """Fraction of zero weights over all rows of a :func:`sparsity_report`, weighted by size.

    Args:
        rows: Rows from :func:`sparsity_report`.

    Returns:
        Total zeros divided by total weights (0.0 when there are no weights).
    """
    total = sum(row["numel"] for row in rows)
    return sum(row["zeros"] for row in rows) / total if total else 0.0


def format_sparsity_report(rows: Sequence[Mapping[str, Any]]) -> str:
    """Render :func:`sparsity_report` rows as a plain-text table with an overall line.

    Args:
        rows: Rows from :func:`sparsity_report`.

    Returns:
        The table, one line per layer plus a header and an ``overall`` line.
    """
    header = ("layer", "shape", "zeros", "numel", "sparsity")
    lines = [
        (
            str(row["name"]),
            "x".join(str(d) for d in row["shape"]),
            str(row["zeros"]),
            str(row["numel"]),
            f"{row['sparsity']:.2%}",
        )
        for row in rows
    ]
    total_zeros = sum(row["zeros"] for row in rows)
    total_numel = sum(row["numel"] for row in rows)
    footer = ("overall", "", str(total_zeros), str(total_numel), f"{overall_sparsity(rows):.2%}")
    table = [header, *lines, footer]
    widths = [max(len(line[c]) for line in table) for c in range(len(header))]

    def render(line: tuple[str, ...]) -> str:
        # Names and shapes read best left-aligned, numbers right-aligned.
        cells = [
            cell.ljust(width) if c < 2 else cell.rjust(width)
            for c, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    rule = "-" * len(render(header))
    body = [render(line) for line in lines]
    return "\n".join([render(header), rule, *body, rule, render(footer)])
