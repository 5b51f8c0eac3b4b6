"""Ratio search pieces: candidate checks, Pareto filtering, selection and NSGA-III driving."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from optishear_lightning.search.ratios import (
    check_candidates,
    non_dominated,
    run_nsga3,
    select_solution,
)


# check_candidates ----------------------------------------------------------------------------
def test_empty_candidates():
    with pytest.raises(ValueError, match="empty"):
        check_candidates([], 0.5, 0.005)


@pytest.mark.parametrize(
    "candidates,target",
    [([-0.03, 0.02, 0.07], 0.02), ([0.9, 0.95, 1.0], 0.95), ([0.5, 1.5], 0.5)],
)
def test_ratio_outside_unit_interval(candidates, target):
    with pytest.raises(ValueError, match="delta") as info:
        check_candidates(candidates, target, 0.005)
    assert "[0, 1)" in str(info.value)


@pytest.mark.parametrize("candidates,target", [([0.1, 0.2], 0.5), ([0.6, 0.7], 0.5), ([0.5], 0.4)])
def test_unreachable_target(candidates, target):
    with pytest.raises(ValueError, match="reachable range"):
        check_candidates(candidates, target, 0.005)


def test_valid_candidates_sorted_and_deduplicated():
    assert check_candidates([0.55, 0.45, 0.5, 0.5], 0.5, 0.005) == [0.45, 0.5, 0.55]
    assert check_candidates((0, 0.1), 0.0, 0.0) == [0.0, 0.1]
    # The target may lie just outside the range, within the tolerance.
    assert check_candidates([0.5, 0.6], 0.497, 0.005) == [0.5, 0.6]
    with pytest.raises(ValueError, match="reachable"):
        check_candidates([0.5, 0.6], 0.49, 0.005)


# non_dominated / select_solution -------------------------------------------------------------
def test_non_dominated():
    points = np.array([[1, 5], [2, 2], [3, 1], [3, 3], [2, 2], [5, 5], [1, 6], [4, 1]])
    assert non_dominated(points).tolist() == [0, 1, 2]
    assert non_dominated(np.array([[1.0, 1.0]])).tolist() == [0]
    assert non_dominated(np.array([[2.0, 2.0]] * 3)).tolist() == [0]
    # Two points equal in one objective: the other decides.
    assert non_dominated(np.array([[1.0, 3.0], [1.0, 2.0]])).tolist() == [1]
    front = non_dominated(np.array([[3.0, 0.0], [2.0, 1.0], [1.0, 2.0], [0.0, 3.0]]))
    assert front.tolist() == [0, 1, 2, 3]
    assert front.dtype.kind == "i"


def test_select_solution_lowest_error_within_tolerance():
    errors = [3.0, 1.0, 2.0, 0.5]
    gaps = [0.0, 0.01, 0.004, 0.02]
    assert select_solution(errors, gaps, 0.005) == 2
    assert select_solution(errors, gaps, 0.01) == 1  # the boundary is feasible
    assert select_solution(errors, gaps, 1.0) == 3
    assert select_solution(errors, gaps, 0.0) == 0


def test_select_solution_first_of_equal_errors():
    assert select_solution([1.0, 0.5, 0.5], [0.0, 0.0, 0.0], 0.005) == 1


def test_select_solution_falls_back_to_smallest_gap():
    assert select_solution([0.1, 5.0, 0.3], [0.1, 0.02, 0.05], 0.005) == 1


# run_nsga3 -----------------------------------------------------------------------------------
TARGET = np.array([0, 2, 1, 0, 2, 1, 1, 0])


class Recorder:
    """A separable synthetic objective: distance to TARGET, and distance of the mean to 1."""

    def __init__(self):
        self.calls: list[tuple[int, ...]] = []

    def __call__(self, population: np.ndarray) -> list[tuple[float, float]]:
        assert population.dtype.kind == "i" and population.ndim == 2
        return [self.one(x) for x in population]

    def one(self, x: np.ndarray) -> tuple[float, float]:
        self.calls.append(tuple(int(v) for v in x))
        return float(np.sum((x - TARGET[: len(x)]) ** 2)), float(abs(np.mean(x) - 1.0))


def run(seed=0, budget=60, pop_size=12, n_blocks=8, n_choices=3, uniform=1, on_gen=None):
    rec = Recorder()
    run_nsga3(rec, n_blocks, n_choices, budget, pop_size, seed, uniform, on_generation=on_gen)
    return rec.calls


@pytest.mark.parametrize("budget,pop_size", [(60, 12), (37, 10), (5, 12), (1, 4)])
def test_spends_exactly_the_budget(budget, pop_size):
    calls = run(budget=budget, pop_size=pop_size)
    assert len(calls) == budget
    assert all(len(c) == 8 and all(0 <= v < 3 for v in c) for c in calls)


@pytest.mark.parametrize("uniform", [0, 1, 2])
def test_first_candidate_is_uniform(uniform):
    calls = run(uniform=uniform, budget=12)
    assert calls[0] == (uniform,) * 8


def test_generations_reported():
    generations = []
    calls = run(budget=40, pop_size=10, on_gen=lambda: generations.append(1))
    assert len(calls) == 40
    assert len(generations) == 4


def test_deterministic_for_a_seed():
    assert run(seed=3) == run(seed=3)
    assert run(seed=3) != run(seed=4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_finds_a_good_solution(seed):
    calls = run(seed=seed, budget=200, pop_size=20)
    errors = [float(np.sum((np.array(c) - TARGET) ** 2)) for c in calls]
    uniform_error = errors[0]
    assert uniform_error == 5.0
    assert min(errors) <= 1.0  # of 3^8 = 6561 vectors, errors up to 24
    assert len(set(calls)) > 100  # explores rather than re-proposing the same vectors


@pytest.mark.parametrize("n_blocks", [1, 2])
def test_small_space_stops_instead_of_crashing(n_blocks):
    """3^n_blocks < budget: pymoo runs out of new candidates; all of them get evaluated."""
    calls = run(n_blocks=n_blocks, budget=30, pop_size=10)
    space = set(itertools.product(range(3), repeat=n_blocks))
    assert calls[0] == (1,) * n_blocks
    assert len(calls) <= 30
    assert set(calls) <= space
    assert set(calls) == space
