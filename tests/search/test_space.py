"""The OptiShear metric space: known metrics, validation, numerical safety, effective space."""

from __future__ import annotations

import copy
import dataclasses
import json
import random

import pytest
import torch

from optishear_lightning.calibration import LayerStats
from optishear_lightning.masks import keep_mask_from_scores, num_pruned, parse_pattern
from optishear_lightning.metrics import get_method
from optishear_lightning.pruning import prune
from optishear_lightning.search.space import (
    MAGNITUDE,
    NORMALISERS,
    TRANSFORMS,
    WANDA,
    MetaMetric,
    effective_space,
    full_space,
)

from ..conftest import tiny_llama

IDS = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))

SCALAR_W = {"none", "total_sum", "mean", "frobenius"}
# x is a 1 x in row: its row sum is its total.
SCALAR_X = {"none", "row_sum", "total_sum", "mean", "frobenius"}


def random_layer(seed: int, rows: int = 16, cols: int = 64) -> tuple[torch.Tensor, LayerStats]:
    """Random weights and random positive activation statistics spanning decades."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=g)
    scale = torch.logspace(-2, 2, cols)[torch.randperm(cols, generator=g)]
    sq_sum = (torch.rand(cols, generator=g) + 0.05) * scale * 37
    return weight, LayerStats(sq_sum, 37)


def representative(m: MetaMetric, group: str = "row") -> MetaMetric:
    """The effective-space metric that must give the same masks as ``m``."""
    a = "none" if m.a in SCALAR_W or (m.a == "row_sum" and group != "layer") else m.a
    b = "none" if m.b in SCALAR_X else m.b
    return MetaMetric(m.f1, m.f2, a, b)


LAYOUTS = [("unstructured", 0.5, "row"), ("unstructured", 0.3, "layer"), ("2:4", None, "row")]


# Known metrics ------------------------------------------------------------------------------
@pytest.mark.parametrize("meta,engine", [(WANDA, "wanda"), (MAGNITUDE, "magnitude")])
@pytest.mark.parametrize("pattern,sparsity,group", LAYOUTS)
@pytest.mark.parametrize("seed", range(5))
def test_known_metrics_equal_engine_methods(meta, engine, pattern, sparsity, group, seed):
    weight, stats = random_layer(seed)
    w_meta, w_engine = weight.clone(), weight.clone()
    pat = parse_pattern(pattern)
    keep_meta = meta.prune_(w_meta, stats, sparsity, pat, group)
    keep_engine = get_method(engine).prune_(w_engine, stats, sparsity, pat, group)
    assert torch.equal(keep_meta, keep_engine)
    assert torch.equal(w_meta, w_engine)
    assert not keep_meta.all()


def test_wanda_scores_are_bitwise_wanda():
    weight, stats = random_layer(7)
    engine = get_method("wanda").score(weight.float(), stats)
    assert torch.equal(WANDA.score(weight, stats), engine)


@pytest.mark.parametrize("meta,engine", [(WANDA, "wanda"), (MAGNITUDE, "magnitude")])
def test_known_metrics_prune_a_model_like_the_engine(meta, engine):
    model_meta, model_engine = tiny_llama(0, 2, 64), tiny_llama(0, 2, 64)
    res_meta = prune(model_meta, IDS, meta, 0.5)
    res_engine = prune(model_engine, IDS, engine, 0.5)
    assert res_meta.masks.keys() == res_engine.masks.keys()
    assert len(res_meta.masks) == 14
    for name, keep in res_meta.masks.items():
        assert torch.equal(keep, res_engine.masks[name]), name
    for (name, p), q in zip(model_meta.named_parameters(), model_engine.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert res_meta.method == meta.name
    assert abs(res_meta.overall_sparsity - 0.5) < 1e-9


# Validation and serialisation ----------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,field,choices",
    [
        ({"f1": "cube"}, "f1", TRANSFORMS),
        ({"f2": "tanh"}, "f2", TRANSFORMS),
        ({"a": "max"}, "a", NORMALISERS),
        ({"b": "l1"}, "b", NORMALISERS),
    ],
)
def test_metric_validates_fields(kwargs, field, choices):
    with pytest.raises(ValueError, match=f"MetaMetric.{field}=") as info:
        MetaMetric(**kwargs)
    message = str(info.value)
    assert repr(next(iter(kwargs.values()))) in message
    for choice in choices:
        assert repr(choice) in message


def test_from_dict_rejects_unknown_fields_and_values():
    with pytest.raises(ValueError, match="Unknown MetaMetric fields"):
        MetaMetric.from_dict({"f1": "identity", "f3": "sqrt"})
    with pytest.raises(ValueError, match="use one of"):
        MetaMetric.from_dict({"f1": "nope"})


def test_metric_is_frozen_and_hashable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        WANDA.f1 = "sqrt"
    assert len({WANDA, MetaMetric(), copy.deepcopy(WANDA), MAGNITUDE}) == 2
    assert MetaMetric() == WANDA


def test_round_trip_and_json_for_whole_space():
    space = full_space()
    for m in space:
        data = m.to_dict()
        assert set(data) == {"f1", "f2", "a", "b"}
        assert MetaMetric.from_dict(data) == m
        assert MetaMetric.from_dict(json.loads(json.dumps(data))) == m
    names = {m.name for m in space}
    formulas = {str(m) for m in space}
    assert len(names) == len(formulas) == 7**4


def test_formulas():
    assert str(WANDA) == "|W| * sqrt(x)"
    assert str(MAGNITUDE) == "|W| * 1/colsum(x) * (sqrt(x))^2"
    assert (
        str(MetaMetric("log", "softmax", "relative_sum", "frobenius"))
        == "1/(rowsum(|W|)+colsum(|W|)) * log(|W|) * 1/||x||_F * softmax(sqrt(x))"
    )
    assert WANDA.name == "meta[identity,identity,none,none]"
    assert get_method(WANDA) is WANDA


# Numerical safety ----------------------------------------------------------------------------
def degenerate_layer() -> tuple[torch.Tensor, LayerStats]:
    """Exact zeros, an all-zero row and column, a dead channel and a huge one, all at once."""
    g = torch.Generator().manual_seed(3)
    rows, cols = 12, 32
    weight = torch.randn(rows, cols, generator=g)
    weight[torch.rand(rows, cols, generator=g) < 0.3] = 0.0
    weight[4] = 0.0  # all-zero row
    weight[:, 9] = 0.0  # all-zero column, on a live channel
    weight[:, 5] = 0.0  # all-zero column on the dead channel
    x = torch.rand(cols, generator=g) + 0.1
    x[5] = 0.0  # dead channel
    x[2] = 0.0  # dead channel under ordinary weights (with some exact zeros)
    x[17] = 1e8  # huge activations
    return weight, LayerStats(x * 50, 50)


def layer_variants():
    weight, stats = degenerate_layer()
    x = stats.act_sq_mean
    yield "all_at_once", weight, stats
    yield "zero_weights", torch.zeros_like(weight), stats
    yield "dead_everywhere", weight, LayerStats(torch.zeros_like(x), 50)
    yield "huge_only", weight.abs() + 0.1, LayerStats(torch.full_like(x, 1e8), 1)


@pytest.mark.parametrize("variant", [v[0] for v in layer_variants()])
def test_every_metric_is_finite_on_degenerate_layers(variant):
    _, weight, stats = next(v for v in layer_variants() if v[0] == variant)
    rows, cols = weight.shape
    bad = []
    for m in full_space():
        scores = m.score(weight, stats)
        assert scores.dtype == torch.float32 and scores.shape == weight.shape
        if not torch.isfinite(scores).all():
            bad.append(m.name)
            continue
        keep = keep_mask_from_scores(scores, 0.5)
        assert (keep.sum(1) == cols - num_pruned(cols, 0.5)).all(), m.name
        keep = keep_mask_from_scores(scores, None, "2:4")
        assert (keep.reshape(rows, -1, 4).sum(-1) == 2).all(), m.name
        keep = keep_mask_from_scores(scores, 0.3, group="layer")
        assert (~keep).sum() == num_pruned(rows * cols, 0.3), m.name
    assert not bad, f"{len(bad)} metrics give NaN/inf scores, e.g. {bad[:5]}"


def test_nan_inputs_still_reported():
    weight, stats = random_layer(0)
    weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        MAGNITUDE.prune_(weight, stats, 0.5, parse_pattern("unstructured"))


def test_prune_keeps_exact_counts_for_random_metrics():
    weight, stats = random_layer(11, rows=8, cols=48)
    for m in random.Random(1).sample(full_space(), 100):
        w = weight.clone()
        keep = m.prune_(w, stats, 0.25, parse_pattern("unstructured"))
        assert (keep.sum(1) == 48 - 12).all(), m.name
        assert torch.equal(w, weight * keep), m.name


# Effective space -----------------------------------------------------------------------------
def test_effective_space_sizes_and_membership():
    full = full_space()
    assert len(full) == len(set(full)) == 2401
    row = effective_space("row")
    assert len(row) == len(set(row)) == 441
    assert set(row) <= set(full)
    assert WANDA in row and MAGNITUDE in row
    assert all(m.a != "row_sum" for m in row)
    layer = effective_space("layer")
    assert len(layer) == len(set(layer)) == 588
    assert set(row) < set(layer)
    assert {representative(m) for m in full} == set(row)
    assert {representative(m, "layer") for m in full} == set(layer)


@pytest.mark.parametrize("pattern,sparsity,group", LAYOUTS)
def test_every_metric_masks_like_its_representative(pattern, sparsity, group):
    members = set(effective_space(group))
    layers = [random_layer(seed, rows=8, cols=32) for seed in (21, 22)]
    sample = random.Random(0).sample(full_space(), 200)
    assert sum(m not in members for m in sample) > 100  # mostly non-representatives
    for m in sample:
        rep = representative(m, group)
        assert rep in members, m.name
        for weight, stats in layers:
            keep = keep_mask_from_scores(m.score(weight, stats), sparsity, pattern, group)
            want = keep_mask_from_scores(rep.score(weight, stats), sparsity, pattern, group)
            assert torch.equal(keep, want), (m.name, rep.name)


def test_row_sum_matters_for_layer_groups():
    """a=row_sum is dropped for row groups only: with a whole-layer group it changes masks."""
    weight, stats = random_layer(5)
    weight[:4] *= 10  # rows of very different scale
    with_row_sum = MetaMetric("identity", "identity", "row_sum", "none")
    row = [keep_mask_from_scores(m.score(weight, stats), 0.5) for m in (with_row_sum, WANDA)]
    assert torch.equal(row[0], row[1])
    layer = [
        keep_mask_from_scores(m.score(weight, stats), 0.5, group="layer")
        for m in (with_row_sum, WANDA)
    ]
    assert not torch.equal(layer[0], layer[1])
