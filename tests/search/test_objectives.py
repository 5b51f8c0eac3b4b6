"""Model-wise objectives: zero for the dense model, positive otherwise, pluggable by name."""

from __future__ import annotations

import math

import pytest
import torch

from optishear_lightning.search.objectives import OBJECTIVES, get_objective


def _value(name: str, pruned: torch.Tensor, dense: torch.Tensor) -> float:
    obj = get_objective(name)
    return obj.reduce(float(obj.partial(pruned, dense)), pruned.shape[0])


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_zero_for_identical_logits_positive_otherwise(name):
    dense = torch.randn(10, 50, generator=torch.Generator().manual_seed(0))
    assert _value(name, dense, dense) == pytest.approx(0.0, abs=1e-6)
    assert _value(name, dense + 0.5 * torch.randn_like(dense), dense) > 0


def test_kl_is_blind_to_shifts_that_change_no_probability():
    dense = torch.randn(10, 50, generator=torch.Generator().manual_seed(1))
    shifted = dense + torch.randn(10, 1)
    assert _value("kl", shifted, dense) == pytest.approx(0.0, abs=1e-6)
    assert _value("logit_frobenius", shifted, dense) > 1.0


def test_kl_matches_torch():
    dense, pruned = torch.randn(2, 7, 30).unbind(0)
    expected = torch.nn.functional.kl_div(
        torch.log_softmax(pruned, -1), torch.log_softmax(dense, -1), log_target=True,
        reduction="batchmean",
    )  # fmt: skip
    assert math.isclose(_value("kl", pruned, dense), float(expected), rel_tol=1e-5)


def test_unknown_objective():
    with pytest.raises(ValueError, match="Unknown search objective"):
        get_objective("cosine")
