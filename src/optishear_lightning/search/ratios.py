"""Layer-wise sparsity ratio search: NSGA-III (pymoo) over one ratio per decoder block.

Each block takes one value of a small candidate set (``{s - delta, s, s + delta}`` by default),
encoded as an integer variable. Two objectives are minimised:

1. the Frobenius norm of (pruned - dense) logits on the objective windows
   (:meth:`SearchContext.logit_error`);
2. ``|target - achieved|`` global sparsity over all prunable weights, computed exactly from the
   layer shapes (no pruning needed).

The initial population contains the uniform solution, so the search can only improve on
uniform ratios. The final pick is the evaluated candidate with the lowest error among those
whose sparsity is within ``tolerance`` of the target; uniform ratios always qualify, so the
target is always honoured.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["check_candidates", "non_dominated", "run_nsga3", "select_solution"]


def check_candidates(candidates: Sequence[float], target: float, tolerance: float) -> list[float]:
    """Validate and sort a ratio candidate set for ``target``.

    Raises:
        ValueError: empty set, a ratio outside [0, 1), or a target the set cannot reach.
    """
    values = sorted({float(c) for c in candidates})
    if not values:
        raise ValueError("The ratio candidate set is empty; give e.g. [0.45, 0.5, 0.55].")
    bad = [v for v in values if not 0.0 <= v < 1.0]
    if bad:
        raise ValueError(
            f"Ratio candidates {bad} leave [0, 1): lower delta (or the target sparsity) so "
            "that target - delta >= 0 and target + delta < 1."
        )
    if not values[0] - tolerance <= target <= values[-1] + tolerance:
        raise ValueError(
            f"Target sparsity {target} is outside the reachable range [{values[0]}, "
            f"{values[-1]}] of the ratio candidates {values}; include ratios on both sides."
        )
    return values


def non_dominated(points: np.ndarray) -> np.ndarray:
    """Indices of the non-dominated rows of ``points`` (minimisation), first occurrences."""
    keep = []
    for i, p in enumerate(points):
        dominated = np.any(np.all(points <= p, axis=1) & np.any(points < p, axis=1))
        duplicate = any(np.array_equal(points[j], p) for j in keep)
        if not dominated and not duplicate:
            keep.append(i)
    return np.array(keep, dtype=int)


def select_solution(errors: Sequence[float], gaps: Sequence[float], tolerance: float) -> int:
    """Index of the lowest-error candidate with sparsity gap within ``tolerance``.

    Falls back to the smallest gap if none is within tolerance (cannot happen when the uniform
    solution was evaluated).
    """
    errors = np.asarray(errors, dtype=float)
    gaps = np.asarray(gaps, dtype=float)
    feasible = np.flatnonzero(gaps <= tolerance + 1e-12)
    if feasible.size == 0:
        return int(np.argmin(gaps))
    return int(feasible[np.argmin(errors[feasible])])


def run_nsga3(
    evaluate: Callable[[np.ndarray], Sequence[tuple[float, float]]],
    n_blocks: int,
    n_choices: int,
    budget: int,
    pop_size: int,
    seed: int,
    uniform_choice: int,
    on_generation: Callable[[], None] | None = None,
) -> None:
    """Drive pymoo's NSGA-III through its ask/tell interface for ``budget`` evaluations.

    Args:
        evaluate: maps a population (one integer vector per row, one choice per block) to
            one ``(error, gap)`` per row; the caller caches and records, so repeated vectors
            cost nothing, and may share the rows across ranks.
        n_blocks: number of variables.
        n_choices: values per variable (``0 .. n_choices - 1``).
        budget: number of candidate evaluations (including the initial population); fewer
            when the space runs out of new candidates first.
        pop_size: population size.
        seed: seeds pymoo and the initial population.
        uniform_choice: the variable value that means "the target ratio", used to put the
            uniform solution into the initial population.
        on_generation: called after each generation (to save resumable state).
    """
    from pymoo.algorithms.moo.nsga3 import NSGA3
    from pymoo.core.problem import Problem
    from pymoo.operators.crossover.sbx import SBX
    from pymoo.operators.mutation.pm import PM
    from pymoo.operators.repair.rounding import RoundingRepair
    from pymoo.problems.static import StaticProblem
    from pymoo.util.ref_dirs import get_reference_directions

    pop_size = max(2, min(pop_size, budget))
    problem = Problem(n_var=n_blocks, n_obj=2, xl=0, xu=n_choices - 1, vtype=int)
    rng = np.random.default_rng(seed)
    initial = rng.integers(0, n_choices, size=(pop_size, n_blocks))
    initial[0] = uniform_choice
    algorithm = NSGA3(
        # No more reference directions than individuals (pymoo warns otherwise).
        ref_dirs=get_reference_directions("das-dennis", 2, n_partitions=min(12, pop_size - 1)),
        pop_size=pop_size,
        sampling=initial,
        crossover=SBX(prob=0.9, eta=15, vtype=float, repair=RoundingRepair()),
        mutation=PM(eta=20, vtype=float, repair=RoundingRepair()),
        eliminate_duplicates=True,
    )
    # The budget is enforced here, not by a pymoo termination criterion.
    algorithm.setup(problem, termination=("n_gen", 10**9), seed=seed, verbose=False)
    spent = 0
    while spent < budget:
        population = algorithm.ask()
        if population is None or len(population) == 0:
            # No offspring unlike the population could be made (a small space, e.g. 3^2
            # vectors for 2 blocks, explored): pymoo returns None; stop short of the budget.
            break
        X = population.get("X").astype(int)[: budget - spent]
        population = population[: len(X)]
        F = np.asarray(evaluate(X), dtype=float).reshape(len(X), 2)
        spent += len(X)
        algorithm.evaluator.eval(StaticProblem(problem, F=F), population)
        algorithm.tell(infills=population)
        if on_generation is not None:
            on_generation()
