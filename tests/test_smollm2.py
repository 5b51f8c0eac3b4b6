"""End-to-end checks on the real SmolLM2-135M (reduced calibration and evaluation sizes)."""

import pytest
import torch

from optishear_lightning.data import calibration_windows, evaluation_tokens
from optishear_lightning.evaluation import perplexity
from optishear_lightning.models import load_model
from optishear_lightning.pruning import prune, save_pruned_model

from .conftest import SHARED_DATA, requires_shared_data, requires_smollm2

pytestmark = [pytest.mark.slow, requires_smollm2, requires_shared_data]

EVAL_SEQ_LEN = 512
EVAL_WINDOWS = 4


@pytest.fixture(scope="module")
def setup(tokenizer):
    torch.manual_seed(0)
    calib = calibration_windows(
        SHARED_DATA / "c4" / "c4-train.00000-of-01024.head1041.jsonl",
        tokenizer,
        n_samples=8,
        seq_len=256,
        seed=0,
    )
    tokens = evaluation_tokens(SHARED_DATA / "wikitext2" / "wiki.test.raw", tokenizer)
    return calib, tokens[: EVAL_SEQ_LEN * EVAL_WINDOWS]


def ppl(model, tokens):
    return perplexity(model, tokens, seq_len=EVAL_SEQ_LEN)


@pytest.fixture(scope="module")
def results(setup, tmp_path_factory):
    calib, tokens = setup
    out = {"dense": ppl(load_model("smollm2-135m"), tokens)}
    for method in ("magnitude", "wanda", "ria", "sparsegpt"):
        model = load_model("smollm2-135m")
        result = prune(model, calib, method, 0.5)
        # Exact sparsity on the real (quantised, tie-heavy) weights: every row of every layer.
        for name, keep in result.masks.items():
            pruned_per_row = (~keep).sum(1)
            assert (pruned_per_row == keep.shape[1] // 2).all(), name
        out[method] = ppl(model, tokens)
        if method == "wanda":
            path = save_pruned_model(model, tmp_path_factory.mktemp("s") / "wanda")
            out["wanda_reloaded"] = ppl(load_model(path), tokens)
    return out


def test_method_ordering(results):
    dense = results["dense"]
    for method in ("wanda", "ria", "sparsegpt"):
        assert dense < results[method], results
        # "<<": magnitude is far worse than every calibrated method.
        assert 2 * results[method] < results["magnitude"], results


def test_saved_model_reloads_with_same_perplexity(results):
    assert results["wanda_reloaded"] == pytest.approx(results["wanda"], rel=1e-5)


def test_two_four_pattern(setup):
    calib, tokens = setup
    model = load_model("smollm2-135m")
    result = prune(model, calib, "wanda", None, "2:4")
    for name, keep in result.masks.items():
        assert (keep.reshape(keep.shape[0], -1, 4).sum(-1) == 2).all(), name
    assert torch.isfinite(torch.tensor(ppl(model, tokens)))
