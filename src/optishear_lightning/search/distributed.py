"""Candidate-parallel search: each rank evaluates its share of a phase's candidates.

Under ``torch.distributed`` (Lightning's DDP, or ``torchrun`` with the Python API) every rank
holds a replica of the model. A phase's candidates (the metrics to screen, the metrics to
decide between, one NSGA-III population, the finalists) are dealt out round-robin; each rank
evaluates its own and the results are all-gathered in candidate order. Every rank then holds
the same values in the same order, so every rank makes the same decisions and records the same
history as one process would: a state file written with any number of ranks resumes with any
other.

A rank that fails does not leave the others waiting in a collective: every rank finishes its
share, the outcomes (value or error) are gathered, and every rank raises the first error.

Example:
    >>> shard = CandidateShard.current()
    >>> shard.map(lambda m: proxy_error(m), metrics)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch.distributed as dist

__all__ = ["CandidateShard", "RankFailed"]

T = TypeVar("T")
R = TypeVar("R")


class RankFailed(RuntimeError):
    """A candidate evaluation failed on some rank; raised on every rank alike."""


@dataclass(frozen=True)
class CandidateShard:
    """Which candidates this rank evaluates, and how the results are shared.

    Attributes:
        rank: this process's rank (0 without a process group).
        world_size: number of ranks sharing the work (1: no sharing).
    """

    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls, enabled: bool | None = None) -> CandidateShard:
        """The default process group's ranks, or a single rank.

        Args:
            enabled: ``None`` shares the work when a process group with more than one rank is
                initialised; ``False`` never shares (every rank evaluates everything itself);
                ``True`` requires a process group.
        """
        initialised = dist.is_available() and dist.is_initialized()
        if enabled is True and not initialised:
            raise ValueError(
                "distributed=True needs an initialised torch.distributed process group "
                "(torchrun, or Lightning's DDP); leave it unset to search in one process."
            )
        if enabled is False or not initialised or dist.get_world_size() == 1:
            return cls()
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def is_leader(self) -> bool:
        """Whether this rank writes files (state, results)."""
        return self.rank == 0

    def map(
        self,
        fn: Callable[[T], R],
        items: Sequence[T],
        done: Callable[[T, R], None] | None = None,
    ) -> list[R]:
        """``[fn(x) for x in items]``, each item evaluated on one rank, results on all.

        Args:
            fn: evaluates one item.
            items: the candidates, in the order every rank sees them.
            done: called with each item and its result, in item order, as soon as every rank
                has it: at once in one process (so an interrupt loses at most the item being
                evaluated), after the gather with several ranks.

        Raises:
            RankFailed: ``fn`` raised on some rank (the same error on every rank). In one
                process the error itself propagates.
        """
        if self.world_size == 1:
            results = []
            for item in items:
                results.append(fn(item))
                if done is not None:
                    done(item, results[-1])
            return results
        mine: dict[int, tuple[bool, Any]] = {}
        for i in range(self.rank, len(items), self.world_size):
            try:
                mine[i] = (True, fn(items[i]))
            except Exception as err:  # shared below, so that no rank waits forever
                mine[i] = (False, f"rank {self.rank}, candidate {i}: {type(err).__name__}: {err}")
                break
        gathered = self._gather(mine)
        failures = [payload for ok, payload in gathered.values() if not ok]
        if failures:
            raise RankFailed("Candidate-parallel search failed on " + failures[0])
        results = [gathered[i][1] for i in range(len(items))]
        for item, result in zip(items, results, strict=True):
            if done is not None:
                done(item, result)
        return results

    def leader_value(self, value: T) -> T:
        """Rank 0's ``value`` on every rank (a resumed state's history, for example)."""
        if self.world_size == 1:
            return value
        box = [value if self.is_leader else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def check_same(self, what: str, value: Any) -> None:
        """Raise on every rank unless every rank holds the same ``value``.

        Raises:
            ValueError: the ranks differ (their replicas or calibration data are not the same).
        """
        if self.world_size == 1:
            return
        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, value)
        if any(p != parts[0] for p in parts):
            raise ValueError(
                f"The ranks of a candidate-parallel search hold different {what}; every rank "
                "needs the same model weights and the same calibration tokens (seed the "
                "calibration loader, do not shard it across ranks)."
            )

    def _gather(self, mine: dict[int, tuple[bool, Any]]) -> dict[int, tuple[bool, Any]]:
        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, mine)
        merged: dict[int, tuple[bool, Any]] = {}
        for part in parts:
            merged.update(part)
        return merged
