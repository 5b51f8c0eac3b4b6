"""Which calibration tokens the search uses for what: statistics, objective, validation.

The calibration rows are split, never shared: the last rows are cut into short validation
windows, the rows before them into short objective windows, and the rest collect the
activation statistics that the search's candidates are masked with. So the search never scores
a candidate on text its masks were fitted to, and the final decision is made on text the search
never optimised on. (The finalists themselves are pruned on all rows by default, as the final
prune is: see ``SearchConfig.finalist_calibration``.)

Short windows follow the calibration's BOS protocol: when every calibration row starts with
the model's BOS (``bos_per_window``, on by default for Gemma), every short window does too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..data import evaluation_windows
from .config import SearchConfig

__all__ = ["SearchWindows", "split_calibration"]


@dataclass
class SearchWindows:
    """Token batches of the three disjoint roles (each a list of ``(batch, seq_len)``)."""

    statistics: list[torch.Tensor]
    objective: list[torch.Tensor]
    validation: list[torch.Tensor]


def _cut(
    rows: torch.Tensor, seq_len: int, count: int, batch_size: int, bos_token_id: int | None
) -> list[torch.Tensor]:
    windows = torch.cat(
        [evaluation_windows(row, seq_len, bos_token_id=bos_token_id) for row in rows]
    )
    return list(windows[:count].split(batch_size))


def _shared_bos(rows: torch.Tensor, bos_token_id: int | None) -> int | None:
    """``bos_token_id`` if every row starts with it (windows were cut BOS-first), else None."""
    if bos_token_id is None or rows.numel() == 0:
        return None
    return bos_token_id if bool((rows[:, 0] == bos_token_id).all()) else None


def split_calibration(
    rows: torch.Tensor, config: SearchConfig, batch_size: int, bos_token_id: int | None = None
) -> SearchWindows:
    """Split ``(n, seq_len)`` calibration rows into statistics, objective and validation.

    Args:
        rows: the calibration token rows.
        config: the search settings (window counts and length).
        batch_size: rows per batch of every role.
        bos_token_id: the model's BOS id; when every row starts with it, so does every short
            window (its other tokens move one place on, none is dropped or repeated).

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
    bos = _shared_bos(rows, bos_token_id)
    return SearchWindows(
        statistics=list(rows[:left].split(batch_size)),
        objective=_cut(objective, short, config.objective_samples, batch_size, bos),
        validation=_cut(validation, short, config.validation_samples, batch_size, bos),
    )
