"""CausalLMModule: training step, perplexity that matches the engine's, optimizer settings."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer

from optishear_lightning.datamodule import TextDataModule
from optishear_lightning.evaluation import perplexity
from optishear_lightning.module import CausalLMModule, batch_input_ids

from .conftest import SHARED_DATA, requires_shared_data, requires_smollm2, tiny_llama
from .test_callback import datamodule, tokens

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


def quiet_trainer(tmp_path, **kwargs):
    return Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, **kwargs,
    )  # fmt: skip


def test_validation_perplexity_equals_engine_perplexity(tmp_path):
    model = tiny_llama(layers=2)
    text = tokens(32 * 6, seed=4)
    module = CausalLMModule(model)
    dm = datamodule(val_data=text)
    result = quiet_trainer(tmp_path).validate(module, datamodule=dm, verbose=False)
    expected = perplexity(model, text, seq_len=32)
    assert result[0]["val/ppl"] == pytest.approx(expected, rel=1e-5)


def test_training_lowers_the_loss(tmp_path):
    torch.manual_seed(0)
    module = CausalLMModule(tiny_llama(layers=2), learning_rate=3e-3, warmup_steps=2)
    data = tokens(4, 32, seed=9).repeat(4, 1)  # a tiny set the model can memorise
    dm = datamodule(train_data=data, val_data=data.reshape(-1))
    before = quiet_trainer(tmp_path).validate(module, datamodule=dm, verbose=False)[0]["val/ppl"]
    quiet_trainer(tmp_path, max_steps=30).fit(module, datamodule=dm)
    after = quiet_trainer(tmp_path).validate(module, datamodule=dm, verbose=False)[0]["val/ppl"]
    assert after < 0.5 * before


def test_trainable_freezes_everything_else():
    module = CausalLMModule(tiny_llama(layers=2), trainable=["mlp"])
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable and all("mlp" in n for n in trainable)
    with pytest.raises(ValueError, match="matches no parameter"):
        CausalLMModule(tiny_llama(layers=2), trainable=["no_such_layer"])


def test_optimizer_and_warmup_schedule():
    module = CausalLMModule(tiny_llama(layers=2), learning_rate=1e-3, warmup_steps=4)
    config = module.configure_optimizers()
    optimizer = config["optimizer"]
    assert isinstance(optimizer, torch.optim.AdamW)
    assert config["lr_scheduler"]["interval"] == "step"
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 / 4)


@pytest.mark.parametrize(
    "batch",
    [tokens(2, 8), {"input_ids": tokens(2, 8)}, (tokens(2, 8), tokens(2))],
)
def test_batch_input_ids_accepts_common_layouts(batch):
    assert batch_input_ids(batch).shape == (2, 8)


def test_bad_arguments():
    with pytest.raises(ValueError, match="learning_rate"):
        CausalLMModule(tiny_llama(layers=1), learning_rate=0)
    with pytest.raises(ValueError, match="zero_shot_dir"):
        CausalLMModule(tiny_llama(layers=1), zero_shot_tasks=["piqa"])
    with pytest.raises(ValueError, match="input_ids"):
        batch_input_ids({"ids": tokens(2, 8)})


@requires_smollm2
@requires_shared_data
@pytest.mark.slow
def test_zero_shot_accuracy_is_logged_at_test_end(tmp_path, smollm2_dir):
    module = CausalLMModule(
        str(smollm2_dir),
        zero_shot_tasks=["arc_easy", "piqa"],
        zero_shot_dir=str(SHARED_DATA / "zeroshot"),
        zero_shot_limit=4,
    )
    dm = TextDataModule(
        str(smollm2_dir), train_data=None, val_data=None, calibration_data=None,
        test_data=SHARED_DATA / "wikitext2" / "wiki.test.raw", seq_len=32, test_windows=2,
    )  # fmt: skip
    result = quiet_trainer(tmp_path).test(module, datamodule=dm, verbose=False)[0]
    for task in ("arc_easy", "piqa"):
        assert 0.0 <= result[f"test/{task}_acc"] <= 1.0
        assert 0.0 <= result[f"test/{task}_acc_norm"] <= 1.0
    assert result["test/ppl"] > 1.0


def test_cli_module_takes_the_model_by_name_and_is_a_causal_lm_module(tmp_path):
    from optishear_lightning.cli import CLICausalLMModule

    tiny_llama(layers=2).save_pretrained(tmp_path / "tiny")
    module = CLICausalLMModule(str(tmp_path / "tiny"), learning_rate=1e-3, warmup_steps=2)
    assert isinstance(module, CausalLMModule)
    assert module.hparams["model"] == str(tmp_path / "tiny")
    assert module.hparams["learning_rate"] == 1e-3 and module.hparams["warmup_steps"] == 2
    assert module.model_name == str(tmp_path / "tiny")
