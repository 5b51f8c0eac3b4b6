"""The ``optishear`` CLI: every example config runs end to end (tiny budgets), --print_config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from optishear_lightning.callback import SEARCH_FILE
from optishear_lightning.cli import OptiShearCLI

from .conftest import REPO_ROOT, SHARED_DATA, requires_shared_data, requires_smollm2

CONFIGS = REPO_ROOT / "examples" / "configs"

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


def tiny_overrides(tmp_path: Path) -> list[str]:
    """Shrink any example config to seconds on a CPU; outputs go to tmp_path."""
    return [
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.logger",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--data.calibration_samples",
        "4",
        "--data.calibration_seq_len",
        "32",
        "--data.seq_len",
        "32",
        "--data.val_windows",
        "2",
        "--data.test_windows",
        "2",
        "--data.train_samples",
        "8",
        "--data.batch_size",
        "2",
        "--data.eval_batch_size",
        "2",
        "--optishear.calibration_batch_size",
        "4",
        "--optishear.search.budget",
        "4",
        "--optishear.search.pop_size",
        "4",
        "--optishear.search.proxy_blocks",
        "1",
        "--optishear.search.proxy_rows",
        "8",
        "--optishear.search.metric_topk",
        "1",
        "--optishear.search.objective_samples",
        "2",
        "--optishear.search.objective_seq_len",
        "16",
        "--optishear.search.validation_samples",
        "2",
        "--optishear.save_dir",
        str(tmp_path / "search"),
        "--optishear.progress",
        "false",
    ]


def offline_data(config: str) -> list[str]:
    """The example configs name data as a user with network would (c4, wikitext2); tests use
    the offline copies in the shared data instead."""
    c4 = str(SHARED_DATA / "c4" / "c4-train.00000-of-01024.head1041.jsonl")
    wiki = str(SHARED_DATA / "wikitext2" / "wiki.test.raw")
    text = (CONFIGS / config).read_text()
    swaps = {"calibration_data": c4, "train_data": c4, "val_data": wiki, "test_data": wiki}
    return [a for k, v in swaps.items() if f"{k}: " in text and f"{k}: null" not in text
            for a in (f"--data.{k}", v)]  # fmt: skip


def run_cli(subcommand: str, config: str, tmp_path: Path, *extra: str) -> OptiShearCLI:
    args = [subcommand, "--config", str(CONFIGS / config), *offline_data(config),
            *tiny_overrides(tmp_path), *extra]  # fmt: skip
    return OptiShearCLI(args=args)


def test_print_config_lists_every_section():
    proc = subprocess.run(
        [sys.executable, "-m", "optishear_lightning.cli", "prune", "--print_config"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for key in (
        "trainer:",
        "model:",
        "data:",
        "optishear:",
        "method: optishear",
        "evaluate_dense:",
    ):
        assert key in proc.stdout


def test_null_data_sources_parse_as_none():
    """`--data.val_data null` must mean "no split", not a source named "None"."""
    proc = subprocess.run(
        [sys.executable, "-m", "optishear_lightning.cli", "prune", "--data.val_data", "null",
         "--data.calibration_data", "null", "--print_config"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "  val_data: null" in proc.stdout and "  calibration_data: null" in proc.stdout


def test_unknown_method_in_config_fails_before_loading_anything(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optishear:\n  method: obs\n")
    with pytest.raises((SystemExit, ValueError)):
        OptiShearCLI(args=["prune", "--config", str(bad), "--model.model", "/nonexistent/model"])


@requires_smollm2
@requires_shared_data
@pytest.mark.slow
@pytest.mark.parametrize(
    "config",
    [
        "wanda_smollm2.yaml",
        "optishear_smollm2.yaml",
        "reuse_search_smollm2.yaml",
        "nm_2of4_smollm2.yaml",
    ],
)
def test_prune_configs_run_end_to_end(tmp_path, monkeypatch, smollm2_dir, config):
    monkeypatch.chdir(REPO_ROOT)  # the configs' data paths are relative to the repo root
    extra = ["--model.model", str(smollm2_dir), "--optishear.export_dir", str(tmp_path / "model")]
    cli = run_cli("prune", config, tmp_path, *extra)
    callback = next(c for c in cli.trainer.callbacks if type(c).__name__ == "OptiShearCallback")
    sparsity = callback.masks.sparsity()
    if callback.found is not None:  # searched or reused ratios: the sparsity they achieve
        assert sparsity == pytest.approx(callback.found.achieved_sparsity, abs=1e-6)
        assert abs(sparsity - 0.5) <= 0.005
    else:
        assert sparsity == pytest.approx(0.5)
    assert (tmp_path / "model" / "config.json").is_file()
    if callback.method == "optishear":
        saved = json.loads((tmp_path / "search" / SEARCH_FILE).read_text())
        assert saved["kind"] == "search_result" and len(saved["ratios"]) == 30


@requires_smollm2
@requires_shared_data
@pytest.mark.slow
def test_prune_then_finetune_config_keeps_masks_and_resumes(tmp_path, monkeypatch, smollm2_dir):
    monkeypatch.chdir(REPO_ROOT)
    checkpoints = tmp_path / "checkpoints.yaml"
    checkpoints.write_text(
        "trainer:\n  callbacks:\n"
        "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        f"      init_args: {{dirpath: {tmp_path / 'ckpt'}, save_last: true, "
        "every_n_train_steps: 2}\n"
    )
    common = [
        "--config", str(checkpoints),
        "--model.model", str(smollm2_dir),
        "--model.trainable", "[layers.29.mlp]",  # small optimizer state, small checkpoints
        "--optishear.method", "optishear",  # the search (tiny budget) on the real model
        "--trainer.val_check_interval", "1",
        "--trainer.limit_val_batches", "1",
        "--optishear.export_dir", str(tmp_path / "model"),
        "--optishear.overwrite_export", "true",
    ]  # fmt: skip
    cli = run_cli(
        "fit", "prune_finetune_smollm2.yaml", tmp_path, *common, "--trainer.max_steps", "2"
    )
    callback = next(c for c in cli.trainer.callbacks if type(c).__name__ == "OptiShearCallback")
    assert cli.trainer.global_step == 2
    assert callback.masks.violations() == 0
    assert abs(callback.masks.sparsity() - 0.5) <= 0.001  # the search's tolerance
    assert callback.found is not None and len(callback.found.ratios) == 30
    assert (tmp_path / "model" / "config.json").is_file()
    masks = {n: callback.masks.keep_mask(n).clone() for n in callback.masks.names}

    # Resume from the last checkpoint for two more steps: same masks, no new pruning.
    resumed = run_cli(
        "fit", "prune_finetune_smollm2.yaml", tmp_path, *common,
        "--trainer.max_steps", "4", "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"),
    )  # fmt: skip
    cb2 = next(c for c in resumed.trainer.callbacks if type(c).__name__ == "OptiShearCallback")
    assert resumed.trainer.global_step == 4
    assert cb2.summary == callback.summary  # restored from the checkpoint, not re-pruned
    assert all(torch.equal(cb2.masks.keep_mask(n), m) for n, m in masks.items())
    assert cb2.masks.violations() == 0


def test_missing_calibration_file_fails_before_the_model_loads(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "optishear_lightning.cli", "prune",
         "--data.calibration_data", str(tmp_path / "missing.jsonl"),
         "--model.model", str(tmp_path / "no_model_here")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "missing.jsonl" in proc.stderr and "no_model_here" not in proc.stderr
