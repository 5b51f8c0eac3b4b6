"""Which calibration tokens the search uses for what: statistics, objective, validation.

The calibration rows are split, never shared: the last rows are cut into short validation
windows, the rows before them into short objective windows, and the rest collect the
activation statistics that masks are chosen from. So the search never scores a candidate on
text its masks were fitted to, and the final decision is made on text the search never saw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import SearchConfig

__all__ = ["SearchWindows", "split_calibration"]


@dataclass
class SearchWindows:
    """Token batches of the three disjoint roles (each a list of ``(batch, seq_len)``)."""

    statistics: list[torch.Tensor]
    objective: list[torch.Tensor]
    validation: list[torch.Tensor]


def _cut(rows: torch.Tensor, seq_len: int, count: int, batch_size: int) -> list[torch.Tensor]:
    per_row = rows.shape[1] // seq_len
    windows = rows[:, : per_row * seq_len].reshape(-1, seq_len)[:count]
    return list(windows.split(batch_size))


def split_calibration(rows: torch.Tensor, config: SearchConfig, batch_size: int) -> SearchWindows:
    """Split ``(n, seq_len)`` calibration rows into statistics, objective and validation.

    Raises:
        ValueError: windows longer than the calibration rows, or so many that no row would be
            left for the statistics.
    """
    n, length = rows.shape
    short = config.objective_seq_len
    if short > length:
        raise ValueError(
            f"objective_seq_len={short} is longer than the calibration windows ({length} "
            f"tokens); set objective_seq_len <= {length}."
        )
    per_row = length // short
    objective_rows = math.ceil(config.objective_samples / per_row)
    validation_rows = math.ceil(config.validation_samples / per_row)
    left = n - objective_rows - validation_rows
    if left < 1:
        raise ValueError(
            f"{config.objective_samples} objective and {config.validation_samples} validation "
            f"windows of {short} tokens take {objective_rows + validation_rows} of the {n} "
            f"calibration sequences of {length} tokens, leaving none for the statistics: give "
            "more calibration samples, or lower objective_samples / validation_samples."
        )
    validation = rows[n - validation_rows :]
    objective = rows[left : n - validation_rows]
    return SearchWindows(
        statistics=list(rows[:left].split(batch_size)),
        objective=_cut(objective, short, config.objective_samples, batch_size),
        validation=_cut(validation, short, config.validation_samples, batch_size),
    )
