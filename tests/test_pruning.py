import json

import pytest
import torch

from optishear_lightning.models import find_decoder_blocks, find_prunable_linears
from optishear_lightning.pruning import (
    as_calibration_batches,
    check_output_dir,
    prune,
    resolve_block_sparsities,
    save_pruned_model,
)

from .conftest import tiny_llama

IDS = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_unchanged(model, before):
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"method": "obs"}, "Unknown pruning method"),
        ({"sparsity": 1.0}, r"\[0, 1\)"),
        ({"sparsity": -0.2}, r"\[0, 1\)"),
        ({"pattern": "4:2", "sparsity": None}, "N < M"),
        ({"pattern": "2:4", "sparsity": 0.7}, "fixes sparsity"),
        ({"pattern": "3:7", "sparsity": None}, "not divisible by M=7"),
        ({"sparsity": [0.5]}, "one ratio per block"),
        ({"sparsity": {0: 0.5}}, "missing"),
        ({"group": "column"}, "group"),
        ({"calibration": torch.empty(0, 16, dtype=torch.long)}, "empty"),
        ({"calibration": torch.zeros(3, 1, dtype=torch.long)}, "too short"),
        ({"calibration": torch.randn(2, 8)}, "integer token ids"),
        ({"calibration": "c4"}, "tokenizer"),
    ],
)
def test_bad_input_fails_before_any_change(kwargs, match):
    model = tiny_llama()
    before = weights(model)
    args = {"calibration": IDS, **kwargs}
    with pytest.raises(ValueError, match=match):
        prune(model, **args)
    assert_unchanged(model, before)


def test_no_blocks_error():
    with pytest.raises(ValueError, match="No decoder blocks"):
        prune(torch.nn.Sequential(torch.nn.Embedding(4, 4)), IDS)


def test_resolve_block_sparsities():
    assert resolve_block_sparsities(0.5, 3) == [0.5] * 3
    assert resolve_block_sparsities([0.4, 0.5, 0.6], 3) == [0.4, 0.5, 0.6]
    assert resolve_block_sparsities({"1": 0.6, 0: 0.4}, 2) == [0.4, 0.6]
    assert resolve_block_sparsities(None, 2, "2:4") == [0.5, 0.5]


def test_per_block_sparsity_applied():
    model = tiny_llama(layers=3)
    result = prune(model, IDS, "wanda", [0.3, 0.5, 0.7])
    _, blocks = find_decoder_blocks(model)
    for i, ratio in enumerate([0.3, 0.5, 0.7]):
        for lin in find_prunable_linears(blocks[i]).values():
            zeros = (lin.weight == 0).sum(1)
            assert (zeros == int(lin.in_features * ratio)).all()
    assert result.block_sparsity == [0.3, 0.5, 0.7]
    assert abs(result.overall_sparsity - 0.5) < 0.01


def test_magnitude_needs_no_calibration():
    model = tiny_llama()
    result = prune(model, None, "magnitude", 0.5)
    assert result.n_calibration_samples == 0
    assert abs(result.overall_sparsity - 0.5) < 1e-6


def test_calibration_batches():
    batches = as_calibration_batches([IDS[0], IDS[1:3], {"input_ids": IDS[3]}], batch_size=3)
    assert [b.shape for b in batches] == [torch.Size([3, 16]), torch.Size([1, 16])]
    mixed = as_calibration_batches([torch.zeros(8, dtype=torch.long), IDS[0]], batch_size=4)
    assert sorted(b.shape[1] for b in mixed) == [8, 16]


def test_result_and_masks_match_weights(tmp_path):
    model = tiny_llama()
    result = prune(model, IDS, "ria", 0.5)
    params = dict(model.named_parameters())
    for name, keep in result.masks.items():
        assert torch.equal(params[name] != 0, keep) or (params[name][~keep] == 0).all()
    summary = result.to_dict()
    assert "masks" not in summary
    json.dumps(summary)
    assert "ria" in result.summary()


def test_save_and_reload(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    result = prune(model, IDS, "wanda", 0.5)
    out = save_pruned_model(model, tmp_path / "pruned", result=result)
    assert (out / "model.safetensors").is_file()
    assert json.loads((out / "optishear_prune.json").read_text())["method"] == "wanda"
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, reloaded(IDS).logits)
    with pytest.raises(FileExistsError, match="overwrite"):
        save_pruned_model(model, out)
    with pytest.raises(FileExistsError):
        check_output_dir(out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    model = tiny_llama()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(model, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        save_pruned_model(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
