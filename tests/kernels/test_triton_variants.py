"""Opt-in kernel variants give exactly the PyTorch engine's masks (and pruned weights).

``select="snap"`` (bracket-snapping bisection of resident rows), 1 and 2 warps a row program,
and the N:4 kernel ``nm_impl="split4"``. The last is not a :func:`triton_prune` knob: the tests
reach it by wrapping ``triton_kernels.launch_nm`` (which ``triton_prune`` looks up on the
module at every call), and count the wrapped calls so that a wrapper that is not used fails.
"""

from __future__ import annotations

import pytest
import torch

from optishear_lightning.dispatch import fused_score, reference_keep_mask, triton_prune
from optishear_lightning.kernels import FusedScore
from optishear_lightning.masks import keep_mask_from_scores, num_pruned, parse_pattern
from optishear_lightning.metrics import METHODS
from optishear_lightning.search.space import MetaMetric

from .conftest import DEVICE, ROW_CASES, check_kernel, random_stats, random_weight, requires_triton

pytestmark = requires_triton

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture
def tk():
    from optishear_lightning.kernels import triton_kernels

    return triton_kernels


def tie_scores(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Select-only scores: few levels, one value, signed zeros, extremes, median copies."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (rows, cols), generator=gen).float()
    scores[0] = 1.0  # one value: every key tied
    scores[1, ::2] = -0.0  # signed zeros tie with +0.0
    scores[2] = torch.randn(cols, generator=gen)  # distinct, with a few copies of the median
    scores[2, 10:20] = scores[2].median()
    scores[3] = torch.randint(-2, 3, (cols,), generator=gen).float() * 0.5  # negatives, ±0
    scores[3, scores[3] == 0] = -0.0
    scores[3, 1::7] = 0.0
    extremes = torch.tensor([float("-inf"), float("inf"), -3.4028234663852886e38, 1e-45, -1e-45])
    scores[4] = extremes[torch.randint(0, 5, (cols,), generator=gen)]  # the ends of the keys
    # Adjacent float32 values (keys one apart): the bracket's last steps.
    scores[5] = 1.0 + torch.randint(0, 6, (cols,), generator=gen).float() * 2.0**-23
    return scores.to(DEVICE)


# --- select="snap" -------------------------------------------------------------------------

SNAP = {"select": "snap"}
WARPS = [1, 2, 4]


@pytest.mark.parametrize("num_warps", WARPS)
@pytest.mark.parametrize(
    ("cols", "dtype", "method", "levels"),
    ROW_CASES,
)
@pytest.mark.parametrize("sparsity", [0.5, 0.13])
def test_snap_matches_reference(cols, dtype, method, levels, sparsity, num_warps):
    w = random_weight(4, cols, dtype, seed=cols + levels, levels=levels)
    stats = random_stats(cols, seed=cols, ties=bool(levels))
    ref = check_kernel(METHODS[method], w, stats, sparsity, num_warps=num_warps, **SNAP)
    assert (~ref).sum(1).eq(num_pruned(cols, sparsity)).all()


@pytest.mark.parametrize("cols", [96, 100, 576])
@pytest.mark.parametrize("dtype", DTYPES)
def test_snap_k_edge_cases(cols, dtype):
    w = random_weight(3, cols, dtype, seed=7, levels=1)  # mostly zeros and ties
    stats = random_stats(cols, seed=7)
    assert check_kernel(METHODS["wanda"], w, stats, 0.0, **SNAP).all()  # k = 0
    almost_all = (cols - 1) / cols + 1e-6  # k = cols - 1
    ref = check_kernel(METHODS["magnitude"], w, stats, almost_all, **SNAP)
    assert ref.sum(1).eq(1).all()
    w = random_weight(3, cols, dtype, seed=8)  # distinct scores
    check_kernel(METHODS["wanda"], w, stats, almost_all, **SNAP)
    ones = torch.ones(3, cols, dtype=dtype, device=DEVICE)  # all equal: the first k columns
    keep = triton_prune(ones, FusedScore(), 0.37, inplace=False, **SNAP)
    k = num_pruned(cols, 0.37)
    assert not keep[:, :k].any() and keep[:, k:].all()


@pytest.mark.parametrize("num_warps", WARPS)
@pytest.mark.parametrize("cols", [96, 576, 1536])
def test_snap_select_only_tie_break(cols, num_warps):
    # Ties straddling the threshold, signed zeros, infinities: the leftmost ties go first.
    scores = tie_scores(6, cols, seed=cols)
    w = random_weight(6, cols, torch.bfloat16)
    for sparsity in (0.0, 0.3, 0.5, 0.71, (cols - 1) / cols + 1e-6):
        ref = keep_mask_from_scores(scores, sparsity)
        keep = triton_prune(w, scores, sparsity, inplace=False, num_warps=num_warps, **SNAP)
        assert torch.equal(keep, ref), (sparsity, (keep ^ ref).sum(1).tolist())
        pruned = w.clone()
        triton_prune(pruned, scores.bfloat16(), sparsity, num_warps=num_warps, **SNAP)
        ref16 = keep_mask_from_scores(scores.bfloat16(), sparsity)
        assert torch.equal(pruned, w.masked_fill(~ref16, 0)), sparsity


def test_snap_fused_reduce(tk, monkeypatch):
    # The compiled default: the count, maximum and minimum as one tuple reduction (the
    # interpreter's default is three reductions, its tuple reduction being slow): small rows.
    calls = []

    def launch(*args, **kwargs):
        calls.append(kwargs["select"])
        return original(*args, fused_reduce=True, **kwargs)

    original = tk.launch_rows
    monkeypatch.setattr(tk, "launch_rows", launch)
    for cols in (96, 100):
        scores = tie_scores(6, cols, seed=cols)[[0, 2, 3, 4]]
        for sparsity in (0.0, 0.5, (cols - 1) / cols + 1e-6):
            ref = keep_mask_from_scores(scores, sparsity)
            keep = triton_prune(scores, scores, sparsity, inplace=False, **SNAP)
            assert torch.equal(keep, ref), (cols, sparsity)
        w = random_weight(2, cols, torch.bfloat16, seed=cols, levels=2)
        check_kernel(METHODS["wanda"], w, random_stats(cols, ties=True), 0.5, **SNAP)
        w[1, 3] = float("nan")
        with pytest.raises(ValueError, match="contain NaN"):
            triton_prune(w.clone(), FusedScore(), 0.5, **SNAP)
    assert calls and set(calls) == {"snap"}


@pytest.mark.parametrize("num_warps", WARPS)
def test_snap_nan_rows_raise_and_are_left(num_warps):
    w = random_weight(3, 64)
    w[1, 5] = float("nan")
    w[1, 9] = float("nan")
    pruned = w.clone()
    with pytest.raises(ValueError, match="contain NaN"):
        triton_prune(pruned, FusedScore(), 0.5, num_warps=num_warps, **SNAP)
    assert torch.equal(pruned[1].isnan(), w[1].isnan()) and pruned[1].nan_to_num().equal(
        w[1].nan_to_num()
    )  # the row with a NaN is untouched
    assert (pruned[0] == 0).sum() == 32 and (pruned[2] == 0).sum() == 32  # the others pruned
    ref = reference_keep_mask(METHODS["magnitude"], w[[0, 2]], None, 0.5)
    assert torch.equal(pruned[[0, 2]], w[[0, 2]].masked_fill(~ref, 0))
    # Without the check, the other rows' masks are still the reference's.
    keep = triton_prune(w.clone(), FusedScore(), 0.5, check_nan=False, **SNAP)
    assert torch.equal(keep[[0, 2]], ref)


def test_snap_long_rows_stream():
    # Rows longer than max_resident are streamed and bisected whatever the select.
    w = random_weight(3, 300, torch.bfloat16, levels=2)
    check_kernel(METHODS["wanda"], w, random_stats(300, ties=True), 0.6, max_resident=128, **SNAP)


@pytest.mark.parametrize("num_warps", [1, 2])
@pytest.mark.parametrize("select", ["bisect", "two_level", "snap"])
def test_few_warps_every_select(select, num_warps, tk):
    assert select in tk.SELECTS
    w = random_weight(3, 576, torch.bfloat16, seed=5, levels=2)
    knobs = {"select": select, "num_warps": num_warps}
    check_kernel(METHODS["ria"], w, random_stats(576, seed=5, ties=True), 0.5, **knobs)
    check_kernel(METHODS["wanda"], random_weight(3, 100, seed=6), random_stats(100), 0.3, **knobs)


def test_select_names(tk):
    assert tk.SELECTS[0] == "bisect" and "snap" in tk.SELECTS
    assert tk.default_row_knobs(4096)["select"] == "bisect"
    with pytest.raises(ValueError, match="select must be one of"):
        triton_prune(random_weight(2, 64), FusedScore(), 0.5, select="snapp")


# --- nm_impl="split4" ------------------------------------------------------------------------


@pytest.fixture
def split4(tk, monkeypatch):
    """Route triton_prune's N:M launches to ``nm_impl="split4"`` with a given ``block``.

    Returns a function that sets the block and returns the list of the routed calls.
    """
    calls = []
    block = {"value": None}
    original = tk.launch_nm

    def launch(*args, **kwargs):
        if kwargs.get("nm_impl") is None:  # triton_prune's default launches (launch_mask's
            # name their nm_impl and pass through)
            calls.append(block["value"])
            kwargs.update(nm_impl="split4", block=block["value"])
        return original(*args, **kwargs)

    monkeypatch.setattr(tk, "launch_nm", launch)

    def use(value):
        block["value"] = value
        return calls

    return use


def launch_mask(tk, scores, pattern, nm_impl, block=None):
    """Keep mask and NaN count of ``launch_nm`` on select-only scores (no raising)."""
    from optishear_lightning.kernels.fused import _SELECT_ONLY

    pat = parse_pattern(pattern)
    keep = torch.empty(scores.shape, dtype=torch.bool, device=DEVICE)
    weight = torch.randn(scores.shape, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    nan_count = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    before = weight.clone()
    tk.launch_nm(
        weight, scores, keep, nan_count, (None,) * 4, _SELECT_ONLY, pat.n, pat.m,
        write_weight=True, nm_impl=nm_impl, block=block,
    )  # fmt: skip
    return keep, weight, before, int(nan_count.item())


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "3:4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("cols", "block"), [(96, None), (1540, None), (1540, 256)])
def test_split4_matches_reference(pattern, dtype, cols, block, split4):
    calls = split4(block)
    pat = parse_pattern(pattern)
    for method, levels in [("wanda", 0), ("magnitude", 2), ("ria", 2)]:
        w = random_weight(3, cols, dtype, seed=levels + cols, levels=levels)
        stats = random_stats(cols, seed=cols, ties=bool(levels))
        ref = check_kernel(METHODS[method], w, stats, None, pat)
        assert ref.reshape(3, -1, pat.m).sum(-1).eq(pat.n).all()
    assert len(calls) == 6


@pytest.mark.parametrize(
    "metric",
    [
        MetaMetric("sqrt", "square", "column_sum", "none"),
        MetaMetric("square", "log", "relative_sum", "column_sum"),
        MetaMetric("identity", "exp", "row_sum", "relative_sum"),
        MetaMetric("log", "identity", "column_sum", "none"),  # select only
    ],
    ids=str,
)
def test_split4_meta_metrics(metric, split4):
    calls = split4(64)
    w = random_weight(4, 100, torch.bfloat16, seed=2, levels=3)
    w[:, 7] = 0
    w[2] = 0
    stats = random_stats(100, seed=2)
    check_kernel(metric, w, stats, None, "2:4")
    assert len(calls) == 2


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "3:4"])
@pytest.mark.parametrize("cols", [96, 1540])
def test_split4_select_only_tie_break(pattern, cols, split4):
    calls = split4(512)
    scores = tie_scores(6, cols, seed=cols + 1)
    w = random_weight(6, cols, torch.bfloat16)
    for s in (scores, scores.bfloat16()):
        ref = keep_mask_from_scores(s, None, pattern)
        keep = triton_prune(w, s, None, pattern, inplace=False)
        assert torch.equal(keep, ref), (keep ^ ref).sum(1).tolist()
        pruned = w.clone()
        triton_prune(pruned, s, None, pattern, return_mask=False)
        assert torch.equal(pruned, w.masked_fill(~ref, 0))
    assert len(calls) == 4
    keep = triton_prune(torch.ones(2, 8, device=DEVICE), FusedScore(), None, "2:4", inplace=False)
    assert keep.tolist() == [[False, False, True, True] * 2] * 2


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "3:4"])
def test_split4_nan_groups(pattern, tk, split4):
    calls = split4(64)
    cols = 200
    scores = tie_scores(6, cols, seed=3)
    scores[1, 5] = float("nan")  # group 1
    scores[1, 40:43] = float("nan")  # group 10, three of four
    scores[4, 199] = float("nan")  # the last group
    nan_groups = torch.zeros(6, cols // 4, dtype=torch.bool, device=DEVICE)
    nan_groups[1, [1, 10]] = True
    nan_groups[4, 49] = True
    # The mask and the weights are the pairwise kernel's, NaN groups included.
    got = launch_mask(tk, scores, pattern, "split4", block=64)
    want = launch_mask(tk, scores, pattern, "pairwise")
    assert got[3] == want[3] == 5  # every NaN score counted
    assert torch.equal(got[0], want[0])
    assert torch.equal(got[1], want[1])
    # NaN groups keep their weights; the others are the reference's pruning.
    keep, weight, before, _ = got
    untouched = nan_groups.repeat_interleave(4, dim=1)
    assert torch.equal(weight[untouched], before[untouched])
    ref = keep_mask_from_scores(scores.masked_fill(scores.isnan(), 0.0), None, pattern)
    ok = ~untouched
    assert torch.equal(keep[ok], ref[ok])
    assert torch.equal(weight[ok], before.masked_fill(~ref, 0)[ok])
    # Through triton_prune: raise, NaN groups left, the rest pruned.
    w = before.clone()
    with pytest.raises(ValueError, match="contain NaN"):
        triton_prune(w, scores, None, pattern)
    assert torch.equal(w, weight)
    assert len(calls) == 1


def test_split4_knobs_and_errors(tk, split4):
    assert tk.NM_IMPLS[0] == "pairwise" and "split4" in tk.NM_IMPLS
    scores = tie_scores(6, 16, seed=0)
    for block in (4, 8, 4096):  # one group a program, ... , one program a row
        keep, *_ = launch_mask(tk, scores, "2:4", "split4", block=block)
        assert torch.equal(keep, keep_mask_from_scores(scores, None, "2:4")), block
    with pytest.raises(ValueError, match="nm_impl must be one of"):
        launch_mask(tk, scores, "2:4", "radix")
    with pytest.raises(ValueError, match="power of two"):
        launch_mask(tk, scores, "2:4", "split4", block=12)
    split4(None)
    with pytest.raises(ValueError, match="needs M = 4"):
        triton_prune(random_weight(2, 16), FusedScore(), None, "4:8")


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8"])
def test_nm_default_and_pairwise_match_reference(pattern, tk):
    # M = 4 runs split4 by default; the pairwise kernel stays selectable (and is M = 8's).
    w = random_weight(6, 1544, torch.bfloat16, seed=5, levels=3)  # tie-heavy
    stats = random_stats(1544, seed=5)
    ref = reference_keep_mask(METHODS["wanda"], w, stats, None, pattern)
    spec = fused_score(METHODS["wanda"], w, stats)
    for impl in (None, "pairwise"):
        keep = triton_prune(w, spec, None, pattern, inplace=False, nm_impl=impl, nm_block=None)
        assert torch.equal(keep, ref), (pattern, impl)
    if pattern == "4:8":
        with pytest.raises(ValueError, match="needs M = 4"):
            triton_prune(w, spec, None, pattern, inplace=False, nm_impl="split4")
