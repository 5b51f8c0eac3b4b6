import pytest
import torch

from optishear_lightning.masks import (
    SparsityPattern,
    apply_keep_mask,
    keep_mask_from_scores,
    num_pruned,
    parse_pattern,
    validate_sparsity,
)


def test_parse_pattern():
    assert parse_pattern("unstructured") == SparsityPattern()
    assert parse_pattern("2:4") == SparsityPattern(2, 4)
    assert parse_pattern(" 4 : 8 ").sparsity == 0.5
    assert str(parse_pattern("2:4")) == "2:4"
    for bad in ["4:4", "5:4", "0:4", "2-4", "structured"]:
        with pytest.raises(ValueError):
            parse_pattern(bad)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "half"])
def test_validate_sparsity_rejects(bad):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        validate_sparsity(bad)


def test_num_pruned_is_robust_to_float_error():
    assert num_pruned(100, 0.29) == 29
    assert num_pruned(576, 0.5) == 288
    assert num_pruned(10, 0.0) == 0


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.55, 0.7])
@pytest.mark.parametrize("cols", [7, 64, 96])
def test_row_mask_exact_counts(sparsity, cols):
    scores = torch.randn(13, cols)
    keep = keep_mask_from_scores(scores, sparsity)
    assert (keep.logical_not().sum(1) == num_pruned(cols, sparsity)).all()
    # Every pruned score is <= every kept score of its row.
    for row, k in zip(scores, keep, strict=True):
        if (~k).any() and k.any():
            assert row[~k].max() <= row[k].min()


def test_layer_mask_exact_count():
    scores = torch.randn(9, 31)
    keep = keep_mask_from_scores(scores, 0.4, group="layer")
    assert (~keep).sum() == num_pruned(9 * 31, 0.4)
    assert scores[~keep].max() <= scores[keep].min()


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_nm_mask_exact_per_group(pattern):
    pat = parse_pattern(pattern)
    scores = torch.randn(6, 32)
    keep = keep_mask_from_scores(scores, None, pattern)
    groups = keep.reshape(6, -1, pat.m)
    assert (groups.sum(-1) == pat.n).all()
    sg = scores.reshape(6, -1, pat.m)
    kept_min = torch.where(groups, sg, torch.inf).amin(-1)
    pruned_max = torch.where(~groups, sg, -torch.inf).amax(-1)
    assert (pruned_max <= kept_min).all()


def test_ties_prune_lower_index_first():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.5, 1.0]])
    keep = keep_mask_from_scores(scores, 0.5)
    # 0.5 goes first, then the two lowest-indexed of the tied ones.
    assert keep.tolist() == [[False, False, True, True, False, True]]
    nm = keep_mask_from_scores(torch.ones(1, 8), None, "2:4")
    assert nm.tolist() == [[False, False, True, True, False, False, True, True]]


def test_deterministic_with_heavy_ties():
    torch.manual_seed(0)
    scores = torch.randint(0, 4, (32, 576)).float()  # quantised-like: many ties
    a = keep_mask_from_scores(scores, 0.5)
    b = keep_mask_from_scores(scores.clone(), 0.5)
    assert torch.equal(a, b)


def test_errors():
    with pytest.raises(ValueError, match="NaN"):
        keep_mask_from_scores(torch.tensor([[float("nan"), 1.0]]), 0.5)
    with pytest.raises(ValueError, match="divisible"):
        keep_mask_from_scores(torch.randn(2, 6), None, "2:4")
    with pytest.raises(ValueError, match="group"):
        keep_mask_from_scores(torch.randn(2, 8), 0.5, group="column")


def test_apply_keep_mask_in_place():
    w = torch.ones(2, 4)
    keep = torch.tensor([[True, False, True, False], [False, True, True, True]])
    out = apply_keep_mask(w, keep)
    assert out is w
    assert w.tolist() == [[1, 0, 1, 0], [0, 1, 1, 1]]
