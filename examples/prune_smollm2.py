"""Prune SmolLM2-135M (or any causal LM) with one call and compare perplexity.

Runs offline on a CPU in a few minutes with the defaults: Wanda at 50% unstructured, 32
calibration windows of 512 tokens, perplexity on the first 16 windows of 512 tokens of
WikiText-2 test. Calibration text is the C4 slice in ../shared/data when present, else text
sampled from the model itself (data-free calibration).

    python examples/prune_smollm2.py --method sparsegpt --pattern 2:4 --output pruned/
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from optishear_lightning.data import calibration_windows, evaluation_tokens
from optishear_lightning.evaluation import perplexity
from optishear_lightning.metrics import METHODS
from optishear_lightning.models import DEFAULT_MODEL, load_model, load_tokenizer
from optishear_lightning.pruning import check_output_dir, prune, save_pruned_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
C4 = SHARED / "c4" / "c4-train.00000-of-01024.head1041.jsonl"
WIKI = SHARED / "wikitext2" / "wiki.test.raw"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--method", default="wanda", choices=sorted(METHODS))
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--pattern", default="unstructured", help="unstructured, 2:4, 4:8...")
    parser.add_argument("--calibration", default=str(C4) if C4.exists() else "self")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval", default=str(WIKI) if WIKI.exists() else None)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=16, help="0 = the whole text")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--output", help="save the pruned model here (must not exist)")
    args = parser.parse_args()

    if args.output:
        check_output_dir(args.output)  # fail now, not after pruning
    sparsity = None if ":" in args.pattern else args.sparsity
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype=args.dtype, device=args.device)

    windows = args.eval_windows or None
    if args.eval:
        tokens = evaluation_tokens(args.eval, tokenizer)
        dense = perplexity(model, tokens, args.eval_seqlen, max_windows=windows)
        print(f"dense perplexity:  {dense:.3f}")
    calib = calibration_windows(
        args.calibration, tokenizer, args.nsamples, args.seqlen, seed=0, model=model
    )
    start = time.perf_counter()
    result = prune(model, calib, args.method, sparsity, args.pattern, progress=True)
    print(result.summary())
    print(f"prune wall time: {time.perf_counter() - start:.1f}s")
    if args.eval:
        pruned = perplexity(model, tokens, args.eval_seqlen, max_windows=windows)
        print(f"pruned perplexity: {pruned:.3f}  ({args.method}, {result.pattern})")
    if args.output:
        print(f"saved to {save_pruned_model(model, args.output, tokenizer, result)}")


if __name__ == "__main__":
    main()
