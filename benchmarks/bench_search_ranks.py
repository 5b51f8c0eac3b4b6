"""Candidate-parallel search throughput: the same search on 1 rank and on N ranks, side by side.

Each run starts ``world_size`` processes (``torch.multiprocessing``; NCCL on GPUs, one GPU per
rank, gloo on the CPU), builds the same model on every rank, and runs ``optishear_search`` with
the same seed and settings; rank 0 records the phase timings. Throughput is model-wise
candidate evaluations per second of the search phases (calibration excluded), and the result
of every run is checked to be the one-rank result (same history, same pick).

Models: ``--model 8b`` (random LLaMA-3-8B shapes, bf16), ``--model tiny`` (a random 4-block
model; what the CPU can run), or a path / built-in name for ``load_model`` (e.g. SmolLM2).

    python benchmarks/bench_search_ranks.py --model 8b --ranks 1 2 --device cuda \
        --out benchmarks/results/search_ranks_8b_h200x2
    python benchmarks/bench_search_ranks.py --model tiny --ranks 1 2 --device cpu --out /tmp/r
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from harness import command_line, md_table, utc_now, write_report
from llama3_8b import LLAMA3_8B

from optishear_lightning.search import optishear_search


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="8b, tiny, or a path / name for load_model")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--search", default="{}", help="JSON of SearchConfig overrides")
    p.add_argument("--out", default=None, help="report prefix (writes .json and .md)")
    return p.parse_args()


def build_model(name: str, device: torch.device) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if name in ("8b", "tiny"):
        shape = LLAMA3_8B if name == "8b" else dict(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        )  # fmt: skip
        dtype = torch.bfloat16 if name == "8b" else torch.float32
        with torch.device(device):
            return LlamaForCausalLM(LlamaConfig(**shape)).to(dtype).eval()
    from optishear_lightning import load_model

    return load_model(name, device=str(device))


def rank_main(rank: int, args: argparse.Namespace, world: int, rendezvous: str) -> None:
    device = torch.device(f"cuda:{rank}" if args.device == "cuda" else "cpu")
    if args.device == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        backend = "nccl" if args.device == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"file://{rendezvous}", rank=rank,
                                world_size=world)  # fmt: skip
    model = build_model(args.model, device)
    vocab = model.config.vocab_size
    calib = torch.randint(0, vocab, (args.nsamples, args.seqlen),
                          generator=torch.Generator().manual_seed(0))  # fmt: skip
    settings = {"progress": False} | json.loads(args.search)
    found = optishear_search(model, calib, 0.5, device=device, **settings)
    if rank == 0:
        record = {
            "world_size": world,
            "timing": found.timing,
            "history": found.history,
            "pick": [found.to_dict()["metric"], found.ratios],
            "peak_cuda_bytes": torch.cuda.max_memory_allocated(device)
            if args.device == "cuda"
            else None,
        }
        Path(rendezvous + ".result.json").write_text(json.dumps(record))
    if world > 1:
        dist.destroy_process_group()


def run(args: argparse.Namespace, world: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        rendezvous = os.path.join(tmp, "rendezvous")
        if world == 1:
            rank_main(0, args, 1, rendezvous)
        else:
            mp.spawn(rank_main, args=(args, world, rendezvous), nprocs=world, join=True)
        return json.loads(Path(rendezvous + ".result.json").read_text())


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    base = runs[0]
    rows = []
    for r in runs:
        t = r["timing"]
        skip = ("calibration_s", "total_s")
        phases = sum(v for k, v in t.items() if k.endswith("_s") and k not in skip)
        rate = t["model_evaluations"] / phases if phases else 0.0
        rows.append({
            "ranks": r["world_size"], "evaluations": t["model_evaluations"],
            "phases_s": phases, "calibration_s": t["calibration_s"], "total_s": t["total_s"],
            "candidates_per_s": rate, "same_as_one_rank": r["history"] == base["history"]
            and r["pick"] == base["pick"], "peak_cuda_bytes": r["peak_cuda_bytes"],
        })  # fmt: skip
    for row in rows:
        row["speedup"] = row["candidates_per_s"] / rows[0]["candidates_per_s"]
    return rows


def markdown(report: dict[str, Any]) -> str:
    header = ["ranks", "evaluations", "phases s", "candidates/s", "speed-up", "same result"]
    body = [[r["ranks"], r["evaluations"], f"{r['phases_s']:.1f}", f"{r['candidates_per_s']:.2f}",
             f"{r['speedup']:.2f}x", "yes" if r["same_as_one_rank"] else "**no**"]
            for r in report["rows"]]  # fmt: skip
    return (
        f"# Candidate-parallel search: {report['model']} on {report['device']}\n\n"
        f"- Date: {report['date']}\n- Command: `{report['command']}`\n\n"
        + "\n".join(md_table(header, body, "rrrrrl"))
        + "\n"
    )


def main() -> None:
    args = parse_args()
    if args.ranks[0] != 1:
        args.ranks = [1, *args.ranks]  # the one-rank run is the reference
    runs = [run(args, world) for world in args.ranks]
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    report = {
        "model": args.model,
        "device": device,
        "date": utc_now(),
        "command": command_line(),
        "torch": torch.__version__,
        "rows": summarise(runs),
    }
    print(markdown(report), flush=True)
    if args.out:
        write_report(args.out, report, markdown(report))


if __name__ == "__main__":
    main()
