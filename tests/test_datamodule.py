"""TextDataModule: splits from the engine's sources, calibration loader, validation."""

from __future__ import annotations

import pytest
import torch

from optishear_lightning.datamodule import TextDataModule

from .conftest import SHARED_DATA, requires_shared_data, requires_smollm2


def test_tensor_sources_make_windows_and_loaders():
    gen = torch.Generator().manual_seed(0)
    dm = TextDataModule(
        None,
        train_data=torch.randint(0, 50, (10, 16), generator=gen),
        val_data=torch.arange(100),
        test_data=None,
        calibration_data=torch.randint(0, 50, (6, 16), generator=gen),
        seq_len=16,
        batch_size=4,
        eval_batch_size=3,
        val_windows=4,
    )
    val = dm.split("val")
    assert val.shape == (4, 16) and torch.equal(val.reshape(-1), torch.arange(64))
    assert next(iter(dm.train_dataloader())).shape == (4, 16)
    assert next(iter(dm.val_dataloader())).shape == (3, 16)
    assert dm.test_dataloader() == []
    calib = torch.cat(list(dm.calibration_dataloader()))
    assert calib.shape == (6, 16)


def test_no_calibration_source_means_the_callback_generates():
    dm = TextDataModule(
        None, train_data=None, val_data=None, test_data=None, calibration_data="self"
    )
    assert dm.calibration_dataloader() is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(seq_len=1), "at least 2"),
        (dict(batch_size=0), "batch_size"),
        (dict(val_windows=0), "val_windows"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TextDataModule(None, **kwargs)


def test_text_shorter_than_a_window_is_refused():
    dm = TextDataModule(None, val_data=torch.arange(10), seq_len=16)
    with pytest.raises(ValueError, match="fewer than one window"):
        dm.split("val")


@requires_smollm2
@requires_shared_data
def test_local_files_follow_the_literature_protocol():
    from optishear_lightning.data import calibration_windows, evaluation_tokens
    from optishear_lightning.models import load_tokenizer

    c4 = SHARED_DATA / "c4" / "c4-train.00000-of-01024.head1041.jsonl"
    wiki = SHARED_DATA / "wikitext2" / "wiki.test.raw"
    dm = TextDataModule(
        "smollm2-135m", train_data=c4, val_data=wiki, calibration_data=c4,
        seq_len=64, train_samples=4, calibration_samples=3, val_windows=5, seed=0,
    )  # fmt: skip
    tok = load_tokenizer("smollm2-135m")
    assert torch.equal(dm.split("calibration"), calibration_windows(c4, tok, 3, 64, seed=0))
    train = dm.split("train")
    assert train.shape == (4, 64) and not torch.equal(train[:3], dm.split("calibration"))
    expected = evaluation_tokens(wiki, tok, seq_len=64)[: 5 * 64].reshape(5, 64)
    assert torch.equal(dm.split("val"), expected)


def test_missing_data_files_fail_when_the_datamodule_is_built(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data\.calibration_data"):
        TextDataModule(tokenizer=None, calibration_data=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match=r"data\.val_data"):
        TextDataModule(tokenizer=None, val_data="not a known source")
