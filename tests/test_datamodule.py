"""TextDataModule: splits from the engine's sources, calibration loader, validation."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from optishear_lightning.datamodule import TextDataModule

from .conftest import (
    SHARED_DATA,
    WORD_BOS,
    requires_shared_data,
    requires_smollm2,
    word_text,
    word_tokenizer,
)


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


# --------------------------------------------------------------------------------------------
# A BOS token at the start of every window (bos_per_window)


def word_sources(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text(
        "".join(json.dumps({"text": word_text(n, seed=n)}) + "\n" for n in (40, 70, 55, 90)),
        encoding="utf-8",
    )
    stream = tmp_path / "stream.txt"
    stream.write_text(word_text(200, seed=7), encoding="utf-8")
    return dict(
        train_data=docs, calibration_data=docs, val_data=stream, test_data=stream,
        seq_len=16, train_samples=4, calibration_samples=3, val_windows=5, seed=0,
    )  # fmt: skip


@pytest.mark.parametrize("setting", [True, False])
def test_bos_per_window_passes_through_every_split(tmp_path, setting):
    from optishear_lightning.data import calibration_windows, evaluation_tokens, evaluation_windows

    tok = word_tokenizer()
    sources = word_sources(tmp_path)
    dm = TextDataModule(tok, **sources, bos_per_window=setting)
    docs, stream = sources["calibration_data"], sources["val_data"]
    expected = {
        "train": calibration_windows(docs, tok, 4, 16, seed=1, bos_per_window=setting),
        "calibration": calibration_windows(docs, tok, 3, 16, seed=0, bos_per_window=setting),
        "val": evaluation_windows(
            evaluation_tokens(stream, tok), 16, 5, bos_token_id=WORD_BOS if setting else None
        ),
    }
    for name, windows in expected.items():
        assert torch.equal(dm.split(name), windows), name
        if setting:
            assert torch.all(dm.split(name)[:, 0] == WORD_BOS), name
    if not setting:  # off: the literature's consecutive windows
        tokens = evaluation_tokens(stream, tok)
        assert torch.equal(dm.split("val"), tokens[: 5 * 16].reshape(5, 16))
    assert next(iter(dm.calibration_dataloader())).shape[1] == 16


@pytest.mark.parametrize("family", ["gemma", "llama"])
def test_bos_per_window_default_follows_the_model(tmp_path, family):
    from .test_models import BOS_FAMILIES, make_model

    on = family in BOS_FAMILIES
    tok = word_tokenizer()
    # A bound model (what the CLI does once the model is loaded)...
    dm = TextDataModule(tok, **word_sources(tmp_path))
    dm.bind_model(make_model(family))
    assert torch.all(dm.split("val")[:, 0] == WORD_BOS) == on
    assert dm.window_bos_id() == (WORD_BOS if on else None)
    # ... the Trainer's model...
    dm = TextDataModule(tok, **word_sources(tmp_path))
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(model=make_model(family)))
    assert dm.window_bos_id() == (WORD_BOS if on else None)
    # ... or the config of the model that `tokenizer` names.
    model_dir = tmp_path / f"tiny-{family}"
    make_model(family).config.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    dm = TextDataModule(str(model_dir), **word_sources(tmp_path))
    assert dm.window_bos_id() == (WORD_BOS if on else None)
    assert torch.all(dm.split("calibration")[:, 0] == WORD_BOS) == on


def test_bos_per_window_needs_a_bos_token():
    dm = TextDataModule(None, val_data=torch.arange(3, 60), seq_len=8, bos_per_window=True)
    with pytest.raises(ValueError, match=r"data\.bos_per_window=False"):
        dm.split("val")
    dm = TextDataModule(word_tokenizer(bos=False), val_data=torch.arange(3, 60), seq_len=8)
    from .test_models import make_model

    dm.bind_model(make_model("gemma"))
    with pytest.raises(ValueError, match=r"gemma family.*data\.bos_per_window=False"):
        dm.split("val")
    with pytest.raises(ValueError, match="bos_per_window"):
        TextDataModule(None, bos_per_window="yes")
