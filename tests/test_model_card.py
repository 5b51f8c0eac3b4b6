"""Hub-ready exports (model card, summary, inference config), the engine's ``layers`` filter,
image loggers and the terminal help formatter: the pieces the callback and the CLI build on."""

from __future__ import annotations

import json

import pytest
import torch

from optishear_lightning.cli_help import compact_type, first_sentence, plain_text
from optishear_lightning.loggers import log_image
from optishear_lightning.model_card import card_fields, hub_model_id, render_model_card
from optishear_lightning.models import named_prunable_linears
from optishear_lightning.pruning import prune, save_pruned_model
from optishear_lightning.search import MetaMetric

from .conftest import tiny_llama

pytestmark = pytest.mark.usefixtures("single_thread")


def calibration(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(seed))


# prune(layers=...) ---------------------------------------------------------------------------
def test_prune_layers_predicate_prunes_only_the_selected_linears():
    model = tiny_llama(layers=2)
    result = prune(model, calibration(), "wanda", 0.5, layers=lambda name: "mlp" in name)
    for name, linear in named_prunable_linears(model).items():
        zeros = float((linear.weight == 0).float().mean())
        assert zeros == (pytest.approx(0.5) if "mlp" in name else 0.0)
    assert all("mlp" in name for name in result.masks)
    assert len(result.layer_sparsity) == 6 and result.overall_sparsity == pytest.approx(0.5)


def test_prune_layers_by_name_and_unknown_names_fail_before_any_change():
    model = tiny_llama(layers=2)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    result = prune(model, calibration(), "magnitude", 0.5, layers=names)
    assert sorted(result.masks) == sorted(f"{n}.weight" for n in names)
    other = tiny_llama(layers=2, seed=1)
    dense = {n: lin.weight.detach().clone() for n, lin in named_prunable_linears(other).items()}
    with pytest.raises(ValueError, match="not prunable linears"):
        prune(other, calibration(), "wanda", 0.5, layers=["model.layers.0.mlp.typo_proj"])
    with pytest.raises(ValueError, match="selects none"):
        prune(other, calibration(), "wanda", 0.5, layers=lambda name: False)
    for name, linear in named_prunable_linears(other).items():
        assert torch.equal(linear.weight, dense[name])


# save_pruned_model: card, summary, config ---------------------------------------------------
def test_save_pruned_model_writes_card_summary_and_inference_config(tmp_path):
    model = tiny_llama(layers=2)
    model.config.use_cache = False
    model.config.optishear_model_id = "someone/tiny-llama"
    metric = MetaMetric("sqrt", "identity", "column_sum", "none")
    result = prune(model, calibration(), metric, [0.25, 0.75])
    out = save_pruned_model(
        model, tmp_path / "out", result=result, card={"evaluation": {"wikitext2 ppl": 12.5}}
    )
    card = (out / "README.md").read_text()
    front = card.split("---\n")[1]
    assert "library_name: transformers" in front and "base_model: someone/tiny-llama" in front
    assert "tags:\n- optishear\n- pruned\n- sparse" in front
    assert f"`{metric}`" in card  # the formula of a searched-space metric
    assert "| 0 | 25.00% | 25.00% |" in card and "| 1 | 75.00% | 75.00% |" in card
    assert "| wikitext2 ppl | 12.5 |" in card and "4 sequences x 32 tokens" in card
    assert "optishear-lightning" in card.split("Made with")[1]
    summary = json.loads((out / "optishear_prune.json").read_text())
    assert summary["block_sparsity"] == [0.25, 0.75]
    assert json.loads((out / "config.json").read_text())["use_cache"] is True
    assert model.config.use_cache is False


def test_card_without_a_hub_base_model_has_no_base_model_key(tmp_path):
    model = tiny_llama(layers=2)
    model.config.optishear_model_id = str(tmp_path)  # a local directory
    info = card_fields(model, card={"method": "magnitude"})
    text = render_model_card(info)
    assert "base_model:" not in text.split("---\n")[1] and "Not measured" in text
    assert hub_model_id("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_model_id(str(tmp_path)) is None and hub_model_id("org/name") == "org/name"


# Image loggers by their own APIs ------------------------------------------------------------
class MLflowClient:
    def __init__(self):
        self.artifacts = []

    def log_artifact(self, run_id, local_path, artifact_path=None):
        self.artifacts.append((run_id, local_path, artifact_path))


class MLflowLike:
    run_id = "run-1"

    def __init__(self):
        self.experiment = MLflowClient()


class CometExperiment:
    def __init__(self):
        self.images = []

    def log_image(self, path, name=None, step=None):
        self.images.append((path, name, step))


class CometLike:
    def __init__(self):
        self.experiment = CometExperiment()


def test_log_image_uses_each_loggers_own_api(tmp_path):
    from matplotlib import pyplot as plt

    png = tmp_path / "plot.png"
    fig = plt.figure(figsize=(1, 1))
    fig.savefig(png)
    plt.close(fig)
    mlflow, comet = MLflowLike(), CometLike()
    assert log_image(mlflow, "optishear/plot", png, 3)
    assert mlflow.experiment.artifacts == [("run-1", str(png), "optishear")]
    assert log_image(comet, "optishear/plot", png, 3)
    assert comet.experiment.images == [(str(png), "optishear/plot", 3)]
    assert not log_image(object(), "optishear/plot", png, 3)


# Terminal help -------------------------------------------------------------------------------
def test_help_text_helpers():
    assert plain_text("A :class:`~lightning.pytorch.Trainer` with ``prune``.") == (
        "A Trainer with prune."
    )
    assert plain_text(":paramref:`~a.b.Trainer.logger` and :func:`torch.no_grad`") == (
        "logger and torch.no_grad"
    )
    assert compact_type("Optional[Literal['obs', 'lsq']]") == "{obs, lsq} | null"
    assert compact_type("Union[int, float, NoneType]") == "int | float | NoneType"
    assert compact_type("list[Union[A, B]]") == "list[A | B]"
    text = "Runs n batches (e.g. 2). Then more."
    assert first_sentence(text) == "Runs n batches (e.g. 2)."
