"""Candidate-parallel search on CPU: 2 gloo processes give what one process gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from optishear_lightning.search.distributed import CandidateShard, RankFailed

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ddp_search.py"


def run_search(out: Path, world_size: int, *extra: str) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), str(world_size), *extra],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world_size)]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    return run_search(tmp_path_factory.mktemp("one"), 1)[0]


def test_two_ranks_give_the_single_process_result(tmp_path, single):
    ranks = run_search(tmp_path, 2)
    assert "error" not in single, single
    for rank in ranks:
        assert rank["result"] == single["result"]  # same candidates, values, history, pick
    assert ranks[0]["evaluations"] == single["evaluations"] > 0
    # The work was shared, not repeated: each rank ran about half of the forward passes.
    assert sum(r["own_forwards"] for r in ranks) == single["own_forwards"]
    assert max(r["own_forwards"] for r in ranks) < 0.7 * single["own_forwards"]


@pytest.mark.parametrize(("write", "resume"), [(2, 1), (1, 2)])
def test_a_state_written_with_some_ranks_resumes_with_others(tmp_path, single, write, resume):
    state = tmp_path / "state.json"
    run_search(tmp_path / "write", write, "--state", str(state))
    assert state.is_file()
    ranks = run_search(tmp_path / "resume", resume, "--state", str(state))
    for rank in ranks:
        assert rank["result"] == single["result"]
        assert rank["evaluations"] == 0  # everything came from the state file


def test_a_failing_rank_stops_every_rank_with_its_error(tmp_path):
    ranks = run_search(tmp_path, 2, "--fail-on-rank", "1")
    for rank in ranks:
        assert "RankFailed" in rank["error"] and "rank 1" in rank["error"]
        assert "injected failure" in rank["error"]


def test_one_process_maps_in_order_and_raises_the_error_itself():
    shard = CandidateShard()
    assert shard.map(lambda x: x * x, [1, 2, 3]) == [1, 4, 9]
    with pytest.raises(ZeroDivisionError):
        shard.map(lambda x: 1 / x, [1, 0])
    assert not issubclass(ZeroDivisionError, RankFailed)


def test_distributed_true_without_a_process_group_is_a_clear_error():
    with pytest.raises(ValueError, match="process group"):
        CandidateShard.current(True)
