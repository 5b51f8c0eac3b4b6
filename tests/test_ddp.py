"""DDP on CPU (2 processes, gloo): the callback gives every rank identical masks and weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "ddp_masks.py"


@pytest.mark.parametrize("method", ["wanda", "optishear"])
def test_ddp_ranks_hold_identical_masks(tmp_path, method):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), method],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["masks"].keys() == ranks[1]["masks"].keys()
    assert ranks[0]["masks"], "no masks saved"
    for name, keep in ranks[0]["masks"].items():
        assert torch.equal(keep, ranks[1]["masks"][name]), name
        assert 0.4 < 1 - keep.float().mean().item() < 0.6
    for name, weight in ranks[0]["weights"].items():
        # DDP keeps the replicas in sync from identical starting weights; pruning happened
        # after DDP's initial broadcast, so this only holds if the callback synced them.
        assert torch.equal(weight, ranks[1]["weights"][name]), name
    assert ranks[0]["violations"] == 0 and ranks[1]["violations"] == 0
    if method == "optishear":  # the search was shared: every rank recorded the same history
        assert ranks[0]["history"] and ranks[0]["history"] == ranks[1]["history"]
