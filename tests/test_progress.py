"""Rich progress bars: a disabled bar prints nothing, an enabled one counts to its total."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from optishear_lightning import progress
from optishear_lightning.progress import ProgressBar, track


@pytest.fixture
def console(monkeypatch):
    """Route the bars to a string (a non-terminal console prints the bar's final state)."""
    out = Console(file=io.StringIO(), width=100, force_terminal=False)
    monkeypatch.setattr(progress, "_console", lambda: out)
    return out


def test_track_yields_every_item_and_shows_the_count(console):
    assert list(track(range(7), "blocks")) == list(range(7))
    assert "blocks" in console.file.getvalue() and "7/7" in console.file.getvalue()


def test_a_disabled_bar_prints_nothing(console):
    assert list(track(range(3), "blocks", enabled=False)) == [0, 1, 2]
    with ProgressBar(5, "finalists", enabled=False) as bar:
        bar.update(5)
    assert console.file.getvalue() == ""


def test_bar_advanced_by_hand(console):
    with ProgressBar(4, "ratio search") as bar:
        bar.update(3)
        bar.update()
    assert "4/4" in console.file.getvalue()
