"""SearchConfig: one declaration of the search settings, checked once, YAML and CLI round trips."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from optishear_lightning.search import SearchConfig


def test_defaults_are_many_short_objective_windows_and_held_out_validation():
    cfg = SearchConfig()
    assert (cfg.objective, cfg.objective_samples, cfg.objective_seq_len) == ("kl", 64, 512)
    assert cfg.validation_samples == 64 and cfg.baseline_methods() == ["wanda", "ria"]
    assert cfg.replace(reconstruct="obs").baseline_methods() == ["wanda", "ria", "sparsegpt"]
    assert cfg.replace(baselines=[]).baseline_methods() == []
    assert cfg.ratio_candidates(0.5) == [0.45, 0.5, 0.55]
    assert cfg.finalist_calibration == "all"  # the model validated is the model returned


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"objective": "mse"}, "Unknown search objective"),
        ({"budget": 0}, "budget"),
        ({"objective_samples": 0}, "objective_samples"),
        ({"validation_samples": 1.5}, "validation_samples"),
        ({"delta": 1.5}, "delta"),
        ({"tolerance": -1}, "tolerance"),
        ({"proxy_rows": 0}, "proxy_rows"),
        ({"reconstruct": "admm"}, "Unknown reconstruction"),
        ({"baselines": ["wanda", "oracle"]}, "Unknown baseline"),
        ({"permute": "yes"}, "permute"),
        ({"finalist_calibration": "validation"}, "finalist_calibration"),
    ],
)
def test_bad_settings_are_refused_where_they_enter(changes, match):
    with pytest.raises(ValueError, match=match):
        SearchConfig(**changes)
    with pytest.raises(ValueError, match=match):
        SearchConfig().replace(**changes)


def test_unknown_setting_names_are_refused():
    with pytest.raises(TypeError, match="Unknown search settings"):
        SearchConfig().replace(objective_windows=3)


def test_ratio_candidates_are_checked_against_the_target():
    with pytest.raises(ValueError, match="leave"):
        SearchConfig(delta=0.05).ratio_candidates(0.98)
    with pytest.raises(ValueError, match="include the target"):
        SearchConfig(candidates=[0.4, 0.6]).ratio_candidates(0.5)


def test_yaml_round_trip():
    cfg = SearchConfig(budget=17, objective="logit_frobenius", reconstruct="lsq", baselines=[])
    text = yaml.safe_dump(cfg.to_dict())
    assert SearchConfig(**yaml.safe_load(text)) == cfg


def test_cli_round_trip(tmp_path):
    """`--optishear.search.*` on the command line, printed as YAML, read back as a config."""
    proc = subprocess.run(
        [sys.executable, "-m", "optishear_lightning.cli", "prune",
         "--optishear.search.budget", "17", "--optishear.search.objective", "logit_frobenius",
         "--optishear.search.baselines", "[ria]", "--optishear.reconstruct", "lsq",
         "--optishear.pattern", "2:4", "--optishear.sparsity", "null",
         "--optishear.permute", "true", "--print_config"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = yaml.safe_load(proc.stdout)["optishear"]
    assert printed["reconstruct"] == "lsq" and printed["permute"] is True
    cfg = SearchConfig(**printed["search"])
    assert (cfg.budget, cfg.objective, cfg.baselines) == (17, "logit_frobenius", ["ria"])
    config = tmp_path / "config.yaml"
    config.write_text(proc.stdout)
    again = subprocess.run(
        [sys.executable, "-m", "optishear_lightning.cli", "prune", "--config", str(config),
         "--print_config"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert yaml.safe_load(again.stdout)["optishear"] == printed


def test_cli_refuses_a_bad_search_setting_before_loading_the_model():
    proc = subprocess.run(
        [sys.executable, "-m", "optishear_lightning.cli", "prune",
         "--optishear.search.objective", "mse", "--model.model", "/nonexistent/model"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "objective" in proc.stderr and "/nonexistent/model" not in proc.stderr.splitlines()[-1]
