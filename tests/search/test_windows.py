"""The calibration split: statistics, objective and validation windows never share a token."""

from __future__ import annotations

import pytest
import torch

from optishear_lightning.search import SearchConfig
from optishear_lightning.search.windows import split_calibration


def test_the_three_roles_are_disjoint_and_sized_as_asked():
    rows = torch.arange(128 * 2048).reshape(128, 2048)  # every token id unique
    w = split_calibration(rows, SearchConfig(), batch_size=8)
    stats, obj, val = (torch.cat(part) for part in (w.statistics, w.objective, w.validation))
    assert stats.shape == (96, 2048)
    assert obj.shape == (64, 512) and val.shape == (64, 512)
    seen = [set(t.flatten().tolist()) for t in (stats, obj, val)]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert all(b.shape[0] <= 8 for part in (w.statistics, w.objective, w.validation) for b in part)


@pytest.mark.parametrize(
    ("shape", "changes", "match"),
    [
        ((128, 256), {}, "objective_seq_len=512 is longer"),
        ((8, 512), {"objective_samples": 4, "validation_samples": 4}, "leaving none"),
        ((32, 512), {"objective_samples": 16, "validation_samples": 16}, "leaving none"),
    ],
)
def test_windows_that_do_not_fit_are_a_clear_error(shape, changes, match):
    with pytest.raises(ValueError, match=match):
        split_calibration(torch.zeros(shape, dtype=torch.long), SearchConfig(**changes), 8)


def test_short_windows_start_with_bos_when_every_calibration_row_does():
    bos = -1
    rows = torch.arange(1, 16 * 64 + 1).reshape(16, 64)
    rows[:, 0] = bos  # calibration cut BOS-first (bos_per_window)
    config = SearchConfig(objective_seq_len=16, objective_samples=8, validation_samples=8)
    w = split_calibration(rows, config, batch_size=4, bos_token_id=bos)
    for part in (w.objective, w.validation):
        windows = torch.cat(part)
        assert windows.shape == (8, 16) and bool((windows[:, 0] == bos).all())
        text = windows[:, 1:].flatten().tolist()
        assert bos not in text and len(set(text)) == len(text)  # no token dropped in twice
    # Rows that do not all start with BOS (the LLaMA protocol) are cut as they are.
    rows[3, 0] = 5
    plain = torch.cat(split_calibration(rows, config, 4, bos_token_id=bos).objective)
    assert int((plain[:, 0] == bos).sum()) < plain.shape[0]
