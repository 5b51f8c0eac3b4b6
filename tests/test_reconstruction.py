"""Weight reconstruction on a fixed mask: lower layer error, exact masks, clear errors."""

from __future__ import annotations

import pytest
import torch

from optishear_lightning.calibration import run_sequential
from optishear_lightning.masks import keep_mask_from_scores, parse_pattern
from optishear_lightning.models import find_decoder_blocks, find_prunable_linears
from optishear_lightning.pruning import prune
from optishear_lightning.reconstruction import (
    check_reconstruction,
    layer_error,
    reconstruct_weight,
)
from optishear_lightning.sparsegpt import inverse_hessian_factor

from .conftest import tiny_llama

pytestmark = pytest.mark.usefixtures("single_thread")

IDS = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))


def layer_problem(seed: int = 0, rows: int = 48, cols: int = 64, tokens: int = 512):
    """A weight, correlated inputs with a few large channels, and the Gram matrix."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=gen) / cols**0.5
    x = torch.randn(tokens, cols, generator=gen) @ (torch.eye(cols) + mix)
    x[:, :4] *= 8
    return torch.randn(rows, cols, generator=gen), x.t() @ x


@pytest.mark.parametrize("method", ["obs", "lsq"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_reconstruction_lowers_the_layer_error_and_keeps_the_mask(method, pattern):
    weight, gram = layer_problem()
    pat = parse_pattern(pattern)
    scores = weight.abs() * torch.diag(gram).sqrt()  # Wanda's score
    keep = keep_mask_from_scores(scores, None if pat.is_nm else 0.5, pat)
    masked = weight * keep
    new = reconstruct_weight(method, weight, gram, keep)
    assert torch.equal(new != 0, keep) or (new[~keep] == 0).all()
    assert (new[~keep] == 0).all()
    before, after = layer_error(weight, masked, gram), layer_error(weight, new, gram)
    assert after < before


def test_lsq_is_the_least_squares_optimum_for_the_mask():
    weight, gram = layer_problem(rows=6, cols=24)
    keep = keep_mask_from_scores(weight.abs(), 0.5, parse_pattern("unstructured"))
    new = reconstruct_weight("lsq", weight, gram, keep, lsq_rtol=1e-7).double()
    damped = gram.double() + 0.01 * torch.diag(gram).mean().double() * torch.eye(24)
    for r in range(6):  # direct solve of H_KK v = (H w)_K per row
        k = keep[r]
        rhs = (weight[r].double() @ damped)[k]
        expected = torch.linalg.solve(damped[k][:, k], rhs)
        torch.testing.assert_close(new[r, k], expected, rtol=1e-4, atol=1e-6)  # float32
    obs = reconstruct_weight("obs", weight, gram, keep)
    assert layer_error(weight, new.float(), gram) <= layer_error(weight, obs, gram) * (1 + 1e-5)


def test_singular_hessian_is_dampened_with_a_warning_never_nan():
    weight, _ = layer_problem(rows=8, cols=16)
    x = torch.randn(64, 1).expand(64, 16).clone()  # every input channel identical: rank 1
    gram = x.t() @ x
    keep = keep_mask_from_scores(weight.abs(), 0.5, parse_pattern("unstructured"))
    with pytest.warns(RuntimeWarning, match="singular"):
        inverse_hessian_factor(gram, percdamp=0.0)
    for method in ("obs", "lsq"):
        new = reconstruct_weight(method, weight, gram, keep, percdamp=0.0)
        assert torch.isfinite(new).all()


def test_hessian_with_nan_is_a_clear_error():
    gram = torch.full((4, 4), float("nan"))
    with pytest.raises(FloatingPointError, match="not positive definite"):
        inverse_hessian_factor(gram)


@pytest.mark.parametrize("method", ["wanda", "ria", "magnitude"])
@pytest.mark.parametrize("reconstruct", ["obs", "lsq"])
def test_prune_with_reconstruction_keeps_exact_masks_and_lowers_block_error(method, reconstruct):
    plain, rebuilt = tiny_llama(), tiny_llama()
    masks = prune(plain, IDS, method, 0.5).masks
    result = prune(rebuilt, IDS, method, 0.5, reconstruct=reconstruct)
    assert result.method == f"{method}+{reconstruct}"
    params = dict(rebuilt.named_parameters())
    for name, keep in result.masks.items():
        if ".layers.0." in name:  # later blocks see reconstructed inputs, so other masks
            assert torch.equal(keep, masks[name])
        assert (params[name][~keep] == 0).all()
        assert (keep.sum(1) == keep.shape[1] // 2).all()
    # The first block sees the same inputs either way: each layer's output error is lower.
    dense = tiny_llama()
    grams = first_block_grams(dense)
    for name, gram in grams.items():
        w0 = dense.get_parameter(name)
        assert layer_error(w0, rebuilt.get_parameter(name), gram) < layer_error(
            w0, plain.get_parameter(name), gram
        )


def first_block_grams(model) -> dict[str, torch.Tensor]:
    blocks_name, blocks = find_decoder_blocks(model)
    names = {
        id(lin): f"{blocks_name}.0.{n}.weight"
        for n, lin in find_prunable_linears(blocks[0]).items()
    }
    lins = {n: lin for n, lin in find_prunable_linears(blocks[0]).items()}
    grams: dict[str, torch.Tensor] = {}

    def collect(index, block_name, block, stats):
        if index == 0:
            for n, st in stats.items():
                grams[names[id(lins[n])]] = st.gram
        return False

    run_sequential(model, [IDS], collect, gram_for=lambda n, m: True)
    return grams


def test_reconstruct_with_nm_and_sparsegpt():
    model = tiny_llama()
    result = prune(model, IDS, "wanda", None, "2:4", reconstruct="lsq")
    for name, keep in result.masks.items():
        assert (keep.view(keep.shape[0], -1, 4).sum(-1) == 2).all(), name
    prune(tiny_llama(), IDS, "sparsegpt", 0.5, reconstruct="lsq")  # runs on SparseGPT's mask


def test_bad_reconstruction_settings_fail_before_any_weight_changes():
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="Unknown reconstruction"):
        prune(model, IDS, "wanda", 0.5, reconstruct="admm")
    with pytest.raises(ValueError, match="needs calibration data"):
        prune(model, None, "magnitude", 0.5, reconstruct="obs")
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
    assert check_reconstruction("none") is None and check_reconstruction("OBS") == "obs"
