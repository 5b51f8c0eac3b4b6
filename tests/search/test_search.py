"""End-to-end OptiShear search on tiny LLaMA models."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import stat

import numpy as np
import pytest
import torch

from optishear_lightning.masks import keep_mask_from_scores, num_pruned, parse_pattern
from optishear_lightning.models import find_decoder_blocks, find_prunable_linears
from optishear_lightning.pruning import as_calibration_batches, prune
from optishear_lightning.search import (
    MAGNITUDE,
    WANDA,
    MetaMetric,
    SearchResult,
    SearchState,
    driver,
    effective_space,
    optishear_prune,
    optishear_search,
    save_plots,
)
from optishear_lightning.search.config import SearchConfig
from optishear_lightning.search.context import SearchContext
from optishear_lightning.search.ratios import non_dominated
from optishear_lightning.search.result import atomic_write_json
from optishear_lightning.search.windows import split_calibration

from ..conftest import tiny_llama

IDS = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
LAYERS, HIDDEN = 4, 64
METRICS = [
    WANDA,
    MAGNITUDE,
    MetaMetric("sqrt", "identity", "column_sum", "none"),
    MetaMetric("identity", "square", "relative_sum", "column_sum"),
]
TOL = 0.005
SETTINGS = {
    "tolerance": TOL,
    "metric_candidates": METRICS,
    "metric_topk": 2,
    "proxy_blocks": 1,
    "budget": 30,
    "pop_size": 10,
    "objective_samples": 2,
    "objective_seq_len": 16,
    "validation_samples": 2,
    "baselines": [],  # the search machinery alone; the baselines have their own test
    "progress": False,
}


def model(layers: int = LAYERS, hidden: int = HIDDEN):
    return tiny_llama(0, layers, hidden)


def search(m=None, sparsity=0.5, **overrides) -> SearchResult:
    return optishear_search(model() if m is None else m, IDS, sparsity, **(SETTINGS | overrides))


def weights(m) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in m.named_parameters()}


def assert_unchanged(m, before):
    for name, p in m.named_parameters():
        assert torch.equal(p, before[name]), name


def ratio_entries(result: SearchResult) -> list[dict]:
    metric = result.search_pick["metric"]
    # The uniform ratios are evaluated once, by the metric search, and shared with the ratio
    # search: every model-wise evaluation of the chosen metric counts.
    return [h for h in result.history if "error" in h and h["metric"] == metric]


def objectives(history: list[dict]) -> list[tuple]:
    return [(h["kind"], h.get("error"), h.get("sparsity_gap"), h.get("proxy")) for h in history]


@pytest.fixture(scope="module")
def result() -> SearchResult:
    return search()


# The search ----------------------------------------------------------------------------------
def test_search_result(result):
    assert isinstance(result, SearchResult)
    pick_metric = MetaMetric.from_dict(result.search_pick["metric"])
    pick_ratios = result.search_pick["ratios"]
    assert pick_metric in METRICS
    assert len(result.ratios) == LAYERS
    assert result.candidates == [0.45, 0.5, 0.55]
    assert set(result.ratios) <= set(result.candidates)
    assert pick_ratios != [0.5] * LAYERS  # this model gains from non-uniform ratios
    assert result.target_sparsity == 0.5
    assert abs(result.achieved_sparsity - 0.5) <= TOL
    assert result.pattern == "unstructured" and result.group == "row"

    evaluated = [h for h in result.history if "error" in h and h["metric"] == pick_metric.to_dict()]
    assert 10 <= len(evaluated) <= 30
    assert evaluated[0]["ratios"] == [0.5] * LAYERS  # NSGA-III starts from uniform ratios
    assert evaluated[0]["sparsity_gap"] == 0.0
    chosen = next(h for h in evaluated if h["ratios"] == pick_ratios)
    assert chosen["error"] <= evaluated[0]["error"]
    assert chosen["sparsity_gap"] <= TOL
    feasible = [h["error"] for h in evaluated if h["sparsity_gap"] <= TOL]
    assert chosen["error"] == min(feasible)

    proxies = [h for h in result.history if h["kind"] == "metric_proxy"]
    assert [MetaMetric.from_dict(h["metric"]) for h in proxies] == METRICS
    assert all(math.isfinite(h["proxy"]) and h["proxy"] > 0 for h in proxies)
    finalists = [h for h in result.history if h["kind"] == "metric"]
    best = min(finalists, key=lambda h: h["error"])
    assert MetaMetric.from_dict(best["metric"]) == pick_metric
    assert WANDA.to_dict() in [h["metric"] for h in finalists]

    front = result.pareto_front
    assert front and [p["sparsity_gap"] for p in front] == sorted(p["sparsity_gap"] for p in front)
    points = np.array([[p["error"], p["sparsity_gap"]] for p in front])
    assert len(non_dominated(points)) == len(front)
    all_points = np.array([[h["error"], h["sparsity_gap"]] for h in evaluated])
    for p in points:  # nothing evaluated dominates a front point
        assert not np.any(np.all(all_points <= p, axis=1) & np.any(all_points < p, axis=1))

    # The chosen metric's uniform evaluation is both a finalist and the first ratio candidate.
    assert result.timing["model_evaluations"] == len(finalists) + len(evaluated) - 1
    assert result.settings["proxy_blocks"] == [0]
    assert result.layer_shapes[f"model.layers.{LAYERS - 1}.mlp.down_proj.weight"] == [64, 128]
    assert "pymoo" in result.versions
    assert result.chosen_by in result.summary()


@pytest.fixture(scope="module")
def with_baselines() -> SearchResult:
    return search(baselines=["wanda", "ria"])


def validation_of(pruned: torch.nn.Module) -> float:
    """The search's validation value (KL on its validation windows) of a pruned model."""
    windows = result_windows(pruned)
    ctx = SearchContext(
        model(), windows.statistics, [], parse_pattern("unstructured"),
        validation=windows.validation, objective_fn="kl",
    )  # fmt: skip
    for name, p in pruned.named_parameters():
        ctx.model.get_parameter(name).data.copy_(p)
    return ctx.evaluate("validation")


def test_result_is_never_worse_on_validation_than_the_baselines(with_baselines):
    result = with_baselines
    finals = result.finalists
    assert {f["method"].get("name") for f in finals if f["source"] == "baseline"} == {
        "wanda",
        "ria",
    }
    assert any(
        f["source"] == "search" and f["ratios"] == result.search_pick["ratios"] for f in finals
    )
    winner = min(finals, key=lambda f: f["validation"])
    assert winner["ratios"] == result.ratios and winner["source"] == result.chosen_by
    assert all(winner["validation"] <= f["validation"] for f in finals)
    assert all(math.isfinite(f["objective"]) and f["validation"] > 0 for f in finals)
    assert all(f["calibration"] == "all" for f in finals)
    # The model returned is the model validated: the final prune gives the winner's value.
    m = model()
    optishear_prune(m, IDS, 0.5, search_result=result, progress=False)
    assert validation_of(m) == pytest.approx(winner["validation"], rel=1e-4)


def test_finalists_pruned_on_the_statistics_rows_only():
    result = search(baselines=["wanda"], finalist_calibration="statistics")
    assert result.settings["finalist_calibration"] == "statistics"
    winner = min(result.finalists, key=lambda f: f["validation"])
    assert winner["calibration"] == "statistics"
    m = model()
    prune(m, result_windows(m).statistics, result.metric, result.ratios)
    assert validation_of(m) == pytest.approx(winner["validation"], rel=1e-4)
    # The final prune uses every row, so it is not the model validated here.
    final = model()
    optishear_prune(final, IDS, 0.5, search_result=result, progress=False)
    assert validation_of(final) != pytest.approx(winner["validation"], rel=1e-4)


def result_windows(m):
    return split_calibration(IDS, SearchConfig(**{k: SETTINGS[k] for k in WINDOW_KEYS}), 8)


WINDOW_KEYS = ("objective_samples", "objective_seq_len", "validation_samples")


def test_model_is_dense_after_search():
    m = model()
    before = weights(m)
    search(m)
    assert_unchanged(m, before)


def test_search_is_deterministic(result):
    again = search()
    assert again.ratios == result.ratios
    assert again.metric == result.metric
    assert again.history == result.history
    assert objectives(again.history) == objectives(result.history)
    assert again.pareto_front == result.pareto_front


def test_budget_larger_than_the_ratio_space():
    """2 blocks x 3 ratios = 9 vectors < budget 30: the search stops early, it does not crash."""
    result = search(model(2, 32))
    evaluated = ratio_entries(result)
    assert 1 <= len(evaluated) <= 9
    assert evaluated[0]["ratios"] == [0.5, 0.5]
    assert abs(result.achieved_sparsity - 0.5) <= TOL
    chosen = next(h for h in evaluated if h["ratios"] == result.search_pick["ratios"])
    assert chosen["error"] <= evaluated[0]["error"]


def test_fixed_metric_and_no_ratio_search():
    result = search(search_metric=False, metric=MAGNITUDE, search_ratios=False)
    assert result.metric == MAGNITUDE
    assert result.ratios == [0.5] * LAYERS
    assert [h["kind"] for h in result.history] == ["ratios", "finalist"]
    assert result.timing["model_evaluations"] == 1


def test_full_effective_space_on_one_proxy_block():
    result = optishear_search(
        model(2, 32),
        IDS,
        0.5,
        proxy_blocks=1,
        budget=8,
        pop_size=4,
        objective_samples=2,
        objective_seq_len=16,
        validation_samples=2,
        progress=False,
    )
    proxies = [h for h in result.history if h["kind"] == "metric_proxy"]
    assert [MetaMetric.from_dict(h["metric"]) for h in proxies] == effective_space("row")
    assert all(math.isfinite(h["proxy"]) for h in proxies)
    best_proxies = sorted(proxies, key=lambda h: h["proxy"])[:8]
    finalists = [h for h in result.history if h["kind"] == "metric"]
    expected = [h["metric"] for h in best_proxies]
    if WANDA.to_dict() not in expected:
        expected.append(WANDA.to_dict())
    assert [h["metric"] for h in finalists] == expected
    wanda_error = next(h["error"] for h in finalists if h["metric"] == WANDA.to_dict())
    assert min(h["error"] for h in finalists) <= wanda_error
    assert result.search_pick["metric"] == min(finalists, key=lambda h: h["error"])["metric"]


# The cached context --------------------------------------------------------------------------
def test_context_objective_matches_a_manual_computation():
    m = model()
    dense_logits = m(IDS[:2]).logits.detach()
    ctx = SearchContext(m, [IDS], [IDS[:2]], parse_pattern("unstructured"), proxy_blocks=[1])
    ratios = [0.45, 0.55, 0.5, 0.3]
    metric = METRICS[2]
    ctx.apply(metric, ratios)
    error = ctx.evaluate("objective")
    zeros = sum(int((lin.weight == 0).sum()) for lins in ctx.linears for lin in lins.values())
    ctx.restore()

    manual = model()
    names = find_decoder_blocks(manual)[0]
    pruned_expected = 0
    for i, block in enumerate(find_decoder_blocks(manual)[1]):
        for name, lin in find_prunable_linears(block).items():
            stats = ctx.stats[f"{names}.{i}.{name}.weight"]
            keep = keep_mask_from_scores(metric.score(lin.weight, stats), ratios[i])
            lin.weight.data *= keep
            pruned_expected += int((~keep).sum())
    manual_error = (manual(IDS[:2]).logits - dense_logits).norm().item()
    assert math.isclose(error, manual_error, rel_tol=1e-4)
    assert error > 0
    total = sum(rows * cols for rows, cols in ctx.shapes.values())
    assert zeros == pruned_expected
    assert ctx.achieved_sparsity(ratios) == pruned_expected / total
    assert ctx.evaluate("objective") == 0.0  # restored: dense again


def test_context_proxy_matches_a_manual_computation():
    m = model()
    inputs = {}
    _, blocks = find_decoder_blocks(m)
    linears = find_prunable_linears(blocks[1])

    def keep_input(name):
        def hook(module, args, output):
            inputs[name] = args[0].detach()

        return hook

    hooks = [lin.register_forward_hook(keep_input(n)) for n, lin in linears.items()]
    with torch.no_grad():
        m(IDS)
    for h in hooks:
        h.remove()
    ctx = SearchContext(m, [IDS], [IDS[:2]], parse_pattern("unstructured"), proxy_blocks=[1])
    for metric in (WANDA, METRICS[3]):
        errors = []
        for name, lin in linears.items():
            x = inputs[name].reshape(-1, lin.in_features)
            w = lin.weight.detach()
            keep = keep_mask_from_scores(
                metric.score(w, ctx.stats[f"model.layers.1.{name}.weight"]), 0.5
            )
            errors.append(((w * ~keep) @ x.T).norm() / (w @ x.T).norm())
        manual = torch.stack(errors).mean().item()
        assert math.isclose(ctx.proxy_error(metric, 0.5), manual, rel_tol=1e-3)
    assert ctx.proxy_error(WANDA, 0.0) == 0.0
    assert ctx.proxy_error(WANDA, 0.3) < ctx.proxy_error(WANDA, 0.7)


# Saved results -------------------------------------------------------------------------------
def test_result_round_trip(result, tmp_path):
    path = result.save(tmp_path / "sub" / "result.json")
    data = json.loads(path.read_text())
    assert data["kind"] == "search_result" and data["format_version"] == 1
    assert data["metric_formula"] == str(result.metric)  # a searched metric won here
    loaded = SearchResult.load(path)
    assert loaded == result
    assert loaded.metric == result.metric and isinstance(loaded.metric, MetaMetric)
    assert not [p for p in path.parent.iterdir() if p.name != "result.json"]  # no temp files


def test_truncated_or_foreign_result_file(result, tmp_path):
    path = result.save(tmp_path / "result.json")
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        SearchResult.load(path)
    path.write_text(json.dumps({"format_version": 1, "kind": "search_state", "history": []}))
    with pytest.raises(ValueError, match="not a search result"):
        SearchResult.load(path)
    path.write_text(json.dumps({"kind": "search_result"}))
    with pytest.raises(ValueError, match="format version"):
        SearchResult.load(path)
    data = result.to_dict()
    del data["ratios"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="incomplete or malformed"):
        SearchResult.load(path)
    with pytest.raises(FileNotFoundError):
        SearchResult.load(tmp_path / "missing.json")


@pytest.mark.parametrize(
    "layers,hidden,match", [(3, HIDDEN, "decoder blocks"), (LAYERS, 32, "differ")]
)
def test_result_refused_for_another_model(result, tmp_path, layers, hidden, match):
    path = result.save(tmp_path / "result.json")
    other = model(layers, hidden)
    before = weights(other)
    with pytest.raises(ValueError, match=match):
        result.check_compatible(other)
    with pytest.raises(ValueError, match=match):
        optishear_prune(other, IDS, 0.5, search_result=path, progress=False)
    assert_unchanged(other, before)
    result.check_compatible(model())  # the model it was found for


@pytest.mark.parametrize(
    "kwargs,match",
    [({"sparsity": 0.6}, "targets sparsity 0.5"), ({"pattern": "2:4"}, "pattern unstructured")],
)
def test_result_refused_for_other_settings(result, kwargs, match):
    m = model()
    before = weights(m)
    with pytest.raises(ValueError, match=match):
        optishear_prune(m, IDS, **({"sparsity": 0.5} | kwargs), search_result=result)
    assert_unchanged(m, before)


# Resumable state -----------------------------------------------------------------------------
def test_rerun_with_state_needs_no_model_evaluation(result, tmp_path):
    state = tmp_path / "state.json"
    first = search(state_path=state)
    assert first.timing["model_evaluations"] == result.timing["model_evaluations"]
    saved = json.loads(state.read_text())
    assert saved["kind"] == "search_state"
    assert saved["history"] == first.history
    second = search(state_path=state)
    assert second.timing["model_evaluations"] == 0
    assert second.ratios == first.ratios == result.ratios
    assert second.metric == first.metric
    assert second.history == first.history


def test_state_finalists_are_reused_only_for_the_same_calibration_rows(tmp_path, monkeypatch):
    state = tmp_path / "state.json"
    first = search(state_path=state, finalist_calibration="statistics")
    # A state file written before finalist_calibration existed: its finalists have no such key.
    saved = json.loads(state.read_text())
    for entry in saved["history"]:
        entry.pop("calibration", None)
    state.write_text(json.dumps(saved))
    prunes = []
    original = driver.prune
    monkeypatch.setattr(driver, "prune", lambda *a, **k: prunes.append(1) or original(*a, **k))
    again = search(state_path=state, finalist_calibration="statistics")
    assert prunes == []
    assert [f["validation"] for f in again.finalists] == [f["validation"] for f in first.finalists]
    on_all = search(state_path=state)  # pruned on all rows: not what the state holds
    assert len(prunes) == len(on_all.finalists) == len(first.finalists)
    assert on_all.timing["model_evaluations"] == 0  # the phases before the finalists are reused


def test_interrupted_search_resumes(result, tmp_path, monkeypatch):
    state = tmp_path / "state.json"
    original = SearchContext.evaluate
    calls = []

    def interrupt_after_15(self, *args, **kwargs):
        if len(calls) == 15:
            raise KeyboardInterrupt
        calls.append(1)
        return original(self, *args, **kwargs)

    m = model()
    before = weights(m)
    with monkeypatch.context() as patch:
        patch.setattr(SearchContext, "evaluate", interrupt_after_15)
        with pytest.raises(KeyboardInterrupt):
            search(m, state_path=state)
    assert len(calls) == 15
    assert_unchanged(m, before)  # dense again after the interrupt

    saved = json.loads(state.read_text())
    assert saved["kind"] == "search_state"
    done = [h for h in saved["history"] if "error" in h]
    assert 0 < len(done) <= 15
    assert saved["history"] == result.history[: len(saved["history"])]  # a prefix

    resumed = search(m, state_path=state)
    fresh = result.timing["model_evaluations"]
    assert resumed.timing["model_evaluations"] == fresh - len(done)
    assert resumed.timing["model_evaluations"] < fresh
    assert resumed.ratios == result.ratios
    assert resumed.metric == result.metric
    assert resumed.history == result.history
    assert_unchanged(m, before)


def test_unwritable_state_path_fails_before_any_work(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    m = model()
    monkeypatch.setattr(driver, "SearchContext", _untouchable)
    with pytest.raises(PermissionError, match=r"state_path .*a_file"):
        search(m, state_path=blocker / "state.json")


def test_saving_a_result_under_a_file_names_the_path(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match="a_file"):
        atomic_write_json(blocker / "result.json", {"a": 1})


def test_state_of_another_search_is_refused(tmp_path, monkeypatch):
    state = tmp_path / "state.json"
    search(state_path=state, budget=10)
    text = state.read_text()
    m = model()
    before = weights(m)
    monkeypatch.setattr(driver, "SearchContext", _untouchable)
    with pytest.raises(ValueError, match="different search") as info:
        search(m, sparsity=0.6, state_path=state, budget=10)
    assert "target" in str(info.value)
    with pytest.raises(ValueError, match="different search"):
        search(m, state_path=state, budget=11)
    other = tiny_llama(1, LAYERS, HIDDEN)  # same shapes, other weights
    with pytest.raises(ValueError, match="weights_digest"):
        search(other, state_path=state, budget=10)
    flipped = IDS.clone()
    flipped[0, 0] = (flipped[0, 0] + 1) % 128  # same shape, one other token
    with pytest.raises(ValueError, match="calibration_digest"):
        optishear_search(m, flipped, 0.5, **(SETTINGS | {"state_path": state, "budget": 10}))
    assert state.read_text() == text  # left alone
    assert_unchanged(m, before)


def test_saved_result_on_other_weights_warns_but_applies(result):
    other = tiny_llama(1, LAYERS, HIDDEN)
    with pytest.warns(UserWarning, match="other weights"):
        optishear_prune(other, IDS, 0.5, search_result=result, progress=False)


def test_corrupted_state_is_refused(tmp_path, monkeypatch):
    state = tmp_path / "state.json"
    search(state_path=state, budget=10)
    text = state.read_text()
    monkeypatch.setattr(driver, "SearchContext", _untouchable)
    state.write_text(text[: len(text) // 3])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        search(state_path=state, budget=10)
    state.write_text(json.dumps({"format_version": 1, "kind": "search_result"}))
    with pytest.raises(ValueError, match="not a search state"):
        search(state_path=state, budget=10)
    good = json.loads(text)
    for damage, match in [
        (lambda h: h[0].update(proxy="abc"), "proxy is 'abc', not a number"),
        (lambda h: next(e for e in h if e["kind"] == "ratios").pop("error"), "without"),
        (lambda h: h.append(["not", "a", "record"]), "not an evaluation record"),
    ]:
        data = json.loads(json.dumps(good))
        damage(data["history"])
        state.write_text(json.dumps(data))
        with pytest.raises(ValueError, match=f"{state}.*corrupted.*{match}"):
            search(state_path=state, budget=10)
    with pytest.raises(ValueError, match="is a directory"):
        search(state_path=tmp_path, budget=10)


def test_state_round_trip(tmp_path):
    entry = {"kind": "metric_proxy", "metric": WANDA.to_dict(), "proxy": 0.25}
    state = SearchState({"a": [1, 2], "b": None}, [entry])
    path = tmp_path / "s.json"
    state.save(path)
    loaded = SearchState.load_or_new(path, {"b": None, "a": [1, 2]})
    assert loaded.history == state.history
    fresh = SearchState.load_or_new(tmp_path / "none.json", {"a": 1})
    assert fresh.history == [] and fresh.fingerprint == {"a": 1}


# Bad input -----------------------------------------------------------------------------------
def _untouchable(*args, **kwargs):
    raise AssertionError("the search reached the model")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"sparsity": 0.02, "delta": 0.05}, "delta"),
        ({"sparsity": 0.97, "delta": 0.05}, "delta"),
        ({"delta": 0.0}, "delta"),
        ({"candidates": [0.4, 0.6]}, "include the target"),
        ({"candidates": [0.1, 0.2]}, "reachable range"),
        ({"candidates": []}, "empty"),
        ({"metric_candidates": []}, "metric_candidates is empty"),
        ({"sparsity": 1.0}, r"\[0, 1\)"),
        ({"group": "column"}, "group"),
        ({"pattern": "5:4"}, "N < M"),
        ({"budget": 0}, "budget"),
        ({"pop_size": 1}, "pop_size"),
        ({"metric_topk": 0}, "metric_topk"),
        ({"objective_samples": 0}, "objective_samples"),
        ({"calibration": torch.empty(0, 8, dtype=torch.long)}, "empty"),
        ({"permute": True}, "N:M"),
    ],
)
def test_bad_input_fails_before_the_model_is_touched(kwargs, match, monkeypatch, tmp_path):
    m = model(2, 32)
    before = weights(m)
    monkeypatch.setattr(driver, "SearchContext", _untouchable)
    args = {"calibration": IDS, "sparsity": 0.5, **SETTINGS, **kwargs}
    with pytest.raises(ValueError, match=match):
        optishear_search(m, state_path=tmp_path / "state.json", **args)
    assert_unchanged(m, before)
    assert not (tmp_path / "state.json").exists()


# N:M, other engine methods, plots ------------------------------------------------------------
def test_nm_pattern(monkeypatch):
    def no_ratio_phase(*args, **kwargs):
        raise AssertionError("N:M fixes every block's sparsity: no ratio search")

    monkeypatch.setattr(driver, "run_nsga3", no_ratio_phase)
    m = model()
    before = weights(m)
    result = search(m, None, pattern="2:4")
    assert_unchanged(m, before)
    assert result.pattern == "2:4"
    assert result.ratios == [0.5] * LAYERS
    assert result.candidates == [0.5]
    assert result.achieved_sparsity == result.target_sparsity == 0.5
    assert [h["ratios"] for h in ratio_entries(result)] == [[0.5] * LAYERS]
    assert len([h for h in result.history if h["kind"] == "metric_proxy"]) == len(METRICS)
    assert result.metric in METRICS

    pruned, found = optishear_prune(m, IDS, pattern="2:4", search_result=result, progress=False)
    assert found is result
    assert pruned.method == result.metric.name
    assert len(pruned.masks) == 7 * LAYERS
    for name, keep in pruned.masks.items():
        assert (keep.reshape(keep.shape[0], -1, 4).sum(-1) == 2).all(), name
    params = dict(m.named_parameters())
    for name, keep in pruned.masks.items():
        assert torch.equal(params[name] != 0, keep), name


def test_prune_with_another_method_uses_searched_ratios(result):
    ratios = [0.45, 0.55, 0.5, 0.3]
    found = dataclasses.replace(result, ratios=ratios)
    m = model()
    pruned, _ = optishear_prune(m, IDS, 0.5, search_result=found, method="ria", progress=False)
    assert pruned.method == "ria"
    assert pruned.block_sparsity == ratios
    reference = model()
    expected = prune(reference, IDS, "ria", ratios)
    blocks_name, blocks = find_decoder_blocks(m)
    for i, block in enumerate(blocks):
        for name, lin in find_prunable_linears(block).items():
            zeros_per_row = (lin.weight == 0).sum(1)
            assert (zeros_per_row == num_pruned(lin.in_features, ratios[i])).all(), (i, name)
            fqn = f"{blocks_name}.{i}.{name}.weight"
            assert torch.equal(pruned.masks[fqn], expected.masks[fqn]), fqn
    # RIA, not the searched metric, chose the masks.
    metric_pruned = prune(model(), IDS, result.metric, ratios)
    assert any(not torch.equal(pruned.masks[k], metric_pruned.masks[k]) for k in pruned.masks)


def test_prune_searches_when_no_result_given(result):
    m = model()
    pruned, found = optishear_prune(m, IDS, 0.5, **SETTINGS)
    assert found.ratios == result.ratios
    assert found.metric == result.metric
    assert pruned.method == result.metric.name
    assert pruned.block_sparsity == found.ratios
    assert abs(pruned.overall_sparsity - found.achieved_sparsity) < 1e-6


def test_save_plots(result, tmp_path, capsys):
    paths = save_plots(result, tmp_path / "plots")
    assert sorted(p.name for p in paths) == ["layer_ratios.png", "pareto_front.png"]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(data) > 1000
    from optishear_lightning.search import print_summary

    print_summary(result)
    assert "OptiShear search result" in capsys.readouterr().out


def test_calibration_forms_agree(result):
    """A list of batches gives the same search as one tensor."""
    again = optishear_search(model(), as_calibration_batches(IDS, 3), 0.5, **SETTINGS)
    assert again.ratios == result.ratios
    assert again.metric == result.metric


def test_row_sampled_proxy():
    m = model()
    full = SearchContext(m, [IDS], [IDS[:2]], parse_pattern("unstructured"), proxy_blocks=[1])
    rows = min(
        lin.out_features for lin in find_prunable_linears(find_decoder_blocks(m)[1][1]).values()
    )
    # Sampling at least every row is the exact proxy.
    same = SearchContext(
        m, [IDS], [IDS[:2]], parse_pattern("unstructured"), proxy_blocks=[1], proxy_rows=10_000
    )
    assert same.proxy_error(WANDA, 0.5) == full.proxy_error(WANDA, 0.5)
    # A row sample estimates it: close, but computed on fewer rows (so not identical).
    sampled = SearchContext(
        m, [IDS], [IDS[:2]], parse_pattern("unstructured"), proxy_blocks=[1], proxy_rows=rows // 2
    )
    estimate, exact = sampled.proxy_error(WANDA, 0.5), full.proxy_error(WANDA, 0.5)
    assert estimate != exact
    assert math.isclose(estimate, exact, rel_tol=0.25)


def test_model_must_be_on_the_search_device():
    with pytest.raises(ValueError, match=r"model.to\('meta'\)"):
        search(device="meta")


def test_device_names_match_loosely():
    from optishear_lightning.search.driver import _same_device

    assert _same_device(torch.device("cuda", 0), "cuda")
    assert _same_device(torch.device("cpu"), "cpu")
    assert not _same_device(torch.device("cuda", 1), "cuda:0")
    assert not _same_device(torch.device("cpu"), "cuda")


def test_result_and_state_files_follow_the_umask(result, tmp_path):
    old = os.umask(0o022)
    try:
        path = result.save(tmp_path / "result.json")
        SearchState({"a": 1}).save(tmp_path / "state.json")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "state.json").stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json", "state.json"]


def test_nm_search_with_permutation_prunes_finalists_and_final_model_permuted():
    m = model()
    before = weights(m)
    result = search(m, None, pattern="2:4", permute=True, baselines=["wanda"])
    assert_unchanged(m, before)  # finalists were permuted and pruned, then restored
    assert result.settings["permute"] is True
    assert all(f["permute"] is True for f in result.finalists)
    plain = model()
    prune(plain, IDS, result.metric, None, "2:4")
    pruned, _ = optishear_prune(m, IDS, pattern="2:4", search_result=result, progress=False)
    params = dict(m.named_parameters())
    for name, keep in pruned.masks.items():
        assert (keep.reshape(keep.shape[0], -1, 4).sum(-1) == 2).all(), name
        assert torch.equal(params[name] != 0, keep), name
    # The down projections' columns moved: the permuted model differs from the plain prune.
    down = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(params[down], dict(plain.named_parameters())[down])
