"""Human-facing output of a search: a summary table and the paper's two figures."""

from __future__ import annotations

import os
from pathlib import Path

from .result import SearchResult, describe

__all__ = ["plot_pareto", "plot_ratios", "print_summary", "save_plots"]


def print_summary(result: SearchResult) -> None:
    """Print the chosen metric, the ratio of each block and the search cost as a table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="OptiShear search result", show_lines=False)
    table.add_column("item")
    table.add_column("value", overflow="fold")
    table.add_row("model", result.model_id)
    table.add_row("metric", f"{describe(result.metric)} (chosen by the {result.chosen_by})")
    table.add_row("pattern / group", f"{result.pattern} / {result.group}")
    table.add_row(
        "sparsity", f"target {result.target_sparsity:.4f}, achieved {result.achieved_sparsity:.4f}"
    )
    table.add_row("block ratios", " ".join(f"{r:.2f}" for r in result.ratios))
    evals = int(result.timing.get("model_evaluations", 0))
    table.add_row(
        "cost",
        f"{evals} model-wise evaluations, {result.timing.get('evaluations_per_s', 0):.2f}/s, "
        f"{result.timing.get('total_s', 0):.1f}s in total",
    )
    console = Console()
    console.print(table)
    if result.finalists:
        finals = Table(title="Finalists (really pruned; the lowest validation value wins)")
        for column in ("source", "method", "ratios", "objective", "validation"):
            finals.add_column(column)
        for f in result.finalists:
            uniform = len(set(f["ratios"])) == 1
            finals.add_row(
                f["source"],
                f["method"].get("name") or describe_dict(f["method"]),
                "uniform" if uniform else "searched",
                f"{f['objective']:.5g}",
                f"{f['validation']:.5g}",
            )
        console.print(finals)


def describe_dict(data: dict) -> str:
    """The formula of a metric given as its JSON fields."""
    from .result import method_from_dict

    return describe(method_from_dict(data))


def _pyplot():
    """pyplot on the non-interactive Agg backend (works without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def plot_pareto(result: SearchResult, path: str | os.PathLike) -> Path:
    """Scatter of every evaluated ratio candidate, the Pareto front and the chosen point."""
    plt = _pyplot()
    searched = result.search_pick.get("metric")
    ratios = [h for h in result.history if "error" in h and h["metric"] == searched]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.scatter(
        [h["sparsity_gap"] for h in ratios],
        [h["error"] for h in ratios],
        s=10,
        c="0.7",
        label="evaluated",
    )
    ax.plot(
        [p["sparsity_gap"] for p in result.pareto_front],
        [p["error"] for p in result.pareto_front],
        "o-",
        c="tab:blue",
        label="Pareto front",
    )
    chosen = next(
        (h for h in ratios if h["ratios"] == result.search_pick.get("ratios")),
        None,
    )
    if chosen is not None:
        ax.scatter(
            [chosen["sparsity_gap"]],
            [chosen["error"]],
            marker="*",
            s=160,
            c="tab:red",
            label="search's pick",
            zorder=3,
        )
    ax.set_xlabel("|target - achieved| global sparsity")
    ax.set_ylabel(f"objective ({result.settings.get('objective', 'logit_frobenius')})")
    ax.set_title(f"{result.model_id}: ratio search")
    ax.legend()
    return _save(fig, path)


def plot_ratios(result: SearchResult, path: str | os.PathLike) -> Path:
    """Bar chart of the sparsity ratio of each decoder block (the paper's figure)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 0.22 * len(result.ratios) + 2), 3.2))
    ax.bar(range(len(result.ratios)), result.ratios, color="tab:blue")
    ax.axhline(result.target_sparsity, color="tab:red", ls="--", lw=1, label="target")
    lo, hi = min(result.candidates), max(result.candidates)
    ax.set_ylim(max(0.0, lo - 0.05), min(1.0, hi + 0.05))
    ax.set_xlabel("decoder block")
    ax.set_ylabel("sparsity ratio")
    ax.set_title(f"{result.model_id}: layer-wise sparsity ({describe(result.metric)})", fontsize=8)
    ax.legend()
    return _save(fig, path)


def save_plots(result: SearchResult, directory: str | os.PathLike) -> list[Path]:
    """Write ``pareto_front.png`` and ``layer_ratios.png`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return [
        plot_pareto(result, directory / "pareto_front.png"),
        plot_ratios(result, directory / "layer_ratios.png"),
    ]
