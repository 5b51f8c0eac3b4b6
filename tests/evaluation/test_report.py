"""Tests for optishear_lightning.evaluation.report (offline; tiny random models)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from optishear_lightning.evaluation.report import (
    format_sparsity_report,
    overall_sparsity,
    sparsity_report,
)

from .conftest import tiny_llama

pytestmark = pytest.mark.usefixtures("single_thread")


def test_sparsity_report_counts_known_zeros() -> None:
    model = tiny_llama()
    q_proj = model.model.layers[0].self_attn.q_proj
    down_proj = model.model.layers[1].mlp.down_proj
    with torch.no_grad():
        q_proj.weight[:2] = 0  # 2 rows x 32 = 64 zeros of 1024
        down_proj.weight[:, ::2] = 0  # half of 32 x 64
        model.lm_head.weight.zero_()  # outside the decoder blocks: must not be reported

    rows = sparsity_report(model)

    names = [row["name"] for row in rows]
    assert len(names) == 2 * 7 and not any("lm_head" in n or "embed" in n for n in names)
    by_name = {row["name"]: row for row in rows}
    q = by_name["model.layers.0.self_attn.q_proj"]
    assert (q["shape"], q["numel"], q["zeros"]) == ((32, 32), 1024, 64)
    assert q["sparsity"] == pytest.approx(64 / 1024)
    assert by_name["model.layers.1.mlp.down_proj"]["sparsity"] == pytest.approx(0.5)
    others = [r for r in rows if r["name"] not in {q["name"], "model.layers.1.mlp.down_proj"}]
    assert all(r["zeros"] == 0 for r in others)
    total = sum(r["numel"] for r in rows)
    assert overall_sparsity(rows) == pytest.approx((64 + 1024) / total)

    table = format_sparsity_report(rows)
    assert "model.layers.0.self_attn.q_proj" in table and "6.25%" in table
    assert table.splitlines()[-1].split()[0] == "overall"
    assert f"{(64 + 1024) / total:.2%}" in table.splitlines()[-1]

    explicit = sparsity_report(model, modules={"q": q_proj})
    assert [(r["name"], r["zeros"]) for r in explicit] == [("q", 64)]
    assert sparsity_report({"q": q_proj}) == explicit


def test_sparsity_report_needs_layers() -> None:
    with pytest.raises(ValueError, match="modules="):
        sparsity_report(nn.Sequential(nn.Linear(2, 2)))
    assert math.isclose(overall_sparsity([]), 0.0)
