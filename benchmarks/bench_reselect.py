"""Re-pick ratios from a saved search's history under another tolerance, prune and evaluate.

The search history holds every evaluated ratio candidate with both objectives, so a stricter
sparsity tolerance needs no new search:

    python benchmarks/bench_reselect.py SEARCH.json --tolerance 0.001 --model ... --device cuda
"""

from __future__ import annotations

import argparse
import json
import time

from harness import SHARED_DATA as SHARED

from optishear_lightning.data import calibration_windows, evaluation_tokens
from optishear_lightning.evaluation import perplexity
from optishear_lightning.models import load_model, load_tokenizer
from optishear_lightning.pruning import prune
from optishear_lightning.search import SearchResult
from optishear_lightning.search.ratios import select_solution


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("search")
    p.add_argument("--tolerance", type=float, default=0.001)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--calib", default=str(SHARED / "c4" / "c4-train.00000-of-01024.head1041.jsonl"))
    p.add_argument("--eval", default=str(SHARED / "wikitext2" / "wiki.test.raw"))
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--methods", nargs="+", default=["searched", "wanda", "ria"])
    args = p.parse_args()

    found = SearchResult.load(args.search)
    mine = found.metric.to_dict()
    evaluated = [h for h in found.history if "error" in h and h["metric"] == mine]
    pick = evaluated[
        select_solution(
            [h["error"] for h in evaluated], [h["sparsity_gap"] for h in evaluated], args.tolerance
        )
    ]
    print(
        json.dumps(
            {
                "tolerance": args.tolerance,
                "ratios": pick["ratios"],
                "error": pick["error"],
                "sparsity_gap": pick["sparsity_gap"],
            }
        )
    )
    tok = load_tokenizer(args.model)
    model = load_model(args.model, device=args.device)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    calib = calibration_windows(args.calib, tok, args.nsamples, args.seqlen, seed=0)
    tokens = evaluation_tokens(args.eval, tok)
    for method in args.methods:
        model.load_state_dict(dense)
        t = time.perf_counter()
        r = prune(model, calib, found.metric if method == "searched" else method, pick["ratios"])
        ppl = perplexity(model, tokens, 2048, batch_size=4)
        print(
            json.dumps(
                {
                    "method": method,
                    "ppl": ppl,
                    "overall_sparsity": r.overall_sparsity,
                    "seconds": time.perf_counter() - t,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
