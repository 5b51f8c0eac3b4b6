"""``SearchConfig``: every setting of the OptiShear search, declared and checked once.

The callback (``OptiShearCallback(search=SearchConfig(...))``), the CLI
(``--optishear.search.budget 100``) and the Python API
(``optishear_search(model, calib, 0.5, config=SearchConfig(...))``) all take this one dataclass,
so a setting has one name, one default and one check.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, get_args

from ..metrics import METHODS
from ..reconstruction import check_reconstruction
from .objectives import OBJECTIVES, ObjectiveName
from .ratios import check_candidates

__all__ = ["FINALIST_CALIBRATIONS", "SearchConfig"]

FinalistCalibration = Literal["all", "statistics"]
FINALIST_CALIBRATIONS: tuple[str, ...] = get_args(FinalistCalibration)


@dataclass
class SearchConfig:
    """Settings of :func:`~optishear_lightning.search.optishear_search`.

    Attributes:
        search_metric: search the metric (else use Wanda's metric).
        search_ratios: search per-block sparsity ratios (unstructured patterns only; N:M fixes
            every block's sparsity, so the phase is skipped there).
        delta: ratio step; each block takes one of ``{s - delta, s, s + delta}``.
        candidates: explicit ratio candidate set (overrides ``delta``).
        metric_topk: metrics decided by the model-wise objective after proxy screening.
        proxy_blocks: evenly spread blocks whose Gram matrices the screening proxy uses
            (``None`` = all).
        proxy_rows: output rows per matrix sampled by the proxy (``None`` = all; ~128 on CPUs).
        budget: ratio candidates evaluated by NSGA-III.
        pop_size: NSGA-III population size.
        objective: the model-wise objective: ``"kl"`` (mean KL divergence of the pruned from
            the dense next-token distribution, per token) or ``"logit_frobenius"`` (the
            paper's Frobenius norm of the logit difference).
        objective_samples: windows the search optimises on.
        objective_seq_len: their length in tokens (many short windows: more distinct text for
            the same cost).
        validation_samples: held-out windows of the same length that decide among the
            finalists; the search never optimises on them.
        finalists: best search candidates (distinct metric/ratio pairs) that are really pruned
            (sequentially, as the final prune is) and scored on the validation windows.
        finalist_calibration: which calibration rows each finalist is pruned on. ``"all"``
            (default): every row, exactly as the final prune does, so the model that wins the
            validation is the model returned; the validation text is then among the rows
            that collect activation statistics (never among those the search optimises on).
            ``"statistics"``: only the statistics rows, so no mask has seen the validation
            text, but the returned model (pruned on all rows) is not the one validated. On
            SmolLM2 the difference of calibration rows moved perplexities more than the
            finalists differ (2:4: Wanda 208.0 on the statistics rows, 195.84 on all). Against
            the WikiText-2 perplexity of the models each finalist would be returned as, the
            validation values of ``"all"`` rank the finalists with Spearman 1.00 (2:4) and 0.94
            (50%), those of ``"statistics"`` with -0.80 and 0.77 (``benchmarks/README.md``).
        baselines: fixed methods pruned and validated beside the finalists (uniform ratios);
            if one of them wins, the search returns it and says so. ``None`` (default): Wanda
            and RIA, plus SparseGPT when ``reconstruct`` is set (its mask is chosen with error
            compensation, the strongest mask to reconstruct on; on SmolLM2 2:4 it won).
        reconstruct: weight reconstruction of every finalist and of the final prune
            (``None``, ``"obs"`` or ``"lsq"``; see :mod:`optishear_lightning.reconstruction`),
            so the metric chosen is the best one *after* the update.
        permute: N:M only: permute input channels before N:M selection in every finalist's
            prune and in the final prune (see :mod:`optishear_lightning.permutation`).
        tolerance: allowed ``|target - achieved|`` global sparsity of the chosen ratios.
        seed: search seed (the search is deterministic for a fixed seed and machine).

    Example:
        >>> SearchConfig(budget=100, objective="logit_frobenius").budget
        100
    """

    search_metric: bool = True
    search_ratios: bool = True
    delta: float = 0.05
    candidates: list[float] | None = None
    metric_topk: int = 8
    proxy_blocks: int | None = 8
    proxy_rows: int | None = None
    budget: int = 300
    pop_size: int = 40
    objective: ObjectiveName = "kl"
    objective_samples: int = 64
    objective_seq_len: int = 512
    validation_samples: int = 64
    finalists: int = 3
    finalist_calibration: FinalistCalibration = "all"
    baselines: list[str] | None = None
    reconstruct: str | None = None
    permute: bool = False
    tolerance: float = 0.001
    seed: int = 0

    def __post_init__(self) -> None:
        for name, low in (
            ("budget", 1),
            ("pop_size", 2),
            ("metric_topk", 1),
            ("objective_samples", 1),
            ("objective_seq_len", 2),
            ("validation_samples", 1),
            ("finalists", 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"SearchConfig.{name} must be an integer >= {low}, got {value!r}.")
        if self.objective not in OBJECTIVES:
            raise ValueError(
                f"Unknown search objective {self.objective!r}; choose one of {sorted(OBJECTIVES)}."
            )
        if not 0 < self.delta < 1:
            raise ValueError(f"SearchConfig.delta must be in (0, 1), got {self.delta}.")
        if self.tolerance < 0:
            raise ValueError(f"SearchConfig.tolerance must be >= 0, got {self.tolerance}.")
        for name in ("proxy_blocks", "proxy_rows"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"SearchConfig.{name} must be None (all) or >= 1, got {value}.")
        if self.finalist_calibration not in FINALIST_CALIBRATIONS:
            raise ValueError(
                f"SearchConfig.finalist_calibration must be one of {list(FINALIST_CALIBRATIONS)}, "
                f"got {self.finalist_calibration!r}."
            )
        self.reconstruct = check_reconstruction(self.reconstruct)
        if not isinstance(self.permute, bool):
            raise ValueError(f"SearchConfig.permute must be true or false, got {self.permute!r}.")
        if self.baselines is not None:
            self.baselines = [str(b).lower() for b in self.baselines]
        unknown = [b for b in self.baseline_methods() if b not in METHODS]
        if unknown:
            raise ValueError(
                f"Unknown baseline methods {unknown}; choose from {sorted(METHODS)} (or [])."
            )

    def baseline_methods(self) -> list[str]:
        """The baselines validated beside the finalists (``baselines``, or its default)."""
        if self.baselines is not None:
            return list(self.baselines)
        return ["wanda", "ria"] + (["sparsegpt"] if self.reconstruct else [])

    def ratio_candidates(self, target: float) -> list[float]:
        """The ratio values each block may take for ``target`` (checked: in [0, 1), reaching
        the target, containing it)."""
        raw: Sequence[float] = (
            self.candidates
            if self.candidates is not None
            else [target - self.delta, target, target + self.delta]
        )
        cand = check_candidates([round(c, 10) for c in raw], target, self.tolerance)
        if not any(abs(c - target) < 1e-9 for c in cand):
            raise ValueError(
                f"The ratio candidates {cand} must include the target {target} itself (the "
                "search starts from uniform ratios)."
            )
        return cand

    def replace(self, **changes: Any) -> SearchConfig:
        """A copy with ``changes`` applied (and checked); unknown names are an error."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"Unknown search settings {unknown}; SearchConfig has {sorted(known)}.")
        return SearchConfig(**(asdict(self) | changes))

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable settings."""
        return asdict(self)
