"""Sparse fine-tuning masks: bit packing, enforcement on weights and gradients, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from optishear_lightning.sparse_masks import SparseMasks, pack_bits, unpack_bits


@pytest.mark.parametrize("shape", [(1,), (3, 5), (8, 8), (7, 13)])
def test_pack_unpack_roundtrip(shape):
    keep = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_bits(keep)
    assert packed.dtype == torch.uint8 and packed.numel() == (keep.numel() + 7) // 8
    assert torch.equal(unpack_bits(packed, shape), keep)


def test_pack_bits_is_msb_first_like_numpy():
    keep = torch.tensor([True, False, False, False, False, False, False, True, True])
    assert pack_bits(keep).tolist() == [0b10000001, 0b10000000]


def test_unpack_refuses_wrong_size():
    with pytest.raises(ValueError, match=r"another model|does not belong"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), (8, 8))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))


def test_masks_keep_pruned_weights_zero_through_adamw_steps():
    model = _model()
    keep = {"0.weight": torch.rand(6, 8) > 0.5, "2.weight": torch.rand(4, 6) > 0.3}
    masks = SparseMasks(model, keep)
    masks.apply_()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(5):
        loss = model(torch.randn(16, 8)).pow(2).sum()
        loss.backward()
        masks.mask_gradients_()
        assert (model[0].weight.grad[~keep["0.weight"]] == 0).all()
        opt.step()
        masks.apply_()
        opt.zero_grad()
    assert masks.violations() == 0
    assert (model[0].weight[keep["0.weight"]] != 0).all()  # kept weights did train
    expected = 1 - (keep["0.weight"].sum() + keep["2.weight"].sum()).item() / (48 + 24)
    assert masks.sparsity() == pytest.approx(expected)


def test_without_masking_the_zeros_would_move():
    """The enforcement is what keeps zeros: plain AdamW steps revive pruned weights."""
    model = _model()
    keep = {"0.weight": torch.rand(6, 8) > 0.5}
    masks = SparseMasks(model, keep)
    masks.apply_()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(16, 8)).pow(2).sum().backward()
    opt.step()
    assert masks.violations() > 0


def test_packed_roundtrip_rebuilds_identical_masks():
    model = _model()
    keep = {"2.weight": torch.rand(4, 6) > 0.5}
    restored = SparseMasks.from_packed(model, SparseMasks(model, keep).packed())
    assert torch.equal(restored.keep_mask("2.weight"), keep["2.weight"])


def test_masks_for_another_model_are_refused():
    model = _model()
    with pytest.raises(ValueError, match="another model"):
        SparseMasks(model, {"5.weight": torch.ones(4, 6, dtype=torch.bool)})
    with pytest.raises(ValueError, match="another model"):
        SparseMasks(model, {"2.weight": torch.ones(6, 4, dtype=torch.bool)})


def test_finetuning_path_is_deprecated_but_works():
    # The old module keeps its names for one release, each use with a DeprecationWarning.
    import optishear_lightning
    from optishear_lightning import finetuning

    with pytest.warns(DeprecationWarning, match="moved to optishear_lightning.sparse_masks"):
        from optishear_lightning.finetuning import SparseMasks as Old
    assert Old is SparseMasks
    with pytest.warns(DeprecationWarning):
        assert finetuning.pack_bits is pack_bits
    with pytest.raises(AttributeError):
        finetuning.no_such_name  # noqa: B018
    assert optishear_lightning.SparseMasks is SparseMasks  # the package root: no warning
