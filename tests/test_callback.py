"""OptiShearCallback on tiny random models: prune at fit start, sparse fine-tuning, checkpoints."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader

from optishear_lightning.callback import SEARCH_FILE, OptiShearCallback
from optishear_lightning.datamodule import TextDataModule
from optishear_lightning.models import named_prunable_linears
from optishear_lightning.module import CausalLMModule
from optishear_lightning.search import WANDA, MetaMetric, SearchConfig, SearchResult

from .conftest import tiny_llama

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

VOCAB = 128
TINY_SEARCH = dict(
    search=SearchConfig(
        budget=6,
        pop_size=4,
        proxy_blocks=1,
        metric_topk=1,
        objective_samples=2,
        objective_seq_len=16,
        validation_samples=2,
    )
)


def tokens(*shape, seed=0):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def datamodule(**kwargs):
    args = dict(
        tokenizer=None,
        train_data=tokens(16, 32, seed=1),
        val_data=tokens(128, seed=2),
        test_data=None,
        calibration_data=tokens(8, 32, seed=3),
        seq_len=32,
        batch_size=2,
    )
    return TextDataModule(**(args | kwargs))


class MemoryLogger(Logger):
    """Keeps every logged metric in memory."""

    def __init__(self):
        super().__init__()
        self.metrics: list[tuple[int, dict]] = []

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))

    def keys(self):
        return {k for _, m in self.metrics for k in m}


def trainer(tmp_path, callback, **kwargs):
    args = dict(
        accelerator="cpu",
        max_steps=4,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        limit_val_batches=2,
    )
    args = args | kwargs
    args["enable_checkpointing"] = any(isinstance(c, ModelCheckpoint) for c in args["callbacks"])
    return Trainer(**args)


def pruned_weights(module):
    return {n: lin.weight for n, lin in named_prunable_linears(module.model).items()}


def zeros_of(module):
    return {n: (w == 0).clone() for n, w in pruned_weights(module).items()}


@pytest.mark.parametrize(
    ("method", "precision"),
    [
        ("wanda", "32-true"),
        ("wanda", "bf16-mixed"),
        ("optishear", "32-true"),
        ("sparsegpt", "32-true"),
    ],
)
def test_fit_prunes_then_keeps_masks_exactly(tmp_path, method, precision):
    module = CausalLMModule(tiny_llama(layers=2), learning_rate=1e-2, weight_decay=0.1)
    cb = OptiShearCallback(method=method, sparsity=0.5, progress=False, **TINY_SEARCH)
    tr = trainer(
        tmp_path, cb, precision=precision, accumulate_grad_batches=2, gradient_clip_val=0.5
    )
    before = {n: w.detach().clone() for n, w in pruned_weights(module).items()}
    tr.fit(module, datamodule=datamodule())
    assert tr.global_step == 4
    masks = cb.masks
    assert masks.violations() == 0
    for name, weight in pruned_weights(module).items():
        keep = masks.keep_mask(f"model.{name}.weight")
        assert (weight[~keep] == 0).all()
        # every row lost exactly half its weights (row groups, ratio 0.5 per block here)
        if method != "optishear":
            assert (keep.sum(dim=1) == weight.shape[1] // 2).all()
        # the surviving weights trained
        assert not torch.equal(weight.detach()[keep], before[name][keep])
    achieved = masks.sparsity()
    if method == "optishear":
        assert abs(achieved - 0.5) <= cb.search.tolerance + 1e-9
    else:
        assert achieved == pytest.approx(0.5)


def test_nm_pattern_fit_keeps_n_of_m(tmp_path):
    module = CausalLMModule(tiny_llama(layers=2), learning_rate=1e-2)
    cb = OptiShearCallback(method="ria", pattern="2:4", sparsity=None, progress=False)
    trainer(tmp_path, cb, max_steps=2).fit(module, datamodule=datamodule())
    for weight in pruned_weights(module).values():
        groups = (weight != 0).reshape(weight.shape[0], -1, 4).sum(-1)
        assert (groups <= 2).all()
    assert cb.masks.sparsity() == pytest.approx(0.5)


def test_search_is_logged_and_saved_beside_checkpoints(tmp_path):
    module = CausalLMModule(tiny_llama(layers=2))
    logger = MemoryLogger()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpts")
    cb = OptiShearCallback(method="optishear", sparsity=0.5, progress=False, **TINY_SEARCH)
    tr = trainer(tmp_path, cb, logger=logger, callbacks=[cb, ckpt], max_steps=1)
    tr.fit(module, datamodule=datamodule())
    saved = SearchResult.load(tmp_path / "ckpts" / SEARCH_FILE)
    assert saved.ratios == cb.found.ratios
    keys = logger.keys()
    assert {"optishear/trial_objective", "optishear/sparsity", "optishear/ratio_block_00"} <= keys
    trials = [
        m["optishear/trial_objective"]
        for _, m in logger.metrics
        if "optishear/trial_objective" in m
    ]
    assert len(trials) == len([h for h in saved.history if "error" in h])
    assert all(math.isfinite(t) for t in trials)


def test_reuse_saved_search_result_does_not_search(tmp_path, monkeypatch):
    module = CausalLMModule(tiny_llama(layers=2))
    cb = OptiShearCallback(
        method="optishear", sparsity=0.5, progress=False, save_dir=tmp_path, **TINY_SEARCH
    )
    trainer(tmp_path, cb, max_steps=1).fit(module, datamodule=datamodule())
    first = zeros_of(module)

    import optishear_lightning.search.driver as driver

    def no_search(*args, **kwargs):
        raise AssertionError("searched again")

    monkeypatch.setattr(driver, "optishear_search", no_search)
    module2 = CausalLMModule(tiny_llama(layers=2))
    cb2 = OptiShearCallback(
        method="optishear", sparsity=0.5, progress=False, search_result=str(tmp_path / SEARCH_FILE)
    )
    trainer(tmp_path, cb2, max_steps=1).fit(module2, datamodule=datamodule())
    assert cb2.found.ratios == cb.found.ratios
    # same data, same metric and ratios, same dense model: the same masks
    assert all(torch.equal(first[n], m) for n, m in zeros_of(module2).items())


def test_checkpoint_resume_keeps_masks_and_does_not_prune_again(tmp_path, monkeypatch):
    module = CausalLMModule(tiny_llama(layers=2), learning_rate=1e-2)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpts", save_last=True, every_n_train_steps=2)
    cb = OptiShearCallback(method="optishear", sparsity=0.5, progress=False, **TINY_SEARCH)
    tr = trainer(tmp_path, cb, callbacks=[cb, ckpt], max_steps=2)
    tr.fit(module, datamodule=datamodule())
    masks_before = {n: cb.masks.keep_mask(n).clone() for n in cb.masks.names}

    # A fresh process would build a dense model and a fresh callback.
    calls = []
    monkeypatch.setattr(OptiShearCallback, "prune_now", lambda *a, **k: calls.append(1))
    module2 = CausalLMModule(tiny_llama(layers=2), learning_rate=1e-2)
    cb2 = OptiShearCallback(method="optishear", sparsity=0.5, progress=False, **TINY_SEARCH)
    logger = MemoryLogger()
    tr2 = trainer(tmp_path, cb2, callbacks=[cb2], max_steps=4, logger=logger, log_every_n_steps=1)
    tr2.fit(module2, datamodule=datamodule(), ckpt_path=tmp_path / "ckpts" / "last.ckpt")
    assert not calls, "resuming must not prune or search again"
    assert tr2.global_step == 4
    assert set(cb2.masks.names) == set(masks_before)
    for name, keep in masks_before.items():
        assert torch.equal(cb2.masks.keep_mask(name), keep)
    assert cb2.masks.violations() == 0
    assert cb2.found is not None and cb2.found.ratios == cb.found.ratios
    losses = [m["train/loss"] for _, m in logger.metrics if "train/loss" in m]
    assert losses and all(math.isfinite(x) for x in losses)


def test_resume_with_another_sparsity_is_refused(tmp_path):
    module = CausalLMModule(tiny_llama(layers=2))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpts", save_last=True)
    cb = OptiShearCallback(method="wanda", sparsity=0.5, progress=False)
    trainer(tmp_path, cb, callbacks=[cb, ckpt], max_steps=1).fit(module, datamodule=datamodule())
    cb2 = OptiShearCallback(method="wanda", sparsity=0.6, progress=False)
    module2 = CausalLMModule(tiny_llama(layers=2))
    with pytest.raises(ValueError, match=r"checkpoint was pruned to sparsity 0.5"):
        trainer(tmp_path, cb2, max_steps=2).fit(
            module2, datamodule=datamodule(), ckpt_path=tmp_path / "ckpts" / "last.ckpt"
        )


def test_export_writes_plain_transformers_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    module = CausalLMModule(tiny_llama(layers=2), learning_rate=1e-2)
    out = tmp_path / "export"
    cb = OptiShearCallback(method="wanda", sparsity=0.5, progress=False, export_dir=str(out))
    trainer(tmp_path, cb, max_steps=2).fit(module, datamodule=datamodule())
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert list(out.glob("*.safetensors"))
    for name, lin in named_prunable_linears(reloaded).items():
        keep = cb.masks.keep_mask(f"model.{name}.weight")
        assert torch.equal(lin.weight != 0, keep)


class OwnModule(LightningModule):
    """A user's LightningModule: the HF model under another name, its own calibration data."""

    def __init__(self, with_calibration: bool):
        super().__init__()
        self.net = tiny_llama(layers=2)
        self.with_calibration = with_calibration
        self.calibration_calls = 0

    def training_step(self, batch, batch_idx):
        return self.net(input_ids=batch, labels=batch).loss

    def train_dataloader(self):
        return DataLoader(tokens(8, 16, seed=5), batch_size=2)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def calibration_dataloader(self):
        self.calibration_calls += 1
        return DataLoader(tokens(4, 16, seed=6), batch_size=2) if self.with_calibration else None


def test_users_own_module_with_calibration_dataloader(tmp_path):
    module = OwnModule(with_calibration=True)
    cb = OptiShearCallback(method="wanda", sparsity=0.5, progress=False)
    trainer(tmp_path, cb, max_steps=3).fit(module)
    assert module.calibration_calls == 1
    assert cb.masks.names[0].startswith("net.model.layers.0.")
    assert cb.masks.violations() == 0 and cb.masks.sparsity() == pytest.approx(0.5)


def test_calibration_falls_back_to_callback_loader_then_generated_text(tmp_path):
    module = OwnModule(with_calibration=False)
    loader = DataLoader(tokens(4, 16, seed=7), batch_size=2)
    cb = OptiShearCallback(
        method="wanda", sparsity=0.5, progress=False, calibration_dataloader=loader
    )
    trainer(tmp_path, cb, max_steps=1).fit(module)
    assert cb.summary["n_calibration_samples"] == 4

    module = OwnModule(with_calibration=False)
    cb = OptiShearCallback(
        method="wanda", sparsity=0.5, progress=False, calibration_samples=2, calibration_seq_len=8
    )
    trainer(tmp_path, cb, max_steps=1).fit(module)
    assert cb.summary["n_calibration_samples"] == 2
    assert cb.masks.sparsity() == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(method="obs"), "Unknown pruning method"),
        (dict(pattern="4:2"), "N:M pattern"),
        (dict(pattern="diagonal"), "Unknown sparsity pattern"),
        (dict(sparsity=1.2), r"\[0, 1\)"),
        (dict(sparsity=0.98, search=SearchConfig(delta=0.05)), "leave"),
        (dict(reconstruct="admm"), "Unknown reconstruction"),
        (dict(reconstruct="obs", search=SearchConfig(reconstruct="lsq")), "set it once"),
        (dict(pattern="2:4", sparsity=0.7), "fixes sparsity"),
        (dict(permute=True), "N:M"),
        (dict(pattern="2:4", sparsity=None, search=SearchConfig(permute=True)), "set it once"),
        (dict(search=dict(budget=0)), "budget"),
        (dict(search=dict(objective="mse")), "Unknown search objective"),
        (dict(group="column"), "comparison group"),
        (dict(search_result="/nonexistent/search.json"), "does not exist"),
        (dict(method=3), "must be a name"),
        (dict(method="wanda", sparsity="0.5"), "number"),
        (dict(method="optishear", sparsity=[0.4, 0.6]), "Per-block sparsities"),
        (dict(method="wanda", sparsity={0: 0.4, 2: 0.6}), "without gaps"),
        (dict(method="wanda", sparsity=[0.4, 1.2]), "sparsity of block 1"),
        (dict(method="wanda", pattern="2:4", sparsity=[0.5, 0.5]), "fixes sparsity"),
        (dict(method="optishear", exclude=["*.mlp.*"]), "include/exclude"),
        (dict(method="wanda", include=[]), "list of module-name patterns"),
        (dict(prune_on="batch"), "prune_on"),
        (dict(prune_on="step", prune_at=-1), "prune_at"),
        (dict(prune_at=3), "needs prune_on"),
        (dict(verbose=3), "verbose"),
        (dict(push_to_hub="me/model"), "set export_dir"),
    ],
)
def test_bad_arguments_fail_in_init(kwargs, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        OptiShearCallback(**kwargs)


def test_existing_export_dir_fails_in_init(tmp_path):
    with pytest.raises(FileExistsError, match="already exists"):
        OptiShearCallback(export_dir=str(tmp_path))


def test_overwrite_export_at_the_run_root_is_refused_before_training(tmp_path):
    (tmp_path / "ckpts").mkdir()
    (tmp_path / "ckpts" / "last.ckpt").write_text("checkpoint")
    with pytest.raises(FileExistsError, match="not an earlier optishear export"):
        OptiShearCallback(export_dir=str(tmp_path), overwrite_export=True)
    assert (tmp_path / "ckpts" / "last.ckpt").read_text() == "checkpoint"


def test_empty_calibration_loader_fails_before_any_weight_changes(tmp_path):
    module = CausalLMModule(tiny_llama(layers=2))
    dense = {n: w.detach().clone() for n, w in pruned_weights(module).items()}
    empty = DataLoader(torch.zeros(0, 16, dtype=torch.long), batch_size=2)
    cb = OptiShearCallback(method="wanda", progress=False, calibration_dataloader=empty)
    dm = datamodule(calibration_data=None)
    with pytest.raises(ValueError, match=r"empty|no usable tokens"):
        trainer(tmp_path, cb, max_steps=1).fit(module, datamodule=dm)
    assert all(torch.equal(w, dense[n]) for n, w in pruned_weights(module).items())


def test_calibration_loader_is_not_read_past_calibration_samples(tmp_path):
    class Counting:
        """A loader of 2-row batches that counts how many were taken."""

        def __init__(self):
            self.taken = 0

        def __iter__(self):
            for i in range(50):
                self.taken += 1
                yield torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(i))

    loader = Counting()
    cb = OptiShearCallback(
        method="wanda", progress=False, calibration_dataloader=loader, calibration_samples=6
    )
    module = CausalLMModule(tiny_llama(layers=2))
    trainer(tmp_path, cb, max_steps=1).fit(module, datamodule=datamodule(calibration_data=None))
    assert loader.taken == 3 and cb.summary["n_calibration_samples"] == 6


def test_out_of_vocabulary_calibration_fails_clearly(tmp_path):
    module = CausalLMModule(tiny_llama(layers=2))
    loader = DataLoader(torch.full((2, 16), 5000, dtype=torch.long), batch_size=2)
    cb = OptiShearCallback(method="wanda", progress=False, calibration_dataloader=loader)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        trainer(tmp_path, cb, max_steps=1).fit(module, datamodule=datamodule(calibration_data=None))


def test_search_result_for_another_model_fails_before_pruning(tmp_path):
    module = CausalLMModule(tiny_llama(layers=2))
    cb = OptiShearCallback(
        method="optishear", sparsity=0.5, progress=False, save_dir=tmp_path, **TINY_SEARCH
    )
    trainer(tmp_path, cb, max_steps=1).fit(module, datamodule=datamodule())
    other = CausalLMModule(tiny_llama(layers=3))
    dense = {n: w.detach().clone() for n, w in pruned_weights(other).items()}
    cb2 = OptiShearCallback(
        method="optishear", progress=False, search_result=str(Path(tmp_path) / SEARCH_FILE)
    )
    with pytest.raises(ValueError, match="decoder blocks"):
        trainer(tmp_path, cb2, max_steps=1).fit(other, datamodule=datamodule())
    assert all(torch.equal(w, dense[n]) for n, w in pruned_weights(other).items())


def test_sharded_strategies_are_refused_before_any_work():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    cb = OptiShearCallback(method="wanda", progress=False)
    with pytest.raises(ValueError, match="single-device and DDP"):
        cb.setup(SimpleNamespace(strategy=FSDPStrategy()), None, "fit")


# Resuming from damaged checkpoints -----------------------------------------------------------
@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    """A checkpoint of a wanda-pruned run (2 steps), and the callback state key in it."""
    root = tmp_path_factory.mktemp("ckpt")
    module = CausalLMModule(tiny_llama(layers=2), learning_rate=1e-2)
    ckpt = ModelCheckpoint(dirpath=root / "ckpts", save_last=True, every_n_train_steps=2)
    cb = OptiShearCallback(method="wanda", sparsity=0.5, progress=False)
    trainer(root, cb, callbacks=[cb, ckpt], max_steps=2).fit(module, datamodule=datamodule())
    path = root / "ckpts" / "last.ckpt"
    data = torch.load(path, weights_only=False)
    key = next(k for k in data["callbacks"] if "OptiShearCallback" in k)
    return path, key


def resume_from(tmp_path, saved_checkpoint, edit=None, method="wanda", **kwargs):
    path, key = saved_checkpoint
    data = torch.load(path, weights_only=False)
    if edit is not None:
        edit(data["callbacks"], key)
    damaged = tmp_path / "damaged.ckpt"
    torch.save(data, damaged)
    module = CausalLMModule(tiny_llama(layers=2), learning_rate=1e-2)
    cb = OptiShearCallback(method=method, sparsity=0.5, progress=False, **kwargs)
    trainer(tmp_path, cb, max_steps=3).fit(module, datamodule=datamodule(), ckpt_path=damaged)
    return cb


def _flip_bits(callbacks, key):
    entry = next(iter(callbacks[key]["masks"].values()))
    entry["bits"] = entry["bits"] ^ 0b10000001


def _all_kept(callbacks, key):
    for entry in callbacks[key]["masks"].values():
        entry["bits"] = torch.full_like(entry["bits"], 255)


def _drop_one(callbacks, key):
    masks = callbacks[key]["masks"]
    masks.pop(next(iter(masks)))


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (_flip_bits, "recorded|not zero"),
        (_all_kept, "prunes 0.0000 of its weights"),
        (_drop_one, "has no mask for"),
        (lambda c, k: c[k]["config"].update(sparsity="abc"), "not a number"),
        (lambda c, k: c[k].pop("config"), "no valid config"),
        (lambda c, k: c[k].update(search_result={"ratios": "x"}), "search_result is malformed"),
    ],
)
def test_damaged_checkpoint_state_is_a_clear_error(tmp_path, saved_checkpoint, edit, match):
    with pytest.raises(ValueError, match=match):
        resume_from(tmp_path, saved_checkpoint, edit)


def test_resume_with_another_method_says_the_old_masks_are_kept(tmp_path, saved_checkpoint, caplog):
    with caplog.at_level("INFO"):
        cb = resume_from(tmp_path, saved_checkpoint, method="ria")
    assert "pruned with 'wanda'" in caplog.text and "method='ria' is not applied" in caplog.text
    assert cb.masks.violations() == 0


def test_checkpoint_without_callback_state_warns_loudly(tmp_path, saved_checkpoint):
    with pytest.warns(UserWarning, match="holds no OptiShearCallback state"):
        resume_from(tmp_path, saved_checkpoint, lambda c, k: c.pop(k))


def test_export_dir_that_can_never_be_created_fails_in_init(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(PermissionError, match="not a writable directory"):
        OptiShearCallback(export_dir=str(blocker / "model"))
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m: Path(p) != readonly and real_access(p, m))
    with pytest.raises(PermissionError, match=str(readonly)):
        OptiShearCallback(export_dir=str(readonly / "deeper" / "model"))


def test_bad_hub_repo_id_fails_in_init(tmp_path):
    with pytest.raises(ValueError, match=r"not a Hub repo id|user/name"):
        OptiShearCallback(export_dir=str(tmp_path / "out"), push_to_hub="a b/c d")


# Method objects, per-block sparsity, layer selection, when to prune --------------------------
def test_method_accepts_a_pruning_method_object(tmp_path):
    by_name = CausalLMModule(tiny_llama(layers=2))
    cb = OptiShearCallback(method="wanda", progress=False)
    trainer(tmp_path, cb, max_steps=1).fit(by_name, datamodule=datamodule())
    as_object = CausalLMModule(tiny_llama(layers=2))
    cb2 = OptiShearCallback(method=WANDA, progress=False)  # Wanda as a point of the space
    trainer(tmp_path, cb2, max_steps=1).fit(as_object, datamodule=datamodule())
    assert cb2.method_name == WANDA.name and cb2.summary["metric_formula"] == str(WANDA)
    for name, keep in cb.masks.packed().items():
        assert torch.equal(keep["bits"], cb2.masks.packed()[name]["bits"])
    custom = MetaMetric("square", "sqrt", "column_sum", "none")
    module = CausalLMModule(tiny_llama(layers=2))
    cb3 = OptiShearCallback(method=custom, progress=False)
    trainer(tmp_path, cb3, max_steps=2).fit(module, datamodule=datamodule())
    assert cb3.masks.sparsity() == pytest.approx(0.5) and cb3.masks.violations() == 0
    assert cb3.summary["metric_formula"] == str(custom)


def _block_sparsity(module, block):
    weights = [w for n, w in pruned_weights(module).items() if f"layers.{block}." in n]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


@pytest.mark.parametrize("spec", [[0.3, 0.6], {0: 0.3, 1: 0.6}, {"1": 0.6, "0": 0.3}])
def test_per_block_sparsity(tmp_path, spec):
    module = CausalLMModule(tiny_llama(layers=2))
    cb = OptiShearCallback(method="magnitude", sparsity=spec, progress=False)
    trainer(tmp_path, cb, max_steps=1).fit(module, datamodule=datamodule())
    assert cb.sparsity == [0.3, 0.6]
    assert _block_sparsity(module, 0) == pytest.approx(0.3, abs=0.01)
    assert _block_sparsity(module, 1) == pytest.approx(0.6, abs=0.01)
    assert cb.summary["block_sparsity"] == [0.3, 0.6]


def test_per_block_sparsity_for_another_block_count_fails_before_pruning(tmp_path):
    module = CausalLMModule(tiny_llama(layers=2))
    dense = {n: w.detach().clone() for n, w in pruned_weights(module).items()}
    cb = OptiShearCallback(method="wanda", sparsity=[0.3, 0.4, 0.5], progress=False)
    with pytest.raises(ValueError, match=r"3 per-block sparsities .* 2 decoder blocks"):
        trainer(tmp_path, cb, max_steps=1).fit(module, datamodule=datamodule())
    assert all(torch.equal(w, dense[n]) for n, w in pruned_weights(module).items())


def test_include_and_exclude_select_layers_by_glob(tmp_path):
    module = CausalLMModule(tiny_llama(layers=2), learning_rate=1e-2)
    cb = OptiShearCallback(
        method="wanda", include=["*.layers.1.*"], exclude=["*.self_attn.*"], progress=False
    )
    trainer(tmp_path, cb, max_steps=2).fit(module, datamodule=datamodule())
    expected = {f"model.layers.1.mlp.{p}_proj" for p in ("gate", "up", "down")}
    assert {n.removeprefix("model.").removesuffix(".weight") for n in cb.masks.names} == expected
    for name, weight in pruned_weights(module).items():
        zeros = float((weight == 0).float().mean())
        assert zeros == (pytest.approx(0.5) if name in expected else 0.0)
    assert cb.masks.violations() == 0


def test_include_pattern_that_matches_nothing_fails_before_pruning(tmp_path):
    module = CausalLMModule(tiny_llama(layers=2))
    dense = {n: w.detach().clone() for n, w in pruned_weights(module).items()}
    cb = OptiShearCallback(method="wanda", include=["*.feed_forward.*"], progress=False)
    with pytest.raises(ValueError, match="matches none of the model's prunable linears"):
        trainer(tmp_path, cb, max_steps=1).fit(module, datamodule=datamodule())
    assert all(torch.equal(w, dense[n]) for n, w in pruned_weights(module).items())


class ZerosAtBatchStart(Callback):
    """Records the pruned fraction of the model's linears at every training batch."""

    def __init__(self):
        self.seen: list[tuple[int, int, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        weights = list(pruned_weights(pl_module).values())
        zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
        self.seen.append((trainer.current_epoch, trainer.global_step, zeros))


@pytest.mark.parametrize(
    ("prune_on", "prune_at", "kwargs"),
    [("step", 2, dict(max_steps=4)), ("epoch", 1, dict(max_epochs=2, limit_train_batches=2))],
)
def test_prune_at_a_later_step_or_epoch_then_keep_masks(tmp_path, prune_on, prune_at, kwargs):
    module = CausalLMModule(tiny_llama(layers=2), learning_rate=1e-2)
    cb = OptiShearCallback(method="wanda", prune_on=prune_on, prune_at=prune_at, progress=False)
    spy = ZerosAtBatchStart()  # runs after the OptiShearCallback's hook (listed after it)
    tr = trainer(tmp_path, cb, callbacks=[cb, spy], **kwargs)
    tr.fit(module, datamodule=datamodule())
    for epoch, step, zeros in spy.seen:
        pruned = (step if prune_on == "step" else epoch) >= prune_at
        assert zeros == (pytest.approx(0.5) if pruned else 0.0), (epoch, step, zeros)
    assert any(z == 0.0 for *_, z in spy.seen) and cb.masks.violations() == 0
    assert cb.masks.sparsity() == pytest.approx(0.5)


def test_prune_at_never_reached_warns(tmp_path):
    module = CausalLMModule(tiny_llama(layers=2))
    cb = OptiShearCallback(method="wanda", prune_on="step", prune_at=50, progress=False)
    with pytest.warns(UserWarning, match="was not pruned"):
        trainer(tmp_path, cb, max_steps=2).fit(module, datamodule=datamodule())
    assert cb.masks is None


# verbose, loggers, artifacts ---------------------------------------------------------------
class ImageWriter:
    """What a TensorBoard SummaryWriter offers for images."""

    def __init__(self):
        self.images = []

    def add_image(self, tag, image, step, dataformats="CHW"):
        self.images.append((tag, tuple(image.shape), step, dataformats))


class TensorBoardLike(MemoryLogger):
    def __init__(self):
        super().__init__()
        self.writer = ImageWriter()

    @property
    def experiment(self):
        return self.writer


class WandbLike(MemoryLogger):
    def __init__(self):
        super().__init__()
        self.images = []

    def log_image(self, key, images, step=None):
        self.images.append((key, list(images), step))


def test_verbose_2_prints_and_logs_per_layer_sparsity(tmp_path, capsys):
    from lightning.pytorch.loggers import CSVLogger

    module = CausalLMModule(tiny_llama(layers=2))
    logger = MemoryLogger()
    cb = OptiShearCallback(method="ria", verbose=2, progress=False)
    csv = CSVLogger(tmp_path / "csv")
    trainer(tmp_path, cb, max_steps=1, logger=[logger, csv]).fit(module, datamodule=datamodule())
    out = capsys.readouterr().out
    assert "per-layer sparsity" in out and "model.layers.1.mlp.down_proj" in out
    logged = logger.keys()
    per_layer = {k for k in logged if k.startswith("optishear/sparsity/")}
    assert len(per_layer) == 14
    assert "optishear/sparsity/model.layers.0.self_attn.q_proj" in per_layer
    csv.finalize("success")
    header = (Path(csv.log_dir) / "metrics.csv").read_text().splitlines()[0]
    assert "optishear/sparsity/model.layers.0.mlp.up_proj" in header


def test_verbose_0_prints_nothing(tmp_path, capsys, caplog):
    module = CausalLMModule(tiny_llama(layers=2))
    cb = OptiShearCallback(method="wanda", verbose=0, progress=False)
    with caplog.at_level("INFO"):
        trainer(tmp_path, cb, max_steps=1).fit(module, datamodule=datamodule())
    assert "OptiShear" not in caplog.text and "OptiShear" not in capsys.readouterr().out


def test_plots_go_to_image_loggers_and_every_artifact_is_printed_once(tmp_path, caplog):
    from lightning.pytorch.loggers import CSVLogger

    module = CausalLMModule(tiny_llama(layers=2))
    board, wandb = TensorBoardLike(), WandbLike()
    cb = OptiShearCallback(
        method="optishear", save_plots=True, save_dir=str(tmp_path / "s"), progress=False,
        export_dir=str(tmp_path / "export"), **TINY_SEARCH,
    )  # fmt: skip
    loggers = [board, wandb, CSVLogger(tmp_path / "csv")]  # CSV takes no images: skipped
    with caplog.at_level("INFO"):
        trainer(tmp_path, cb, max_steps=1, logger=loggers).fit(module, datamodule=datamodule())
    tags = {tag for tag, *_ in board.writer.images}
    assert tags == {"optishear/pareto_front", "optishear/layer_ratios"}
    assert all(len(shape) == 3 and fmt == "HWC" for _, shape, _, fmt in board.writer.images)
    assert {key for key, *_ in wandb.images} == tags
    assert all(Path(images[0]).is_file() for _, images, _ in wandb.images)
    assert set(cb.artifacts) == {"search result", "search state", "plots", "pruned model"}
    for path in cb.artifacts.values():
        assert caplog.text.count(f"written to {path}\n") == 1
        assert Path(path).exists()


# Exports: model card, summary, inference config, the Hub --------------------------------------
def test_export_has_model_card_summary_and_inference_config(tmp_path):
    import json

    model = tiny_llama(layers=2)
    model.config.use_cache = False  # as load_model leaves it for pruning and training
    model.config.optishear_model_id = "smollm2-135m"
    module = CausalLMModule(model)
    out = tmp_path / "export"
    cb = OptiShearCallback(method="wanda", progress=False, export_dir=str(out))
    trainer(tmp_path, cb, max_steps=1).fit(module, datamodule=datamodule())
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "- optishear\n- pruned\n- sparse" in card
    assert "| 1 | 50.00% | 50.00% |" in card and "`wanda`" in card
    assert "8 sequences x 32 tokens" in card
    summary = json.loads((out / "optishear_prune.json").read_text())
    assert summary["method"] == "wanda" and summary["overall_sparsity"] == pytest.approx(0.5)
    assert len(summary["layer_sparsity"]) == 14
    assert json.loads((out / "config.json").read_text())["use_cache"] is True
    assert model.config.use_cache is False  # the model in memory keeps its setting


def test_push_to_hub_uploads_the_export_with_huggingface_hub(tmp_path, monkeypatch):
    import shutil

    from huggingface_hub import HfApi

    hub = tmp_path / "hub"
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, ignore_patterns=None, **kwargs):
        # Stands in for the network: what upload_folder would send arrives in a local folder.
        calls.append(("upload_folder", repo_id, kwargs))
        ignored = shutil.ignore_patterns(*(ignore_patterns or []))
        shutil.copytree(folder_path, hub / repo_id, ignore=ignored)

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    module = CausalLMModule(tiny_llama(layers=2))
    cb = OptiShearCallback(
        method="wanda", progress=False, export_dir=str(tmp_path / "export"),
        push_to_hub="someone/tiny-pruned",
    )  # fmt: skip
    trainer(tmp_path, cb, max_steps=1).fit(module, datamodule=datamodule())
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]
    assert calls[0][2]["exist_ok"] is True
    arrived = {p.name for p in (hub / "someone" / "tiny-pruned").iterdir()}
    assert {"README.md", "config.json", "model.safetensors", "optishear_prune.json"} <= arrived
    assert ".optishear_export" not in arrived
    assert (
        'from_pretrained("someone/tiny-pruned")'
        in (hub / "someone" / "tiny-pruned" / "README.md").read_text()
    )
    assert cb.artifacts["Hub upload"] == "https://huggingface.co/someone/tiny-pruned"


def test_resume_with_another_layer_selection_is_refused(tmp_path):
    module = CausalLMModule(tiny_llama(layers=2))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpts", save_last=True)
    cb = OptiShearCallback(method="wanda", exclude=["*.mlp.*"], progress=False)
    trainer(tmp_path, cb, callbacks=[cb, ckpt], max_steps=1).fit(module, datamodule=datamodule())
    cb2 = OptiShearCallback(method="wanda", progress=False)
    with pytest.raises(ValueError, match="selected by exclude"):
        trainer(tmp_path, cb2, max_steps=2).fit(
            CausalLMModule(tiny_llama(layers=2)),
            datamodule=datamodule(),
            ckpt_path=tmp_path / "ckpts" / "last.ckpt",
        )


@pytest.mark.parametrize(
    ("setting", "bar", "shown"),
    [(None, True, True), (None, False, False), (False, True, False), (True, False, True)],
)
def test_progress_follows_the_trainers_progress_bar_unless_set(tmp_path, setting, bar, shown):
    trainer = Trainer(
        enable_progress_bar=bar, logger=False, enable_checkpointing=False,
        default_root_dir=tmp_path,
    )  # fmt: skip
    assert OptiShearCallback(method="wanda", progress=setting)._progress(trainer) is shown
