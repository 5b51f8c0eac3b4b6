"""The fused Triton kernels give exactly the PyTorch engine's masks (and pruned weights)."""

from __future__ import annotations

import pytest
import torch

from optishear_lightning.dispatch import (
    dispatch_keep_mask,
    fused_keep_mask,
    fused_score,
    keep_mask,
    reference_keep_mask,
    triton_prune,
)
from optishear_lightning.kernels import FusedScore, kernel_backend
from optishear_lightning.masks import keep_mask_from_scores, num_pruned, parse_pattern
from optishear_lightning.metrics import METHODS, prune_by_scores_
from optishear_lightning.search.space import MAGNITUDE, WANDA, MetaMetric

from .conftest import DEVICE, ROW_CASES, check_kernel, random_stats, random_weight, requires_triton

pytestmark = requires_triton

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize(
    ("cols", "dtype", "method"),
    [
        (100, torch.float32, "wanda"),
        (576, torch.bfloat16, "wanda"),
        (1536, torch.float16, "wanda"),
        (96, torch.bfloat16, "magnitude"),
        (576, torch.float32, "magnitude"),
        (100, torch.float16, "ria"),
        (576, torch.bfloat16, "ria"),
    ],
)
def test_rows_random_match_reference(cols, dtype, method):
    w = random_weight(5, cols, dtype, seed=cols)
    ref = check_kernel(METHODS[method], w, random_stats(cols, seed=cols), 0.5)
    assert (~ref).sum(1).eq(num_pruned(cols, 0.5)).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "ria"])
def test_rows_many_ties_match_reference(dtype, method):
    # 5 weight levels and 3 activation levels: most scores of a row are tied.
    w = random_weight(6, 576, dtype, seed=1, levels=2)
    check_kernel(METHODS[method], w, random_stats(576, seed=1, ties=True), 0.5)


@pytest.mark.parametrize(
    "knobs",
    [
        {"coarse_bits": 32},  # bisection over the whole row only
        {"coarse_bits": 12, "small": 16},  # bucket too large for scratch: whole-row fallback
        {"coarse_bits": 12},  # bucket copied to scratch
        {"max_resident": 128},  # rows streamed in chunks of 128
    ],
)
@pytest.mark.parametrize("levels", [0, 2])
def test_rows_every_selection_path(knobs, levels):
    w = random_weight(
        4, 1536 if "max_resident" not in knobs else 300, torch.bfloat16, levels=levels
    )
    check_kernel(METHODS["wanda"], w, random_stats(w.shape[1], ties=bool(levels)), 0.6, **knobs)


@pytest.mark.parametrize("cols", [96, 100])
def test_rows_k_edge_cases(cols):
    w = random_weight(3, cols, levels=1)  # mostly zeros and ties
    stats = random_stats(cols)
    assert check_kernel(METHODS["wanda"], w, stats, 0.0).all()  # k = 0
    almost_all = (cols - 1) / cols + 1e-6  # k = cols - 1
    ref = check_kernel(METHODS["magnitude"], w, stats, almost_all)
    assert ref.sum(1).eq(1).all()


TWO_LEVEL = {"select": "two_level"}


@pytest.mark.parametrize(
    ("cols", "dtype", "method", "levels"),
    ROW_CASES,
)
@pytest.mark.parametrize("sparsity", [0.5, 0.13])
def test_two_level_select_matches_reference(cols, dtype, method, levels, sparsity):
    w = random_weight(4, cols, dtype, seed=cols + levels, levels=levels)
    stats = random_stats(cols, seed=cols, ties=bool(levels))
    check_kernel(METHODS[method], w, stats, sparsity, **TWO_LEVEL)


@pytest.mark.parametrize("cols", [96, 100, 576])
@pytest.mark.parametrize("dtype", DTYPES)
def test_two_level_select_k_edge_cases(cols, dtype):
    w = random_weight(3, cols, dtype, seed=7, levels=1)  # mostly zeros and ties
    stats = random_stats(cols, seed=7)
    assert check_kernel(METHODS["wanda"], w, stats, 0.0, **TWO_LEVEL).all()  # k = 0
    almost_all = (cols - 1) / cols + 1e-6  # k = cols - 1
    ref = check_kernel(METHODS["magnitude"], w, stats, almost_all, **TWO_LEVEL)
    assert ref.sum(1).eq(1).all()
    w = random_weight(3, cols, dtype, seed=8)  # distinct scores
    check_kernel(METHODS["wanda"], w, stats, almost_all, **TWO_LEVEL)


@pytest.mark.parametrize("small", [16, None])
def test_two_level_select_tie_break(small):
    # Select-only scores with ties straddling the threshold: the need-th leftmost tie is found
    # by bisection over columns; a wrong tie-break (rightmost, arbitrary) prunes other columns.
    gen = torch.Generator().manual_seed(11)
    rows, cols = 6, 576
    scores = torch.randint(0, 4, (rows, cols), generator=gen).float()
    scores[0] = 1.0  # one value: 32 bits counted over the whole row, no bucket copy
    scores[1, ::2] = -0.0  # signed zeros tie with +0.0
    scores[2] = torch.randn(cols, generator=gen)  # distinct, with a few copies of the median
    scores[2, 100:110] = scores[2].median()
    scores = scores.to(DEVICE)
    w = random_weight(rows, cols, torch.bfloat16)
    for sparsity in (0.3, 0.5, 0.71):
        ref = keep_mask_from_scores(scores, sparsity)
        for select in ("two_level", "bisect"):
            keep = triton_prune(w, scores, sparsity, inplace=False, select=select, small=small)
            assert torch.equal(keep, ref), (select, sparsity)


def test_two_level_select_many_small_buckets():
    # small=16 keeps phase 1 counting over the whole row far longer than the default.
    w = random_weight(4, 1536, torch.bfloat16, seed=3)
    check_kernel(METHODS["wanda"], w, random_stats(1536, seed=3), 0.5, small=16, **TWO_LEVEL)


def test_default_row_knobs_and_bad_select():
    from optishear_lightning.kernels import triton_kernels as tk

    assert tk.default_row_knobs(4096) == {"select": "bisect", "num_warps": 4, "coarse_bits": 32}
    assert tk.default_row_knobs(14336)["num_warps"] == 16
    assert tk.default_row_knobs(100)["num_warps"] == 4
    with pytest.raises(ValueError, match="select must be one of"):
        triton_prune(random_weight(2, 64), FusedScore(), 0.5, select="radix")


def test_tie_break_prunes_lowest_columns_first():
    # All scores equal: exactly the first k columns of every row go (a stable sort's order).
    w = torch.ones(3, 100, device=DEVICE)
    keep = triton_prune(w, FusedScore(), 0.37, inplace=False)
    k = num_pruned(100, 0.37)
    assert not keep[:, :k].any() and keep[:, k:].all()
    # Partial ties at the threshold: 0 < 1 (tied, 6 copies) < 2; prune 4 -> the zero and the
    # three leftmost ones.
    row = torch.tensor([[2.0, 1, 1, 0, 1, 2, 1, 1, 2, 1]], device=DEVICE)
    keep = triton_prune(row, FusedScore(), 0.4, inplace=False)
    assert keep.tolist() == [[True, False, False, False, False, True, True, True, True, True]]


def test_select_only_scores_with_signed_zeros_and_negatives():
    gen = torch.Generator().manual_seed(3)
    scores = torch.randint(-3, 4, (4, 100), generator=gen).float() * 0.5
    scores[scores == 0] = torch.tensor([0.0, -0.0]).repeat(100)[: int((scores == 0).sum())]
    scores = scores.to(DEVICE)
    w = random_weight(4, 100, torch.bfloat16)
    for pattern, sparsity in [("unstructured", 0.5), ("2:4", None)]:
        ref = keep_mask_from_scores(scores, sparsity, pattern)
        assert torch.equal(triton_prune(w, scores, sparsity, pattern, inplace=False), ref)


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:3"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nm_matches_reference(pattern, dtype):
    pat = parse_pattern(pattern)
    cols = 96
    for method, levels in [("wanda", 0), ("magnitude", 2), ("ria", 2)]:
        w = random_weight(4, cols, dtype, seed=levels, levels=levels)
        ref = check_kernel(METHODS[method], w, random_stats(cols, ties=bool(levels)), None, pat)
        assert ref.reshape(4, -1, pat.m).sum(-1).eq(pat.n).all()


def test_nm_tie_break():
    keep = triton_prune(torch.ones(2, 8, device=DEVICE), FusedScore(), None, "2:4", inplace=False)
    assert keep.tolist() == [[False, False, True, True] * 2] * 2


META = [
    MetaMetric("identity", "identity", "none", "none"),
    MetaMetric("sqrt", "square", "column_sum", "none"),
    MetaMetric("square", "log", "relative_sum", "column_sum"),
    MetaMetric("identity", "exp", "row_sum", "relative_sum"),
    MetaMetric("sqrt", "softmax", "frobenius", "mean"),
    MetaMetric("square", "sigmoid", "total_sum", "row_sum"),
    MAGNITUDE,
    # F1 without a bit-exact kernel: PyTorch scores, select-only kernel.
    MetaMetric("log", "identity", "column_sum", "none"),
    MetaMetric("exp", "sqrt", "none", "none"),
]


@pytest.mark.parametrize("metric", META, ids=str)
def test_meta_metrics_match_reference(metric):
    w = random_weight(6, 100, torch.bfloat16, seed=2, levels=3)
    w[:, 7] = 0  # a dead column and an all-zero row exercise the clamped normalisers
    w[2] = 0
    stats = random_stats(100, seed=2)
    stats.sq_sum[11] = 0
    fused = fused_score(metric, w, stats)
    assert (fused is not None) == (metric.f1 in ("identity", "sqrt", "square"))
    check_kernel(metric, w, stats, 0.5)
    check_kernel(metric, w, stats, None, "2:4")


def test_fused_keep_mask_leaves_weight_untouched():
    w = random_weight(4, 100, torch.bfloat16)
    before = w.clone()
    stats = random_stats(100)
    keep = fused_keep_mask(WANDA, w, stats, 0.5)
    assert torch.equal(w, before)
    assert torch.equal(keep, reference_keep_mask(WANDA, w, stats, 0.5))


@pytest.mark.parametrize("method", ["wanda", "ria", "magnitude"])
def test_engine_hooks_use_kernels_with_identical_results(method, monkeypatch):
    from optishear_lightning import dispatch

    calls = []
    original = dispatch.triton_prune
    monkeypatch.setattr(
        dispatch, "triton_prune", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    w = random_weight(4, 64, torch.bfloat16, levels=3)
    stats = random_stats(64, ties=True)
    results = {}
    for backend in ("torch", "triton"):
        for pattern, sparsity in [("unstructured", 0.5), ("2:4", None)]:
            pruned = w.clone()
            with kernel_backend(backend):
                keep = METHODS[method].prune_(pruned, stats, sparsity, parse_pattern(pattern))
            results[backend, pattern] = (keep, pruned)
    assert len(calls) == 2  # the triton backend's two calls, none under torch
    for pattern in ("unstructured", "2:4"):
        (k1, w1), (k2, w2) = results["torch", pattern], results["triton", pattern]
        assert torch.equal(k1, k2) and torch.equal(w1, w2)


def test_prune_by_scores_select_only_and_layer_fallback():
    w = random_weight(4, 64, torch.bfloat16)
    scores = torch.randn(4, 64, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    for group in ("row", "layer"):  # layer groups stay on PyTorch under any backend
        out = {}
        for backend in ("torch", "triton"):
            pruned = w.clone()
            with kernel_backend(backend):
                keep = prune_by_scores_(pruned, scores, 0.5, parse_pattern("unstructured"), group)
            out[backend] = (keep, pruned)
        assert torch.equal(out["torch"][0], out["triton"][0])
        assert torch.equal(out["torch"][1], out["triton"][1])


def test_meta_metric_prune_hook():
    w = random_weight(4, 64, torch.float16)
    stats = random_stats(64)
    for metric in (WANDA, MetaMetric("log", "sqrt", "column_sum", "none")):
        out = []
        for backend in ("torch", "triton"):
            pruned = w.clone()
            with kernel_backend(backend):
                keep = metric.prune_(pruned, stats, 0.5, parse_pattern("unstructured"))
            out.append((keep, pruned))
        assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


def test_nan_scores_raise_and_leave_their_rows():
    w = random_weight(3, 64)
    w[1, 5] = float("nan")
    pruned = w.clone()
    with pytest.raises(ValueError, match="contain NaN"):
        triton_prune(pruned, FusedScore(), 0.5)
    assert torch.equal(pruned[1].isnan(), w[1].isnan()) and pruned[1].nan_to_num().equal(
        w[1].nan_to_num()
    )  # the row with a NaN is untouched
    assert (pruned[0] == 0).sum() == 32  # the others are pruned
    with pytest.raises(ValueError, match="contain NaN"):
        triton_prune(w.clone(), FusedScore(), None, "2:4")
    with pytest.raises(ValueError, match="contain NaN"), kernel_backend("triton"):
        METHODS["magnitude"].prune_(w.clone(), None, 0.5, parse_pattern("unstructured"))


def test_argument_errors():
    w = random_weight(4, 64)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        triton_prune(w.double(), FusedScore(), 0.5)
    with pytest.raises(ValueError, match="needs a sparsity"):
        triton_prune(w, FusedScore(), None)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        triton_prune(w, FusedScore(), 1.0)
    with pytest.raises(ValueError, match="not divisible by M=3"):
        triton_prune(w[:, :62], FusedScore(), None, "1:3")
    with pytest.raises(ValueError, match="does nothing"):
        triton_prune(w, FusedScore(), 0.5, inplace=False, return_mask=False)
    with pytest.raises(ValueError, match="unit stride"):
        triton_prune(w.t(), FusedScore(), 0.5)
    with pytest.raises(TypeError, match="scores"):
        triton_prune(w, w.double(), 0.5)


@pytest.mark.parametrize(
    ("method", "sparsity", "pattern"), [("wanda", 0.5, "unstructured"), ("ria", None, "2:4")]
)
def test_prune_end_to_end_same_model(method, sparsity, pattern):
    from optishear_lightning.pruning import prune

    from ..conftest import tiny_llama

    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    out = {}
    for backend in ("torch", "triton"):
        model = tiny_llama(layers=1, hidden=16, vocab=64).to(DEVICE)
        with kernel_backend(backend):
            result = prune(model, ids, method, sparsity, pattern)
        out[backend] = (result.masks, {n: p.detach().clone() for n, p in model.named_parameters()})
    (masks_t, params_t), (masks_k, params_k) = out["torch"], out["triton"]
    assert masks_t.keys() == masks_k.keys() and len(masks_t) == 7
    assert all(torch.equal(masks_t[n], masks_k[n]) for n in masks_t)
    assert all(torch.equal(params_t[n], params_k[n]) for n in params_t)


@pytest.mark.parametrize(
    "metric", [WANDA, MetaMetric("log", "sqrt", "column_sum", "none")], ids=str
)
def test_dispatching_keep_masks(metric, monkeypatch):
    # The search's mask functions: PyTorch under "torch" (and on the CPU under "auto"), the
    # kernels under "triton"; the same masks, weights untouched; layer groups stay on PyTorch.
    from optishear_lightning import dispatch

    calls = []
    original = dispatch.triton_prune
    monkeypatch.setattr(
        dispatch, "triton_prune", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    w = random_weight(4, 96, torch.bfloat16, levels=2)
    before = w.clone()
    stats = random_stats(96, ties=True)
    scores = metric.score(w, stats)
    for pattern, sparsity, group in [
        ("unstructured", 0.5, "row"),
        ("2:4", None, "row"),
        ("unstructured", 0.3, "layer"),
    ]:
        ref = keep_mask_from_scores(scores, sparsity, pattern, group)
        for backend, expect_kernel in [("torch", False), ("triton", group == "row")]:
            calls.clear()
            with kernel_backend(backend):
                got = dispatch_keep_mask(metric, w, stats, sparsity, pattern, group)
                assert torch.equal(got, ref)
                assert torch.equal(keep_mask(scores, sparsity, pattern, group), ref)
            assert bool(calls) == expect_kernel, (backend, pattern, group)
    assert torch.equal(w, before)


def test_deferred_nan_checks_raise_once_at_the_end():
    from optishear_lightning.dispatch import deferred_nan_checks

    magnitude, unstructured = METHODS["magnitude"], parse_pattern("unstructured")
    good, bad = random_weight(3, 64, seed=1), random_weight(3, 64, seed=2)
    bad[1, 5] = float("nan")
    pruned_bad, pruned_good = bad.clone(), good.clone()
    with kernel_backend("triton"):
        with pytest.raises(ValueError, match="contain NaN"), deferred_nan_checks():
            magnitude.prune_(pruned_bad, None, 0.5, unstructured)  # no error yet
            with deferred_nan_checks():  # nested: the outer context checks
                magnitude.prune_(pruned_good, None, 0.5, unstructured)
            reached = True
        assert reached  # the launch after the NaN ran before the error
        assert (pruned_good == 0).sum() == 3 * 32 and (pruned_bad[0] == 0).sum() == 32
        assert pruned_bad[1].nan_to_num().equal(bad[1].nan_to_num())  # its row untouched
        with deferred_nan_checks():  # finite scores: no error, the same masks as without
            keep = magnitude.prune_(good.clone(), None, 0.5, unstructured)
        assert torch.equal(keep, magnitude.prune_(good.clone(), None, 0.5, unstructured))
        with pytest.raises(KeyError), deferred_nan_checks():  # the body's error wins
            magnitude.prune_(bad.clone(), None, 0.5, unstructured)
            raise KeyError("body")
        magnitude.prune_(good.clone(), None, 0.5, unstructured)  # the context is gone
