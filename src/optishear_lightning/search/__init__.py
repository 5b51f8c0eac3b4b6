"""OptiShear: search a pruning metric and layer-wise sparsity ratios, then prune."""

from .config import SearchConfig
from .driver import optishear_prune, optishear_search
from .objectives import OBJECTIVES, KLDivergence, LogitFrobenius, Objective
from .report import plot_pareto, plot_ratios, print_summary, save_plots
from .result import SearchResult, SearchState
from .space import MAGNITUDE, WANDA, MetaMetric, effective_space, full_space

__all__ = [
    "MAGNITUDE",
    "OBJECTIVES",
    "WANDA",
    "KLDivergence",
    "LogitFrobenius",
    "MetaMetric",
    "Objective",
    "SearchConfig",
    "SearchResult",
    "SearchState",
    "effective_space",
    "full_space",
    "optishear_prune",
    "optishear_search",
    "plot_pareto",
    "plot_ratios",
    "print_summary",
    "save_plots",
]
