"""Run one OptiShear search in N CPU processes (gloo) sharing the candidates, or in one.

Run by tests/search/test_distributed.py as
``python tests/scripts/ddp_search.py OUT_DIR WORLD_SIZE [--state PATH] [--fail-on-rank R]``.
Every rank writes ``rank{r}.json``: its SearchResult without the timings, plus the number of
model-wise evaluations it made. ``--fail-on-rank`` makes that rank's metric screening raise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1].parent))

from tests.conftest import tiny_llama

from optishear_lightning.search import MetaMetric, optishear_search
from optishear_lightning.search import context as search_context
from optishear_lightning.search.space import MAGNITUDE, WANDA

IDS = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
SETTINGS = {
    "tolerance": 0.005,
    "metric_candidates": [
        WANDA,
        MAGNITUDE,
        MetaMetric("sqrt", "identity", "column_sum", "none"),
        MetaMetric("identity", "square", "relative_sum", "column_sum"),
        MetaMetric("square", "identity", "none", "row_sum"),
    ],
    "metric_topk": 3,
    "proxy_blocks": 1,
    "budget": 30,
    "pop_size": 10,
    "objective_samples": 2,
    "objective_seq_len": 16,
    "validation_samples": 2,
    "progress": False,
}


def comparable(result) -> dict:
    data = result.to_dict()
    data.pop("timing")
    return data


def run(rank: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    if args.world_size > 1:
        dist.init_process_group(
            "gloo", init_method=f"file://{args.out / 'rendezvous'}", rank=rank,
            world_size=args.world_size,
        )  # fmt: skip
    if rank == args.fail_on_rank:

        def broken(*_args, **_kwargs):
            raise RuntimeError("injected failure")

        search_context.SearchContext.proxy_error = broken
    calls = {"forward": 0}
    evaluate = search_context.SearchContext.evaluate

    def counted(self, *a, **k):
        calls["forward"] += 1  # model-wise forward passes this rank made itself
        return evaluate(self, *a, **k)

    search_context.SearchContext.evaluate = counted
    model = tiny_llama(0, layers=4, hidden=64)
    try:
        result = optishear_search(model, IDS, 0.5, state_path=args.state, **SETTINGS)
        out = {
            "result": comparable(result),
            "evaluations": result.timing["model_evaluations"],
            "own_forwards": calls["forward"],
        }
    except Exception as err:  # recorded for the test: every rank must stop with the error
        out = {"error": f"{type(err).__name__}: {err}"}
    (args.out / f"rank{rank}.json").write_text(json.dumps(out))
    if args.world_size > 1:
        # Leave together, then skip the C++ teardown: after a rank failed, gloo's teardown
        # at interpreter exit aborts now and then ("terminate called without an active
        # exception", about 1 run in 10 on CPU) although both ranks finished and wrote their
        # results. What is tested is written above; the exit status must not be that noise.
        dist.barrier()
        os._exit(0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("world_size", type=int)
    p.add_argument("--state", type=Path, default=None)
    p.add_argument("--fail-on-rank", type=int, default=None)
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.world_size == 1:
        run(0, args)
    else:
        mp.spawn(run, args=(args,), nprocs=args.world_size, join=True)


if __name__ == "__main__":
    main()
