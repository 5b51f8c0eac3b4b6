"""Time the OptiShear search on a randomly initialised LLaMA-3-8B-shaped model (bf16).

Quality means nothing here (random weights, random tokens): only time, end to end, of the
default search (``SearchConfig()``: 441 metrics screened on 8 proxy blocks, 9 decided on the KL
objective over 64 x 512 windows, 300 ratio candidates, finalists really pruned and validated on
64 x 512 held-out windows). ``--progress`` prints each phase's bar with its elapsed time as it
ends, and ``--state`` keeps the search history, so a run stopped by a time limit still shows
how far it got.

    python benchmarks/bench_search_8b.py --device cuda --progress --state state.json --out r.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from harness import cuda_peak_bytes, utc_now, write_text_atomic
from llama3_8b import LLAMA3_8B
from transformers import LlamaConfig, LlamaForCausalLM

from optishear_lightning.search import optishear_search


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--budget", type=int, default=300)
    p.add_argument("--pop-size", type=int, default=40)
    p.add_argument("--proxy-blocks", type=int, default=8)
    p.add_argument("--metric-topk", type=int, default=8)
    p.add_argument(
        "--finalist-calibration",
        choices=["all", "statistics"],
        default="all",
        help="rows each finalist is pruned on (SearchConfig.finalist_calibration)",
    )
    p.add_argument("--progress", action="store_true", help="print each phase's progress bar")
    p.add_argument("--state", help="search state file (history survives an interrupted run)")
    p.add_argument("--out", help="also write the JSON report to this file")
    args = p.parse_args()

    config = LlamaConfig(
        **LLAMA3_8B
        | dict(
            num_hidden_layers=args.layers,
            hidden_size=args.hidden,
            intermediate_size=args.intermediate,
            vocab_size=args.vocab,
        )
    )
    t = time.perf_counter()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(args.device):
        model = LlamaForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    print(json.dumps({"init_s": time.perf_counter() - t}), flush=True)
    calib = torch.randint(
        0, args.vocab, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0)
    )
    t = time.perf_counter()
    found = optishear_search(
        model,
        calib,
        0.5,
        budget=args.budget,
        pop_size=args.pop_size,
        proxy_blocks=args.proxy_blocks,
        metric_topk=args.metric_topk,
        finalist_calibration=args.finalist_calibration,
        progress=args.progress,
        state_path=args.state,
    )
    total = time.perf_counter() - t
    timing = found.timing
    n_proxy = sum(1 for h in found.history if h["kind"] == "metric_proxy")
    finalists = len(found.finalists)
    report = {
        "measured_total_s": total,
        "timing": timing,
        "proxy_screenings": n_proxy,
        "validated_finalists": finalists,
        "chosen_by": found.chosen_by,
        "peak_cuda_bytes": cuda_peak_bytes(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "date": utc_now(),
        "args": vars(args),
    }
    text = json.dumps(report, indent=1)
    print(text, flush=True)
    if args.out:
        write_text_atomic(args.out, text + "\n")


if __name__ == "__main__":
    main()
