"""Progress bars of the package's long loops (calibration blocks, candidates, evaluation).

Rich, the style Lightning's ``RichProgressBar`` uses, so a prune inside a Trainer shows one
kind of bar. Rich nests live displays, so these bars also work while Lightning's is shown.
Callers decide whether a bar is wanted (the callback follows the Trainer's
``enable_progress_bar``); a disabled bar costs nothing and prints nothing.

Example:
    >>> for block in track(range(30), "blocks", enabled=False):
    ...     pass
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich import get_console
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["ProgressBar", "track"]

T = TypeVar("T")


def _console() -> Console:
    return get_console()  # Rich's shared console, the one Lightning's RichProgressBar uses


def _columns() -> tuple:
    return (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )


class ProgressBar:
    """A bar advanced by hand (``update``), used as a context manager.

    Args:
        total: steps to completion.
        description: what is counted ("metric proxy", "blocks"...).
        enabled: ``False`` makes every call a no-op.
    """

    def __init__(self, total: int, description: str, enabled: bool = True):
        self._progress = Progress(*_columns(), console=_console()) if enabled else None
        self._task = self._progress.add_task(description, total=total) if self._progress else None

    def __enter__(self) -> ProgressBar:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, n: int = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)


def track(
    items: Iterable[T], description: str, total: int | None = None, enabled: bool = True
) -> Iterator[T]:
    """Iterate ``items`` with a bar (``total`` defaults to ``len(items)``)."""
    if not enabled:
        yield from items
        return
    total = total if total is not None else len(items)  # type: ignore[arg-type]
    with ProgressBar(total, description) as bar:
        for item in items:
            yield item
            bar.update()
