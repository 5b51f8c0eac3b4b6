"""Tests for optishear_lightning.permutation: N:M channel permutation folded into the model."""

from __future__ import annotations

import pytest
import torch

from optishear_lightning.metrics import wanda_score
from optishear_lightning.models import channel_couplings, find_decoder_blocks, find_prunable_linears
from optishear_lightning.permutation import (
    apply_coupling_permutation,
    coupling_permutations,
    kept_nm_score,
    nm_channel_permutation,
)
from optishear_lightning.pruning import prune
from tests.test_models import FAMILY_NAMES, make_model, token_ids

# What each family lets us permute without changing the model: the MLP's down projection and,
# where the value projection is its own matrix, attention's output projection.
EXPECTED_CONSUMERS = {
    "llama": {"mlp.down_proj", "self_attn.o_proj"},
    "mistral": {"mlp.down_proj", "self_attn.o_proj"},
    "qwen2": {"mlp.down_proj", "self_attn.o_proj"},
    "qwen2_sliding": {"mlp.down_proj", "self_attn.o_proj"},
    "gemma": {"mlp.down_proj", "self_attn.o_proj"},
    "gemma2": {"mlp.down_proj", "self_attn.o_proj"},
    "gemma3": {"mlp.down_proj", "self_attn.o_proj"},
    "phi": {"mlp.fc2", "self_attn.dense"},
    "phi3": {"mlp.down_proj"},  # fused qkv: no separate value projection
    "gpt_neox": {"mlp.dense_4h_to_h"},  # fused, head-interleaved qkv
    "opt": {"fc2", "self_attn.out_proj"},
}


def _heavy_tailed(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(rows, cols, generator=g) * torch.rand(1, cols, generator=g) ** 4


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4)])
def test_permutation_is_valid_and_keeps_more(n, m):
    scores = _heavy_tailed(32, 64, seed=n + m)
    perm = nm_channel_permutation(scores, n, m)
    assert sorted(perm.tolist()) == list(range(64))
    assert kept_nm_score(scores[:, perm], n, m) > kept_nm_score(scores, n, m)


def test_refinement_never_loses_to_the_allocation_alone():
    scores = _heavy_tailed(16, 128, seed=3)
    allocated = kept_nm_score(scores[:, nm_channel_permutation(scores, 2, 4, 0)], 2, 4)
    refined = kept_nm_score(scores[:, nm_channel_permutation(scores, 2, 4, 2)], 2, 4)
    assert refined >= allocated


def test_identity_when_nothing_can_be_gained():
    # Every column is equally important: no layout keeps more than the original one.
    scores = torch.ones(4, 16)
    assert torch.equal(nm_channel_permutation(scores, 2, 4), torch.arange(16))
    with pytest.raises(ValueError, match="divisible by 4"):
        nm_channel_permutation(torch.ones(2, 6), 2, 4)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_couplings_found_for_every_family(family):
    model = make_model(family)
    _, blocks = find_decoder_blocks(model)
    couplings = channel_couplings(find_prunable_linears(blocks[0]), model.config)
    assert {c.consumer for c in couplings} == EXPECTED_CONSUMERS[family]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_permutation_leaves_the_dense_model_unchanged(family):
    model = make_model(family)
    ids = token_ids()
    with torch.no_grad():
        before = model(ids).logits
    _, blocks = find_decoder_blocks(model)
    for seed, block in enumerate(blocks):
        linears = find_prunable_linears(block)
        for coupling in channel_couplings(linears, model.config):
            consumer = linears[coupling.consumer]
            scores = _heavy_tailed(consumer.out_features, consumer.in_features, seed)
            perms = coupling_permutations(coupling, scores, 2, 4)
            assert not torch.equal(perms[0], torch.arange(perms[0].numel()))
            apply_coupling_permutation(linears, coupling, *perms)
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def _nm_exact(weight: torch.Tensor, n: int, m: int) -> bool:
    groups = weight.reshape(weight.shape[0], -1, m)
    return bool(((groups != 0).sum(-1) <= n).all())


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt", "phi3"])
def test_prune_with_permute_keeps_exact_nm_masks(family):
    ids = token_ids(batch=8)
    plain, permuted = make_model(family), make_model(family)
    prune(plain, ids, "wanda", None, "2:4")
    result = prune(permuted, ids, "wanda", None, "2:4", permute=True)
    params = dict(permuted.named_parameters())
    for name, keep in result.masks.items():
        kept = keep.reshape(keep.shape[0], -1, 4).sum(-1)
        assert bool((kept == 2).all()), name
        assert not bool((params[name][~keep] != 0).any()), name
    assert all(v == pytest.approx(0.5) for v in result.layer_sparsity.values())
    assert any(
        not torch.equal(a, b)
        for a, b in zip(plain.parameters(), permuted.parameters(), strict=True)
    )


def test_permute_raises_the_kept_wanda_score_of_the_consumers():
    ids = token_ids(batch=8)
    model = make_model("llama")
    _, blocks = find_decoder_blocks(model)
    linears = find_prunable_linears(blocks[0])
    couplings = channel_couplings(linears, model.config)
    from optishear_lightning.calibration import StatsCollector, capture_block_inputs, run_block

    inputs = capture_block_inputs(model, [ids], "cpu")
    with StatsCollector(linears) as collector, torch.no_grad():
        run_block(blocks[0], inputs.hidden[0], inputs.calls[0][0], "cpu")
    for coupling in couplings:
        weight = linears[coupling.consumer].weight
        scores = wanda_score(weight, collector.stats[coupling.consumer])
        consumer_perm, _ = coupling_permutations(coupling, scores, 2, 4)
        assert kept_nm_score(scores[:, consumer_perm], 2, 4) >= kept_nm_score(scores, 2, 4)


def test_permute_needs_an_nm_pattern_and_touches_nothing_when_refused():
    model = make_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="N:M"):
        prune(model, token_ids(), "wanda", 0.5, permute=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_failed_permuted_prune_restores_weights_and_biases():
    model = make_model("qwen2")  # q/k/v biases: the permutation moves the value bias
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, blocks = find_decoder_blocks(model)

    def boom(*_):
        raise KeyboardInterrupt

    blocks[-1].register_forward_pre_hook(boom)
    with pytest.raises(KeyboardInterrupt):
        prune(model, token_ids(), "wanda", None, "2:4", permute=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
