"""What the callback reports, and where: Lightning loggers (scalars and images) and the console.

Images go through each logger's own API, found by duck typing so that no logger package is
imported here (a logger that is not installed is simply never present):

- TensorBoard (``TensorBoardLogger``, tensorboardX too): ``logger.experiment.add_image``;
- Weights & Biases (``WandbLogger``): ``logger.log_image``;
- MLflow (``MLFlowLogger``): ``logger.experiment.log_artifact(logger.run_id, ...)``;
- Comet (``CometLogger``): ``logger.experiment.log_image``.

Loggers that take no images (``CSVLogger``) are skipped.

Example:
    >>> log_images(trainer.loggers, {"optishear/pareto_front": "plots/pareto_front.png"}, 0)
    ... # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["layer_table", "log_image", "log_images", "log_metrics", "print_rich"]


def log_metrics(loggers: Iterable[Any], metrics: Mapping[str, float], step: int) -> None:
    """``log_metrics`` on every logger (rank zero only: callers run there)."""
    for logger in loggers:
        logger.log_metrics(dict(metrics), step=step)


def _read_png(path: Path) -> Any:
    from matplotlib import image

    return image.imread(str(path))  # float HWC in [0, 1], RGB or RGBA


def log_image(logger: Any, tag: str, path: str | os.PathLike, step: int) -> bool:
    """Send one PNG to ``logger`` if it takes images; return whether it did."""
    path = Path(path)
    experiment = getattr(logger, "experiment", None)
    if callable(getattr(experiment, "add_image", None)):  # TensorBoard SummaryWriter
        experiment.add_image(tag, _read_png(path), step, dataformats="HWC")
    elif callable(getattr(logger, "log_image", None)):  # W&B
        logger.log_image(key=tag, images=[str(path)], step=step)
    elif callable(getattr(experiment, "log_artifact", None)) and getattr(logger, "run_id", None):
        experiment.log_artifact(logger.run_id, str(path), "optishear")  # MLflow client
    elif callable(getattr(experiment, "log_image", None)):  # Comet
        experiment.log_image(str(path), name=tag, step=step)
    else:
        return False
    return True


def log_images(loggers: Iterable[Any], images: Mapping[str, str | os.PathLike], step: int) -> int:
    """Send every ``{tag: png path}`` to every logger that takes images; return how many went."""
    sent = 0
    for logger in loggers:
        for tag, path in images.items():
            sent += log_image(logger, tag, path, step)
    return sent


def layer_table(
    title: str,
    method: str,
    targets: Mapping[str, float],
    achieved: Mapping[str, float],
) -> Any:
    """A Rich table: one row per pruned layer (layer, method, target ratio, achieved sparsity)."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("layer")
    table.add_column("method")
    table.add_column("target", justify="right")
    table.add_column("achieved", justify="right")
    for name, value in achieved.items():
        target = targets.get(name)
        table.add_row(name, method, "-" if target is None else f"{target:.4f}", f"{value:.4f}")
    return table


def print_rich(renderables: Sequence[Any]) -> None:
    """Print Rich renderables on the console."""
    from rich.console import Console

    console = Console()
    for item in renderables:
        console.print(item)
