import json
import os
import stat

import numpy as np
import pytest
import torch

from optishear_lightning.models import find_decoder_blocks, find_prunable_linears
from optishear_lightning.pruning import (
    EXPORT_MARKER,
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


def test_overwrite_replaces_only_an_earlier_export(tmp_path):
    model = tiny_llama()
    out = save_pruned_model(model, tmp_path / "pruned")
    (out / "stale.txt").write_text("from the earlier export")
    again = save_pruned_model(model, out, overwrite=True)
    assert (again / "model.safetensors").is_file() and not (again / "stale.txt").exists()
    assert (again / EXPORT_MARKER).is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["pruned"]  # nothing left beside it


def test_overwrite_never_deletes_a_users_directory(tmp_path):
    run_root = tmp_path / "run"
    (run_root / "checkpoints").mkdir(parents=True)
    (run_root / "checkpoints" / "last.ckpt").write_text("weights")
    (run_root / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an earlier optishear export"):
        check_output_dir(run_root, overwrite=True)
    with pytest.raises(FileExistsError, match=str(run_root)):
        save_pruned_model(tiny_llama(), run_root, overwrite=True)
    assert (run_root / "checkpoints" / "last.ckpt").read_text() == "weights"
    assert (run_root / "notes.txt").read_text() == "mine"


def test_overwrite_of_a_file_is_a_clear_error(tmp_path):
    target = tmp_path / "model.bin"
    target.write_text("not a directory")
    with pytest.raises(FileExistsError, match="is not a directory"):
        save_pruned_model(tiny_llama(), target, overwrite=True)
    assert target.read_text() == "not a directory"


def test_export_respects_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        out = save_pruned_model(tiny_llama(), tmp_path / "shared")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o644


def test_failed_overwrite_keeps_the_earlier_export(tmp_path, monkeypatch):
    model = tiny_llama()
    out = save_pruned_model(model, tmp_path / "pruned")
    before = (out / "model.safetensors").read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(model, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        save_pruned_model(model, out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["pruned"]


@pytest.mark.parametrize(
    "sparsity", [np.float32(0.5), np.float64(0.5), torch.tensor(0.5), {"0": 0.5, 1: 0.5}]
)
def test_numeric_scalars_and_yaml_style_keys_are_accepted(sparsity):
    assert resolve_block_sparsities(sparsity, 2) == [0.5, 0.5]


@pytest.mark.parametrize(
    ("sparsity", "match"),
    [
        ("abc", "not the text 'abc'"),
        ("0.5", "not the text '0.5'"),
        ({"abc": 0.5, 1: 0.5}, "block indices"),
        ({1.5: 0.5, 0: 0.5}, "block indices"),
        ({0: 0.5, 1: 0.5, 7: 0.5}, "names block 7"),
        ([0.5, "x"], "number"),
    ],
)
def test_bad_sparsity_specs_are_clear_errors(sparsity, match):
    model = tiny_llama()
    before = weights(model)
    with pytest.raises(ValueError, match=match):
        prune(model, IDS, "wanda", sparsity)
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("calibration", "match"),
    [
        (torch.full((2, 16), 5000), r"outside the model's vocabulary \[0, 127\]"),
        (torch.full((2, 16), -1), "outside the model's vocabulary"),
        ([IDS[0], torch.tensor([], dtype=torch.long)], "item 1 is empty"),
    ],
)
def test_bad_calibration_tokens_are_clear_errors(calibration, match):
    model = tiny_llama()
    before = weights(model)
    with pytest.raises(ValueError, match=match):
        prune(model, calibration, "wanda", 0.5)
    assert_unchanged(model, before)


def test_windows_longer_than_the_models_positions_are_refused():
    model = tiny_llama()  # max_position_embeddings=256
    with pytest.raises(ValueError, match=r"max_position_embeddings \(256\)"):
        prune(model, torch.zeros(1, 300, dtype=torch.long), "wanda", 0.5)


def _dispatched_tiny_llama(layers: int = 4):
    """A tiny model dispatched by accelerate, every module on the CPU: the hook path runs."""
    from accelerate import dispatch_model

    names = ["model.embed_tokens", "model.rotary_emb", "model.norm", "lm_head"]
    device_map = {name: "cpu" for name in names} | {
        f"model.layers.{i}": "cpu" for i in range(layers)
    }
    return dispatch_model(tiny_llama(0, layers=layers), device_map=device_map, force_hooks=True)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_a_model_dispatched_by_accelerate_prunes_like_the_plain_model(method):
    from optishear_lightning.models import is_dispatched

    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    plain, dispatched = tiny_llama(0, layers=4), _dispatched_tiny_llama(4)
    assert is_dispatched(dispatched) and not is_dispatched(plain)
    expected = prune(plain, ids, method, 0.5)
    got = prune(dispatched, ids, method, 0.5)
    assert expected.masks.keys() == got.masks.keys()
    for name, keep in expected.masks.items():
        assert torch.equal(keep, got.masks[name]), name
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, dispatched(ids).logits)


def test_the_search_takes_a_model_dispatched_by_accelerate():
    from optishear_lightning.search import optishear_search
    from optishear_lightning.search.space import MAGNITUDE, WANDA

    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    settings = dict(
        metric_candidates=[WANDA, MAGNITUDE], budget=10, pop_size=4, proxy_blocks=1,
        metric_topk=1, objective_samples=2, objective_seq_len=16, validation_samples=2,
        baselines=[], progress=False,
    )  # fmt: skip
    plain = optishear_search(tiny_llama(0, layers=4), ids, 0.5, **settings)
    dispatched = optishear_search(_dispatched_tiny_llama(4), ids, 0.5, **settings)
    assert dispatched.history == plain.history
    assert (dispatched.metric, dispatched.ratios) == (plain.metric, plain.ratios)


def test_calibration_is_normalised_once():
    from optishear_lightning.pruning import CalibrationBatches, as_calibration_batches

    ids = torch.randint(0, 128, (10, 16), generator=torch.Generator().manual_seed(0))
    batches = as_calibration_batches([{"input_ids": ids[:6]}, (ids[6:], None)], batch_size=4)
    assert isinstance(batches, CalibrationBatches) and [b.shape[0] for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat(batches), ids)
    assert as_calibration_batches(batches, 4) is batches  # flows down without re-batching
    assert [b.shape[0] for b in as_calibration_batches(batches, 8)] == [8, 2]
