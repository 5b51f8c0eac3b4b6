"""The OptiShear search, end to end: metric search, then ratio search, then prune.

Metric search (at uniform sparsity, as in the paper) is exhaustive over the *effective* space
(:func:`~.space.effective_space`: 441 metrics for row groups, after dropping normalisers no
comparison group can see) rather than evolutionary: a discrete space this small is cheaper to
screen completely with the layer-wise proxy (Gram-matrix reconstruction error on a few blocks,
milliseconds per metric on a GPU) than to sample with a genetic algorithm, and exhaustive
screening cannot miss the proxy's optimum. The ``metric_topk`` best by proxy, plus Wanda as
a reference point, are then decided by the model-wise objective (logit error).

Ratio search (unstructured only; N:M fixes every block's sparsity) runs NSGA-III with the
chosen metric (:mod:`.ratios`). Every evaluation lands in the history; with ``state_path`` the
history is saved after each step and a rerun resumes from it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..masks import parse_pattern, validate_sparsity
from ..models import find_decoder_blocks
from ..pruning import PruneResult, as_calibration_batches, prune
from .context import SearchContext
from .ratios import check_candidates, non_dominated, run_nsga3, select_solution
from .result import SearchResult, SearchState, layer_shapes, versions
from .space import WANDA, MetaMetric, effective_space

__all__ = ["optishear_prune", "optishear_search"]


def _spread(n_blocks: int, count: int | None) -> list[int]:
    if count is None or count >= n_blocks:
        return list(range(n_blocks))
    if count <= 0:
        return []
    return sorted({round(i * (n_blocks - 1) / max(count - 1, 1)) for i in range(count)})


def optishear_search(
    model: nn.Module,
    calibration: Any,
    sparsity: float = 0.5,
    pattern: str = "unstructured",
    group: str = "row",
    *,
    delta: float = 0.05,
    candidates: Sequence[float] | None = None,
    search_metric: bool = True,
    metric: MetaMetric | None = None,
    metric_candidates: Sequence[MetaMetric] | None = None,
    metric_topk: int = 8,
    proxy_blocks: int | None = 8,
    proxy_rows: int | None = None,
    search_ratios: bool = True,
    budget: int = 300,
    pop_size: int = 40,
    objective_samples: int = 8,
    tolerance: float = 0.001,
    seed: int = 0,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    state_path: str | Path | None = None,
    progress: bool = True,
) -> SearchResult:
    """Search a pruning metric and per-block sparsity ratios for ``model``.

    The model's weights are left dense when the search returns.

    Args:
        model: a causal LM.
        calibration: calibration token ids (``(n, seq_len)`` tensor, list of tensors or a
            dataloader of ``input_ids``).
        sparsity: target global sparsity (ignored for N:M patterns).
        pattern: ``"unstructured"`` or ``"N:M"``.
        group: comparison group of unstructured masks.
        delta: ratio step; the default candidate set is ``{s - delta, s, s + delta}``.
        candidates: explicit ratio candidate set (overrides ``delta``).
        search_metric: search the metric; otherwise use ``metric`` (default Wanda).
        metric: the metric to use when not searching it.
        metric_candidates: metrics to screen (default: the effective space).
        metric_topk: metrics decided by the model-wise objective after proxy screening.
        proxy_blocks: number of evenly spread blocks used by the proxy (``None`` = all).
        proxy_rows: evenly spaced output rows per matrix scored by the proxy (``None`` = all;
            a few hundred makes the screening several times faster on a CPU).
        search_ratios: run the ratio search (unstructured only).
        budget: ratio candidates evaluated by NSGA-III.
        pop_size: NSGA-III population size.
        objective_samples: calibration windows used for the model-wise objective.
        tolerance: allowed ``|target - achieved|`` global sparsity of the chosen ratios.
        seed: search seed (the search is deterministic for a fixed seed and machine).
        batch_size: sequences per forward pass.
        device: where the model runs (default: its device); the whole model must already be
            there, since every candidate runs a full forward pass.
        state_path: JSON file for resumable state.
        progress: progress bars and a summary table.

    Returns:
        A :class:`SearchResult`.

    Raises:
        ValueError: bad arguments (before any computation).
    """
    pat = parse_pattern(pattern)
    target = pat.sparsity if pat.is_nm else validate_sparsity(sparsity, "target sparsity")
    if group not in ("row", "layer"):
        raise ValueError(f"Unknown comparison group {group!r}: use 'row' or 'layer'.")
    ratio_search = search_ratios and not pat.is_nm
    if ratio_search:
        if candidates is None:
            if not 0 < delta < 1:
                raise ValueError(f"delta must be in (0, 1), got {delta}.")
            candidates = [target - delta, target, target + delta]
        cand = check_candidates([round(c, 10) for c in candidates], target, tolerance)
        if not any(abs(c - target) < 1e-9 for c in cand):
            raise ValueError(
                f"The ratio candidates {cand} must include the target {target} itself (the "
                "search starts from uniform ratios)."
            )
        if budget < 1 or pop_size < 2:
            raise ValueError("budget must be >= 1 and pop_size >= 2.")
    else:
        cand = [target]
    if metric_topk < 1:
        raise ValueError("metric_topk must be >= 1.")
    if objective_samples < 1:
        raise ValueError("objective_samples must be >= 1.")
    metrics = list(metric_candidates) if metric_candidates is not None else None
    if search_metric and metrics is not None and not metrics:
        raise ValueError("metric_candidates is empty; leave it unset for the full space.")

    home = {p.device for p in model.parameters()}
    if device is not None and not all(_same_device(d, device) for d in home):
        raise ValueError(
            f"The search runs the whole model on {device}, but its weights are on "
            f"{sorted(str(d) for d in home)}; call model.to({str(device)!r}) first (or leave "
            "device unset). Block-at-a-time offloading is only for prune()."
        )
    batches = as_calibration_batches(calibration, batch_size)
    rows = torch.cat(batches)
    objective = as_calibration_batches(rows[:objective_samples], batch_size)
    n_blocks_model = len(find_decoder_blocks(model)[1])
    proxy = _spread(n_blocks_model, proxy_blocks) if search_metric else []
    fingerprint = {
        "model_id": _model_id(model),
        "layer_shapes": layer_shapes(model),
        "target": target,
        "pattern": str(pat),
        "group": group,
        "candidates": cand,
        "seed": seed,
        "calibration_shape": list(rows.shape),
        "calibration_checksum": int(rows.long().sum().item()),
        "objective_samples": objective_samples,
        "search_metric": search_metric,
        "metric": (metric or WANDA).to_dict() if not search_metric else None,
        "proxy_blocks": proxy,
        "proxy_rows": proxy_rows,
        "budget": budget if ratio_search else 0,
        "pop_size": pop_size,
    }
    state = SearchState.load_or_new(state_path, fingerprint)
    cache = {json_key(h): h for h in state.history}

    def record(entry: dict) -> dict:
        key = json_key(entry)
        if key not in cache:
            cache[key] = entry
            state.history.append(entry)
        return cache[key]

    def save_state() -> None:
        if state_path is not None:
            state.save(state_path)

    timing: dict[str, float] = {}
    started = time.perf_counter()
    ctx = SearchContext(
        model, batches, objective, pat, group, proxy, device, progress, proxy_rows=proxy_rows
    )
    timing["calibration_s"] = time.perf_counter() - started
    model_evals = 0

    def model_error(chosen: MetaMetric, ratios: Sequence[float], kind: str) -> float:
        nonlocal model_evals
        entry = {"kind": kind, "metric": chosen.to_dict(), "ratios": list(ratios)}
        hit = cache.get(json_key(entry))
        if hit is not None and "error" in hit:
            return hit["error"]
        ctx.apply(chosen, ratios)
        err = ctx.logit_error()
        ctx.restore()
        model_evals += 1
        entry["error"] = err
        entry["sparsity_gap"] = abs(ctx.achieved_sparsity(ratios) - target)
        record(entry)
        return err

    try:
        # 1. Metric search at uniform sparsity.
        uniform = [target] * ctx.n_blocks
        t0 = time.perf_counter()
        if search_metric:
            pool = metrics if metrics is not None else effective_space(group)
            screened = []
            bar = _bar(len(pool), "metric proxy", progress)
            for m in pool:
                entry = {"kind": "metric_proxy", "metric": m.to_dict()}
                hit = cache.get(json_key(entry))
                if hit is None:
                    entry["proxy"] = ctx.proxy_error(m, None if pat.is_nm else target)
                    hit = record(entry)
                value = hit["proxy"]
                screened.append((value if math.isfinite(value) else math.inf, m))
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.close()
            save_state()
            finalists = [m for _, m in sorted(screened, key=lambda t: t[0])[:metric_topk]]
            if WANDA not in finalists:
                finalists.append(WANDA)
            errs = []
            bar = _bar(len(finalists), "metric model-wise", progress)
            for m in finalists:
                errs.append(model_error(m, uniform, "metric"))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(best=f"{min(errs):.4g}")
            if bar is not None:
                bar.close()
            chosen = finalists[int(np.argmin(errs))]
            save_state()
        else:
            chosen = metric or WANDA
        timing["metric_search_s"] = time.perf_counter() - t0

        # 2. Ratio search.
        t0 = time.perf_counter()
        if ratio_search:
            uniform_choice = cand.index(min(cand, key=lambda c: abs(c - target)))
            bar = _bar(budget, "ratio search", progress)
            best = [math.inf]

            def evaluate(x: np.ndarray) -> tuple[float, float]:
                ratios = [cand[int(i)] for i in x]
                err = model_error(chosen, ratios, "ratios")
                gap = abs(ctx.achieved_sparsity(ratios) - target)
                if gap <= tolerance:
                    best[0] = min(best[0], err)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(best=f"{best[0]:.4g}")
                return err, gap

            run_nsga3(
                evaluate,
                ctx.n_blocks,
                len(cand),
                budget,
                pop_size,
                seed,
                uniform_choice,
                on_generation=save_state,
            )
            if bar is not None:
                bar.close()
        else:
            model_error(chosen, uniform, "ratios")
        timing["ratio_search_s"] = time.perf_counter() - t0
    finally:
        ctx.restore()
    save_state()

    evaluated = [h for h in state.history if "error" in h and h["metric"] == chosen.to_dict()]
    errors = [h["error"] for h in evaluated]
    gaps = [h["sparsity_gap"] for h in evaluated]
    pick = evaluated[select_solution(errors, gaps, tolerance)]
    front_idx = non_dominated(np.column_stack([errors, gaps]))
    front = sorted(
        (
            {"ratios": evaluated[i]["ratios"], "error": errors[i], "sparsity_gap": gaps[i]}
            for i in front_idx
        ),
        key=lambda p: p["sparsity_gap"],
    )
    total = time.perf_counter() - started
    timing["total_s"] = total
    timing["model_evaluations"] = model_evals
    search_time = timing["metric_search_s"] + timing["ratio_search_s"]
    timing["evaluations_per_s"] = model_evals / search_time if search_time > 0 else 0.0
    result = SearchResult(
        metric=chosen,
        ratios=list(pick["ratios"]),
        target_sparsity=target,
        achieved_sparsity=ctx.achieved_sparsity(pick["ratios"]),
        pattern=str(pat),
        group=group,
        candidates=cand,
        pareto_front=front,
        history=state.history,
        seed=seed,
        model_id=fingerprint["model_id"],
        layer_shapes=fingerprint["layer_shapes"],
        settings={
            k: fingerprint[k]
            for k in (
                "objective_samples",
                "proxy_blocks",
                "proxy_rows",
                "budget",
                "pop_size",
                "calibration_shape",
            )
        }
        | {"tolerance": tolerance, "metric_topk": metric_topk, "objective": "logit_frobenius"},
        timing=timing,
        versions=versions(),
    )
    if progress:
        from .report import print_summary

        print_summary(result)
    return result


def optishear_prune(
    model: nn.Module,
    calibration: Any,
    sparsity: float = 0.5,
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
        **search_kwargs: passed to :func:`optishear_search`.
    """
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
        if str(parse_pattern(pattern)) != found.pattern:
            raise ValueError(
                f"The search result was found for pattern {found.pattern}, not {pattern}."
            )
        if not parse_pattern(pattern).is_nm and abs(found.target_sparsity - sparsity) > 1e-9:
            raise ValueError(
                f"The search result targets sparsity {found.target_sparsity}, not {sparsity}; "
                "search again or use the same target."
            )
    ratios = None if parse_pattern(pattern).is_nm else found.ratios
    result = prune(
        model,
        calibration,
        method or found.metric,
        ratios,
        pattern,
        group,
        batch_size=batch_size,
        device=device,
        progress=progress,
    )
    return result, found


def json_key(entry: dict) -> str:
    """Cache key of a history entry: what was evaluated, not its results."""
    # A model-wise evaluation is identified by (metric, ratios) alone, so the uniform ratios
    # evaluated by the metric search are not evaluated again by the ratio search.
    fields = ("kind", "metric") if entry.get("kind") == "metric_proxy" else ("metric", "ratios")
    return json.dumps({k: entry.get(k) for k in fields}, sort_keys=True)


def _same_device(a: torch.device, b: str | torch.device) -> bool:
    """``cuda`` and ``cuda:0`` name the same device when one of them has no index."""
    b = torch.device(b)
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="cand")


def _model_id(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(
        getattr(config, "optishear_model_id", None)
        or getattr(config, "_name_or_path", None)
        or type(model).__name__
    )
