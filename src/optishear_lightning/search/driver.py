"""The OptiShear search in five phases: screen metrics, decide the metric, search ratios,
validate finalists, return the result.

1. **Screen** (:meth:`_Search.screen_metrics`): every metric of the *effective* space (441 for
   row groups) is scored by the layer-wise proxy (Gram-matrix reconstruction error on a few
   blocks). A space this small is cheaper to screen completely than to sample with a genetic
   algorithm, and exhaustive screening cannot miss the proxy's optimum.
2. **Decide the metric**: the ``metric_topk`` best by proxy, plus Wanda, are scored by the
   model-wise objective (:mod:`.objectives`) on the *objective* windows.
3. **Ratios** (unstructured only; skipped for N:M, which fixes every block's sparsity):
   NSGA-III over one ratio per block (:mod:`.ratios`).
4. **Validate**: the best distinct candidates, the chosen metric at uniform ratios, and the
   fixed baselines (uniform Wanda and RIA by default) are *really* pruned -- sequentially, on
   all calibration rows, with the configured reconstruction: exactly as the final prune is --
   and scored on held-out *validation* windows. The lowest validation value wins, so the model
   returned is never worse there than the best baseline; if a baseline wins, the result says so.
5. **Result**: a :class:`SearchResult` that records every evaluation and every finalist.

Candidates in phases 2-3 are scored with dense-model statistics and cached weights (fast);
phase 4 is where the search meets what the final prune really does. With ``state_path`` the
history is saved during every phase, and a rerun takes what was already computed from it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..masks import check_group, parse_pattern, validate_sparsity
from ..metrics import PruningMethod, get_method
from ..models import find_decoder_blocks
from ..progress import ProgressBar
from ..pruning import (
    PruneResult,
    as_calibration_batches,
    check_token_ids,
    prune,
    resolve_block_sparsities,
)
from .config import SearchConfig
from .context import SearchContext
from .distributed import CandidateShard
from .ratios import non_dominated, run_nsga3, select_solution
from .result import (
    SearchResult,
    SearchState,
    layer_shapes,
    method_from_dict,
    method_to_dict,
    tokens_digest,
    weights_digest,
)
from .result import versions as package_versions
from .space import WANDA, MetaMetric, effective_space
from .windows import SearchWindows, split_calibration

__all__ = ["optishear_prune", "optishear_search"]

# How many screened metrics between two saves of the state file.
_SCREEN_SAVE_EVERY = 25

# Settings of the finalist phase alone: each finalist's history key records them instead of the
# state's identity, so one state serves every value of them.
_FINALIST_SETTINGS = ("reconstruct", "permute", "finalists", "baselines", "finalist_calibration")


def _spread(n_blocks: int, count: int | None) -> list[int]:
    if count is None or count >= n_blocks:
        return list(range(n_blocks))
    return sorted({round(i * (n_blocks - 1) / max(count - 1, 1)) for i in range(count)})


def optishear_search(
    model: nn.Module,
    calibration: Any,
    sparsity: float | None = 0.5,
    pattern: str = "unstructured",
    group: str = "row",
    *,
    config: SearchConfig | None = None,
    metric: MetaMetric | None = None,
    metric_candidates: Sequence[MetaMetric] | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    state_path: str | Path | None = None,
    progress: bool = True,
    distributed: bool | None = None,
    **settings: Any,
) -> SearchResult:
    """Search a pruning metric and per-block sparsity ratios for ``model``.

    The model's weights are left dense when the search returns.

    Args:
        model: a causal LM.
        calibration: calibration token ids (``(n, seq_len)`` tensor, list of tensors or a
            dataloader of ``input_ids``); split into statistics, objective and validation
            windows (:func:`~.windows.split_calibration`).
        sparsity: target global sparsity (``None`` or the implied value for N:M patterns).
        pattern: ``"unstructured"`` or ``"N:M"``.
        group: comparison group of unstructured masks.
        config: the search settings (:class:`SearchConfig`).
        metric: the metric when ``search_metric`` is off (default Wanda).
        metric_candidates: metrics to screen (default: the effective space).
        batch_size: sequences per forward pass.
        device: where the model runs (default: its device); the whole model must already be
            there, since every candidate runs a full forward pass.
        state_path: JSON file for resumable state (written by rank 0 only; a state written
            with any number of ranks resumes with any other).
        progress: progress bars and a summary table (rank 0 only).
        distributed: share the candidates across the ranks of the initialised
            ``torch.distributed`` process group (:mod:`.distributed`): each rank holds a
            replica and evaluates its share; every rank returns the same result as one process
            would. ``None``: when a group with several ranks exists; ``False``: never.
        **settings: :class:`SearchConfig` fields that override ``config``
            (``optishear_search(model, calib, 0.5, budget=50)``).

    Returns:
        A :class:`SearchResult`.

    Raises:
        ValueError: bad arguments (before any computation).
    """
    cfg = (config or SearchConfig()).replace(**settings) if settings else config or SearchConfig()
    shard = CandidateShard.current(distributed)
    search = _Search(model, calibration, sparsity, pattern, group, cfg, batch_size, device, shard)
    search.check_metrics(metric, metric_candidates)
    search.start(state_path, progress and shard.is_leader)
    try:
        if cfg.search_metric:
            search.screen_metrics()
            search.decide_metric()
        if search.run_ratios:
            search.search_ratios()
        else:
            search.model_error(search.chosen, search.uniform, "ratios")
        search.validate_finalists()
    finally:
        search.ctx.restore()
        search.save_state()
    result = search.result()
    if progress and shard.is_leader:
        from .report import print_summary

        print_summary(result)
    return result


class _Search:
    """State shared by the phases of one search: settings, context, history, timings."""

    def __init__(
        self, model, calibration, sparsity, pattern, group, cfg, batch_size, device, shard
    ):
        self.shard: CandidateShard = shard
        self.pat = parse_pattern(pattern)
        # N:M: the engine's own check (sparsity unset or the implied value) gives the target.
        self.target = (
            resolve_block_sparsities(sparsity, 1, str(self.pat))[0]
            if self.pat.is_nm
            else validate_sparsity(sparsity, "target sparsity")
        )
        check_group(group, self.pat)
        self.model, self.group, self.cfg, self.batch_size = model, group, cfg, batch_size
        if cfg.permute and not self.pat.is_nm:
            raise ValueError(
                "SearchConfig.permute arranges input channels for N:M groups; with an "
                "unstructured pattern it has nothing to do: set permute=False or an N:M pattern."
            )
        self.run_ratios = cfg.search_ratios and not self.pat.is_nm
        self.cand = cfg.ratio_candidates(self.target) if self.run_ratios else [self.target]
        home = {p.device for p in model.parameters()}
        if device is not None and not all(_same_device(d, device) for d in home):
            raise ValueError(
                f"The search runs the whole model on {device}, but its weights are on "
                f"{sorted(str(d) for d in home)}; call model.to({str(device)!r}) first (or "
                "leave device unset). Block-at-a-time offloading is only for prune()."
            )
        self.device = device
        self.rows = torch.cat(as_calibration_batches(calibration, batch_size))
        check_token_ids([self.rows], model)
        self.windows: SearchWindows = split_calibration(
            self.rows, cfg, batch_size, getattr(model.config, "bos_token_id", None)
        )
        self.n_blocks = len(find_decoder_blocks(model)[1])
        self.weights_digest = weights_digest(model)
        shard.check_same("weights", self.weights_digest)
        self.calibration_digest = tokens_digest(self.rows)
        shard.check_same("calibration tokens", self.calibration_digest)
        self.uniform = [self.target] * self.n_blocks
        self.chosen: PruningMethod = WANDA
        self.pool: list[MetaMetric] = []
        self.timing: dict[str, float] = {}
        self.model_evals = 0
        self.finalists: list[dict] = []

    def check_metrics(self, metric: MetaMetric | None, candidates: Sequence | None) -> None:
        if self.cfg.search_metric:
            if candidates is not None and not list(candidates):
                raise ValueError("metric_candidates is empty; leave it unset for the full space.")
            self.pool = list(candidates) if candidates is not None else effective_space(self.group)
        else:
            self.chosen = metric or WANDA

    # Set-up ------------------------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "model_id": _model_id(self.model),
            "layer_shapes": layer_shapes(self.model),
            "target": self.target,
            "pattern": str(self.pat),
            "group": self.group,
            "candidates": self.cand,
            "calibration_shape": list(self.rows.shape),
            # Same shapes are not the same search: another model or other calibration text
            # must not take this state's objective values.
            "weights_digest": self.weights_digest,
            "calibration_digest": self.calibration_digest,
            "metric": None if cfg.search_metric else method_to_dict(self.chosen),
            "metric_pool": [m.to_dict() for m in self.pool] if self.pool else None,
            "proxy_blocks": self._proxy_blocks(),
            "settings": {k: v for k, v in cfg.to_dict().items() if k not in _FINALIST_SETTINGS}
            | {"budget": cfg.budget if self.run_ratios else 0},
        }

    def _proxy_blocks(self) -> list[int]:
        return _spread(self.n_blocks, self.cfg.proxy_blocks) if self.cfg.search_metric else []

    def start(self, state_path: str | Path | None, progress: bool) -> None:
        self.state_path, self.progress = state_path, progress
        fingerprint = self.fingerprint()
        history = None
        if self.shard.is_leader:
            history = SearchState.load_or_new(state_path, fingerprint).history
        # Rank 0's state file only: every rank then resumes from the same history.
        self.state = SearchState(fingerprint, self.shard.leader_value(history))
        self.cache = {json_key(h): h for h in self.state.history}
        self.started = time.perf_counter()
        self.ctx = SearchContext(
            self.model,
            self.windows.statistics,
            self.windows.objective,
            self.pat,
            self.group,
            self._proxy_blocks(),
            self.device,
            self.progress,
            proxy_rows=self.cfg.proxy_rows,
            validation=self.windows.validation,
            objective_fn=self.cfg.objective,
        )
        self.timing["calibration_s"] = time.perf_counter() - self.started

    def save_state(self) -> None:
        if self.state_path is not None and self.shard.is_leader:
            self.state.save(self.state_path)

    def record(self, entry: dict) -> dict:
        key = json_key(entry)
        if key not in self.cache:
            self.cache[key] = entry
            self.state.history.append(entry)
        return self.cache[key]

    def model_error(self, chosen: MetaMetric, ratios: Sequence[float], kind: str) -> float:
        """Objective of ``chosen`` at ``ratios`` with dense statistics (cached in the history)."""
        return self.model_errors([(chosen, ratios)], kind)[0][0]

    def model_errors(
        self, candidates: Sequence[tuple[MetaMetric, Sequence[float]]], kind: str
    ) -> list[tuple[float, float]]:
        """``(objective, sparsity gap)`` of each ``(metric, ratios)``; the ones not in the
        history are shared across the ranks and recorded in order."""
        entries = [{"kind": kind, "metric": m.to_dict(), "ratios": list(r)} for m, r in candidates]
        todo = list({json_key(e): e for e in entries if _missing(self.cache, e, "error")}.values())

        def evaluate(entry: dict) -> tuple[float, float]:
            self.ctx.apply(MetaMetric.from_dict(entry["metric"]), entry["ratios"])
            try:
                err = self.ctx.evaluate("objective")
            finally:
                self.ctx.restore()
            return err, abs(self.ctx.achieved_sparsity(entry["ratios"]) - self.target)

        def scores(value: tuple[float, float]) -> dict[str, float]:
            self.model_evals += 1
            return {"error": value[0], "sparsity_gap": value[1]}

        self._evaluate_missing(todo, evaluate, scores)
        return [(self.cache[json_key(e)]["error"], self.cache[json_key(e)]["sparsity_gap"])
                for e in entries]  # fmt: skip

    def _evaluate_missing(
        self,
        todo: Sequence[dict],
        evaluate: Callable[[dict], Any],
        fields: Callable[[Any], dict],
        save_every: int | None = None,
        bar: ProgressBar | None = None,
    ) -> None:
        """Evaluate the history entries ``todo``, shared across the ranks, and record each
        (``entry | fields(value)``) as soon as every rank has it.

        Args:
            todo: entries not in the history yet, in the order every rank sees them.
            evaluate: computes one entry's value on this rank's replica.
            fields: what the value adds to the entry.
            save_every: save the state after every this many entries per rank (``None``:
                the caller saves).
            bar: advanced as entries are done.
        """
        chunk = len(todo) if save_every is None else save_every * self.shard.world_size
        for start in range(0, len(todo), max(chunk, 1)):
            part = todo[start : start + chunk]
            self.shard.map(evaluate, part, lambda entry, value: self.record(entry | fields(value)))
            if save_every is not None:
                self.save_state()
            if bar is not None:
                bar.update(len(part))

    # Phases ------------------------------------------------------------------------------
    def screen_metrics(self) -> None:
        """Phase 1: the proxy of every metric in the pool (shared across ranks, saved as it
        goes)."""
        t0 = time.perf_counter()
        sparsity = None if self.pat.is_nm else self.target
        entries = [{"kind": "metric_proxy", "metric": m.to_dict()} for m in self.pool]
        todo = [e for e in entries if _missing(self.cache, e, "proxy")]
        with ProgressBar(len(self.pool), "metric proxy", self.progress) as bar:
            bar.update(len(entries) - len(todo))
            self._evaluate_missing(
                todo,
                lambda e: self.ctx.proxy_error(MetaMetric.from_dict(e["metric"]), sparsity),
                lambda proxy: {"proxy": proxy},
                save_every=_SCREEN_SAVE_EVERY,
                bar=bar,
            )
        self.screened = []
        for entry, m in zip(entries, self.pool, strict=True):
            value = self.cache[json_key(entry)]["proxy"]
            self.screened.append((value if math.isfinite(value) else math.inf, m))
        self.save_state()
        self.timing["metric_screen_s"] = time.perf_counter() - t0

    def decide_metric(self) -> None:
        """Phase 2: the proxy's best ``metric_topk`` (and Wanda) by the model-wise objective."""
        t0 = time.perf_counter()
        ranked = [m for _, m in sorted(self.screened, key=lambda t: t[0])]
        top = ranked[: self.cfg.metric_topk]
        if WANDA not in top:
            top.append(WANDA)
        with ProgressBar(len(top), "metric objective", self.progress) as bar:
            errs = [err for err, _ in self.model_errors([(m, self.uniform) for m in top], "metric")]
            bar.update(len(top))
        self.chosen = top[int(np.argmin(errs))]
        self.save_state()
        self.timing["metric_decide_s"] = time.perf_counter() - t0

    def search_ratios(self) -> None:
        """Phase 3: NSGA-III over per-block ratios with the chosen metric."""
        t0 = time.perf_counter()
        cand, target = self.cand, self.target
        uniform_choice = cand.index(min(cand, key=lambda c: abs(c - target)))
        with ProgressBar(self.cfg.budget, "ratio search", self.progress) as bar:

            def evaluate_population(X: np.ndarray) -> list[tuple[float, float]]:
                ratio_sets = [[cand[int(i)] for i in x] for x in X]
                values = self.model_errors([(self.chosen, r) for r in ratio_sets], "ratios")
                bar.update(len(X))
                return values

            run_nsga3(
                evaluate_population,
                self.n_blocks,
                len(cand),
                self.cfg.budget,
                self.cfg.pop_size,
                self.cfg.seed,
                uniform_choice,
                on_generation=self.save_state,
            )
        self.timing["ratio_search_s"] = time.perf_counter() - t0

    def finalist_candidates(self) -> list[tuple[PruningMethod, list[float], str]]:
        """The search's best distinct candidates within tolerance, its metric at uniform
        ratios, and the baselines: ``(method, ratios, source)``."""
        evaluated = [
            h
            for h in self.state.history
            if "error" in h and h["sparsity_gap"] <= self.cfg.tolerance + 1e-12
        ]
        evaluated.sort(key=lambda h: h["error"])
        picks: list[tuple[PruningMethod, list[float], str]] = []
        seen: set[str] = set()

        def add(method: PruningMethod, ratios: list[float], source: str) -> None:
            if method == WANDA:
                method = get_method("wanda")  # the same masks: prune and list it once
            key = json.dumps([method_to_dict(method), ratios])
            if key not in seen:
                seen.add(key)
                picks.append((method, ratios, source))

        for h in evaluated[: self.cfg.finalists]:
            add(MetaMetric.from_dict(h["metric"]), list(h["ratios"]), "search")
        add(self.chosen, list(self.uniform), "search")
        for name in self.cfg.baseline_methods():
            add(get_method(name), list(self.uniform), "baseline")
        return picks

    def validate_finalists(self) -> None:
        """Phase 4: really prune each finalist, score it on objective and validation windows."""
        t0 = time.perf_counter()
        picks = self.finalist_candidates()
        entries = [self._finalist_entry(method, ratios, source) for method, ratios, source in picks]
        todo = [e for e in entries if _missing(self.cache, e, "validation")]
        with ProgressBar(len(picks), "finalists", self.progress) as bar:
            bar.update(len(entries) - len(todo))
            # One finalist per rank at a time, saved after each: a finalist is a real prune.
            self._evaluate_missing(todo, self._validate, dict, save_every=1, bar=bar)
        self.finalists = [self.cache[json_key(e)] for e in entries]
        self.save_state()
        self.timing["validation_s"] = time.perf_counter() - t0

    def _finalist_entry(self, method: PruningMethod, ratios: list[float], source: str) -> dict:
        return {
            "kind": "finalist",
            "method": method_to_dict(method),
            "ratios": ratios,
            "reconstruct": self.cfg.reconstruct,
            "permute": self.cfg.permute,
            "calibration": self.cfg.finalist_calibration,
            "source": source,
        }

    def _validate(self, entry: dict) -> dict[str, float]:
        """Really prune one finalist on this rank's replica; its scores, weights restored."""
        ratios = entry["ratios"]
        rows = (
            self.windows.statistics
            if entry["calibration"] == "statistics"
            else list(self.rows.split(self.batch_size))
        )
        prune(
            self.model,
            rows,
            method_from_dict(entry["method"]),
            None if self.pat.is_nm else ratios,
            str(self.pat),
            self.group,
            batch_size=self.batch_size,
            device=self.device,
            keep_masks=False,
            atomic=False,
            reconstruct=self.cfg.reconstruct,
            permute=self.cfg.permute,
        )
        try:
            scores = {
                "objective": self.ctx.evaluate("objective"),
                "validation": self.ctx.evaluate("validation"),
            }
        finally:
            self.ctx.restore()
        scores["sparsity_gap"] = abs(self.ctx.achieved_sparsity(ratios) - self.target)
        return scores

    # Result --------------------------------------------------------------------------------
    def result(self) -> SearchResult:
        winner = min(self.finalists, key=lambda f: f["validation"])
        searched = [
            h for h in self.state.history if "error" in h and h["metric"] == self.chosen.to_dict()
        ]
        errors = [h["error"] for h in searched]
        gaps = [h["sparsity_gap"] for h in searched]
        front = sorted(
            (
                {"ratios": searched[i]["ratios"], "error": errors[i], "sparsity_gap": gaps[i]}
                for i in non_dominated(np.column_stack([errors, gaps]))
            ),
            key=lambda p: p["sparsity_gap"],
        )
        best_search = searched[select_solution(errors, gaps, self.cfg.tolerance)]
        total = time.perf_counter() - self.started
        phases = sum(v for k, v in self.timing.items() if k != "calibration_s")
        self.timing |= {
            "total_s": total,
            "model_evaluations": self.model_evals,
            "evaluations_per_s": self.model_evals / phases if phases > 0 else 0.0,
        }
        return SearchResult(
            metric=method_from_dict(winner["method"]),
            ratios=list(winner["ratios"]),
            target_sparsity=self.target,
            achieved_sparsity=self.ctx.achieved_sparsity(winner["ratios"]),
            pattern=str(self.pat),
            group=self.group,
            candidates=self.cand,
            pareto_front=front,
            history=self.state.history,
            seed=self.cfg.seed,
            model_id=_model_id(self.model),
            layer_shapes=layer_shapes(self.model),
            settings=self.cfg.to_dict()
            | {"calibration_shape": list(self.rows.shape), "proxy_blocks": self._proxy_blocks()},
            timing=self.timing,
            versions=package_versions(),
            finalists=self.finalists,
            chosen_by=winner["source"],
            search_pick={"metric": best_search["metric"], "ratios": best_search["ratios"]},
            reconstruct=self.cfg.reconstruct,
            weights_digest=self.weights_digest,
        )


def optishear_prune(
    model: nn.Module,
    calibration: Any,
    sparsity: float | None = 0.5,
    pattern: str = "unstructured",
    group: str = "row",
    *,
    search_result: SearchResult | str | Path | None = None,
    method: str | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: bool = True,
    **search_kwargs: Any,
) -> tuple[PruneResult, SearchResult]:
    """Search (or reuse a saved search) and prune ``model`` in place.

    The final prune uses *all* calibration rows (statistics, objective and validation windows
    alike), as the finalists were pruned by default (``finalist_calibration="all"``): the model
    returned is the one that won the validation.

    Args:
        model: a causal LM.
        calibration: calibration token ids.
        sparsity: target sparsity.
        pattern: mask layout.
        group: comparison group.
        search_result: a :class:`SearchResult` or a path to one; skips the search.
        method: prune with an engine method (``"wanda"``, ``"ria"``...) and the searched
            ratios instead of the searched metric.
        batch_size: sequences per forward pass.
        device: where blocks run.
        progress: progress bars.
        **search_kwargs: passed to :func:`optishear_search` (``config=``, SearchConfig fields,
            ``state_path``...).
    """
    pat = parse_pattern(pattern)
    if search_result is None:
        found = optishear_search(
            model,
            calibration,
            sparsity,
            pattern,
            group,
            batch_size=batch_size,
            device=device,
            progress=progress,
            **search_kwargs,
        )
    else:
        found = (
            search_result
            if isinstance(search_result, SearchResult)
            else SearchResult.load(search_result)
        )
        found.check_compatible(model)
        found.warn_if_other_weights(model)
        if str(pat) != found.pattern:
            raise ValueError(
                f"The search result was found for pattern {found.pattern}, not {pattern}."
            )
        if not pat.is_nm and abs(found.target_sparsity - sparsity) > 1e-9:
            raise ValueError(
                f"The search result targets sparsity {found.target_sparsity}, not {sparsity}; "
                "search again or use the same target."
            )
    result = prune(
        model,
        calibration,
        method or found.metric,
        None if pat.is_nm else found.ratios,
        pattern,
        group,
        batch_size=batch_size,
        device=device,
        progress=progress,
        reconstruct=found.reconstruct,
        permute=bool(found.settings.get("permute", False)),
    )
    return result, found


def json_key(entry: dict) -> str:
    """Cache key of a history entry: what was evaluated, not its results."""

    def pick(*names: str) -> dict[str, Any]:
        return {k: entry.get(k) for k in names}

    kind = entry.get("kind")
    if kind == "metric_proxy":
        key = pick("kind", "metric")
    elif kind == "finalist":
        key = pick("kind", "method", "ratios", "reconstruct")
        # Only when on, so that finalists saved before the setting existed keep their key.
        key |= pick("permute") if entry.get("permute") else {}
        # Finalists saved before finalist_calibration existed were pruned on the statistics
        # rows: they must not stand in for finalists pruned on all rows.
        key["calibration"] = entry.get("calibration", "statistics")
    else:
        # A model-wise evaluation is identified by (metric, ratios) alone, so the uniform
        # ratios evaluated by the metric phase are not evaluated again by the ratio phase.
        key = pick("metric", "ratios")
    return json.dumps(key, sort_keys=True)


def _same_device(a: torch.device, b: str | torch.device) -> bool:
    """``cuda`` and ``cuda:0`` name the same device when one of them has no index."""
    b = torch.device(b)
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _missing(cache: dict[str, dict], entry: dict, field: str) -> bool:
    """Whether ``entry`` still needs computing (not in the history with ``field``)."""
    hit = cache.get(json_key(entry))
    return hit is None or field not in hit


def _model_id(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(
        getattr(config, "optishear_model_id", None)
        or getattr(config, "_name_or_path", None)
        or type(model).__name__
    )
