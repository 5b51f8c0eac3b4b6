"""The ``optishear`` CLI: every example config runs end to end (tiny budgets), --print_config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from optishear_lightning.callback import SEARCH_FILE, OptiShearCallback
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


def test_a_prose_file_path_reaches_the_data_module_as_a_path(tmp_path):
    """A plain-prose file given as a data source must stay its path: jsonargparse would read
    it as a config (and pass its text) if the setting's type allowed anything but text."""
    notes = tmp_path / "notes.txt"
    notes.write_text("heti ru votihe vosa nezemi " * 40)  # parses as one YAML string
    args = [f"--data.{name}={notes}" for name in ("calibration_data", "train_data", "val_data")]
    proc = subprocess.run(
        [sys.executable, "-m", "optishear_lightning.cli", "prune", *args, "--print_config"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = yaml.safe_load(proc.stdout)["data"]
    assert data["calibration_data"] == data["train_data"] == data["val_data"] == str(notes)


@pytest.mark.parametrize("how", ["flag", "config"])
def test_calibration_size_has_one_home_on_the_command_line(tmp_path, how):
    """data: sets the calibration size; the same setting under optishear: is a clear error."""
    config = tmp_path / "c.yaml"
    config.write_text("optishear:\n  calibration_samples: 7\n")
    moved = ["--config", str(config)] if how == "config" else ["--optishear.calibration_samples=7"]
    proc = subprocess.run(
        [sys.executable, "-m", "optishear_lightning.cli", "prune", *moved, "--print_config"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0 and "set data.calibration_samples instead" in proc.stderr


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


def test_data_bos_per_window_is_a_cli_setting_defaulting_to_the_model_family(tmp_path, monkeypatch):
    import optishear_lightning.datamodule as datamodule

    from .conftest import WORD_BOS, word_tokenizer
    from .test_models import make_model

    model_dir = tmp_path / "tiny-gemma"
    make_model("gemma").save_pretrained(model_dir)
    word_tokenizer().save_pretrained(model_dir)
    no_data = ["--data.train_data", "null", "--data.val_data", "null", "--data.test_data",
               "null", "--data.calibration_data", "null"]  # fmt: skip
    common = ["--model.model", str(model_dir), *no_data, "--trainer.logger", "false",
              "--trainer.default_root_dir", str(tmp_path)]  # fmt: skip

    def no_config(*args):
        raise AssertionError("read the model's config again instead of using the loaded model")

    monkeypatch.setattr(datamodule, "load_config", no_config)
    # The default (null) follows the family of the model the CLI loaded: Gemma needs BOS.
    cli = OptiShearCLI(args=common, run=False)
    assert cli.datamodule.hparams.bos_per_window is None
    assert cli.datamodule.window_bos_id() == WORD_BOS
    cli = OptiShearCLI(args=[*common, "--data.bos_per_window", "false"], run=False)
    assert cli.datamodule.window_bos_id() is None


# The real entry point on a tiny model (offline: a word-level tokenizer and .jsonl text) --------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from .conftest import tiny_llama, word_text, word_tokenizer

    root = tmp_path_factory.mktemp("tiny_cli")
    model = tiny_llama(layers=2)
    model.config.use_cache = False  # as load_model leaves it
    model.save_pretrained(root / "model")
    word_tokenizer().save_pretrained(root / "model")
    lines = [json.dumps({"text": word_text(120, seed=i)}) for i in range(20)]
    (root / "text.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_calibration_size_set_under_data_reaches_the_callback(tiny_dir, tmp_path):
    args = [*tiny_args(tiny_dir, tmp_path), "--data.calibration_samples", "7"]
    callback = find_callback(OptiShearCLI(args=args, run=False))
    assert (callback.calibration_samples, callback.calibration_seq_len) == (7, 32)  # seq_len
    args += ["--data.calibration_seq_len", "24"]
    assert find_callback(OptiShearCLI(args=args, run=False)).calibration_seq_len == 24


def find_callback(cli: OptiShearCLI) -> OptiShearCallback:
    return next(c for c in cli.trainer.callbacks if isinstance(c, OptiShearCallback))


def tiny_args(root: Path, tmp_path: Path, optishear: bool = True) -> list[str]:
    text = str(root / "text.jsonl")
    callback = [
        "--optishear.method", "wanda", "--data.calibration_samples", "8",
        "--optishear.calibration_batch_size", "4", "--optishear.progress", "false",
    ]  # fmt: skip
    return [*(callback if optishear else []),
        "--model.model", str(root / "model"),
        "--data.calibration_data", text, "--data.val_data", text, "--data.train_data", text,
        "--data.test_data", "null", "--data.seq_len", "32", "--data.train_samples", "8",
        "--data.val_windows", "2", "--data.batch_size", "2", "--data.eval_batch_size", "2",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.enable_checkpointing", "false",
        "--trainer.num_sanity_val_steps", "0", "--trainer.limit_val_batches", "1",
    ]  # fmt: skip


def optishear_callbacks(cli: OptiShearCLI) -> list:
    from optishear_lightning.callback import OptiShearCallback

    return [c for c in cli.trainer.callbacks if isinstance(c, OptiShearCallback)]


def test_prune_help_is_short_plain_text_and_shows_choices():
    script = Path(sys.executable).parent / "optishear"  # the installed console script
    command = (
        [str(script)] if script.is_file() else [sys.executable, "-m", "optishear_lightning.cli"]
    )
    env = dict(os.environ, COLUMNS="80")
    proc = subprocess.run(
        [*command, "prune", "--help"], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(proc.stdout.splitlines()) < 300, len(proc.stdout.splitlines())
    text = " ".join(proc.stdout.split())  # choices may wrap across lines
    for choices in (
        "--optishear.group {row,layer}",
        "{optishear, magnitude, wanda, ria, sparsegpt}",
        "{unstructured, 2:4, 4:8}",
        "--optishear.prune_on {fit_start,epoch,step}",
        "--optishear.verbose {0,1,2}",
        "{obs, lsq}",
    ):
        assert choices in text
    assert "--model.model MODEL (str, default: smollm2-135m)" in text
    assert "torch.nn.Linear" not in text and "known subclasses" not in text
    assert ":class:" not in text and "``" not in text and ":paramref:" not in text


def test_prune_logs_dense_and_pruned_perplexity_under_distinct_names(tiny_dir, tmp_path):
    export = tmp_path / "export"
    cli = OptiShearCLI(args=[
        "prune", *tiny_args(tiny_dir, tmp_path), "--evaluate_dense", "true",
        "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", str(tmp_path / "logs"),
        "--optishear.export_dir", str(export),
    ])  # fmt: skip
    (callback,) = optishear_callbacks(cli)
    cli.trainer.logger.finalize("success")
    header = next((tmp_path / "logs").rglob("metrics.csv")).read_text().splitlines()[0]
    columns = set(header.split(","))
    assert {"dense/val_ppl", "pruned/val_ppl"} <= columns and "val/ppl" not in columns
    assert set(callback.evaluation) == {"dense/val_ppl", "pruned/val_ppl"}
    card = (export / "README.md").read_text()
    assert "| dense/val_ppl |" in card and "| pruned/val_ppl |" in card
    assert json.loads((export / "config.json").read_text())["use_cache"] is True
    assert json.loads((export / "optishear_prune.json").read_text())["method"] == "wanda"


def test_callback_listed_under_trainer_callbacks_is_used_once(tiny_dir, tmp_path):
    listed = tmp_path / "listed.yaml"
    listed.write_text(
        "trainer:\n  callbacks:\n"
        "    - class_path: optishear_lightning.OptiShearCallback\n"
        "      init_args: {method: ria, sparsity: 0.4, progress: false}\n"
    )
    # The optishear: section is left at its defaults: the listed callback is the one used.
    base = ["--config", str(listed), *tiny_args(tiny_dir, tmp_path, optishear=False)]
    cli = OptiShearCLI(args=["fit", *base, "--trainer.max_steps", "1"])
    (callback,) = optishear_callbacks(cli)
    assert callback.method == "ria" and callback.masks.sparsity() == pytest.approx(0.4, abs=0.01)
    with pytest.raises(ValueError, match="Configure it once, under optishear:"):
        OptiShearCLI(args=["fit", *base, "--optishear.method", "wanda", "--trainer.max_steps", "1"])


def test_validate_says_that_the_pruning_settings_are_not_applied(tiny_dir, tmp_path):
    with pytest.warns(UserWarning, match=r"does not prune; the optishear: settings .* not applied"):
        cli = OptiShearCLI(args=["validate", *tiny_args(tiny_dir, tmp_path)])
    (callback,) = optishear_callbacks(cli)
    assert callback.masks is None
    weights = [p for n, p in cli.model.named_parameters() if "proj" in n]
    assert all(bool((w != 0).all()) for w in weights)  # still dense


def test_optimizer_replacing_adamw_warns_and_runs_are_seeded_explicitly(tiny_dir, tmp_path):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = OptiShearCLI(args=[
            "fit", *tiny_args(tiny_dir, tmp_path), "--trainer.max_steps", "1",
            "--optimizer", "SGD", "--optimizer.lr", "0.01",
        ])  # fmt: skip
    messages = [str(w.message) for w in caught]
    assert any("replaces" in m and "model.learning_rate=2e-05" in m for m in messages)
    assert not any("No seed found" in m for m in messages)
    assert cli.config["fit"]["seed_everything"] == 0
    assert isinstance(cli.trainer.optimizers[0], torch.optim.SGD)


def test_method_object_per_block_sparsity_and_layer_selection_from_yaml(tiny_dir, tmp_path):
    config = tmp_path / "meta.yaml"
    config.write_text(
        "optishear:\n"
        "  method:\n"
        "    class_path: optishear_lightning.search.MetaMetric\n"
        "    init_args: {f1: sqrt, f2: identity, a: none, b: none}\n"
        "  sparsity: [0.3, 0.6]\n"
        "  exclude: ['*.self_attn.*']\n"
    )
    cli = OptiShearCLI(args=["prune", *tiny_args(tiny_dir, tmp_path), "--config", str(config)])
    (callback,) = optishear_callbacks(cli)
    assert type(callback.method).__name__ == "MetaMetric" and callback.method.f1 == "sqrt"
    assert all("mlp" in name for name in callback.masks.names)
    layer = callback.summary["layer_sparsity"]
    assert layer["model.layers.0.mlp.up_proj.weight"] == pytest.approx(0.3, abs=0.01)
    assert layer["model.layers.1.mlp.up_proj.weight"] == pytest.approx(0.6, abs=0.01)


def _cli_prune(tmp_path: Path, tiny_dir: Path, devices: int) -> subprocess.CompletedProcess:
    args = [*tiny_args(tiny_dir, tmp_path), "--trainer.devices", str(devices),
            "--trainer.strategy", "ddp" if devices > 1 else "auto",
            "--optishear.method", "optishear", "--optishear.export_dir", str(tmp_path / "export"),
            "--optishear.search.budget", "6", "--optishear.search.pop_size", "4",
            "--optishear.search.proxy_blocks", "1", "--optishear.search.metric_topk", "1",
            "--optishear.search.objective_samples", "2", "--optishear.search.objective_seq_len",
            "16", "--optishear.search.validation_samples", "2",
            "--data.calibration_seq_len", "32"]  # fmt: skip
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    tmp_path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "optishear_lightning.cli", "prune", *args],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip


def test_prune_on_two_ddp_processes_shares_the_search_and_exports_what_one_gives(
    tiny_dir, tmp_path
):
    from safetensors.torch import load_file

    one = _cli_prune(tmp_path / "one", tiny_dir, devices=1)
    assert one.returncode == 0, one.stderr[-4000:]
    two = _cli_prune(tmp_path / "two", tiny_dir, devices=2)
    assert two.returncode == 0, two.stderr[-4000:]
    assert "MEMBER: 2/2" in two.stdout + two.stderr  # rank 1 really ran
    weights = [load_file(tmp_path / run / "export" / "model.safetensors") for run in ("one", "two")]
    assert weights[0].keys() == weights[1].keys()
    for name, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][name]), name
    results = [json.loads(next((tmp_path / r).rglob("optishear_search.json")).read_text())
               for r in ("one", "two")]  # fmt: skip
    assert results[0]["history"] == results[1]["history"]
