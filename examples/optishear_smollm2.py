"""Search an OptiShear metric and per-block ratios for SmolLM2-135M, prune, and compare.

The defaults are sized for a CPU (a few minutes on 2 cores: 24 calibration windows of 256
tokens, of which 8 are cut into 16 objective and validation windows of 128 tokens; 2 blocks and
128 rows per matrix for the proxy; 60 ratio candidates). On a GPU use the literature's setting
and the default search windows (64 + 64 windows of 512 tokens):

    python examples/optishear_smollm2.py --nsamples 128 --seqlen 2048 --budget 300 \
        --proxy-blocks 8 --proxy-rows 0 --objective-samples 64 --objective-seq-len 512 \
        --validation-samples 64 --eval-windows 0 --reconstruct lsq --output-dir optishear-smollm2/
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from optishear_lightning.data import calibration_windows, evaluation_tokens
from optishear_lightning.evaluation import perplexity
from optishear_lightning.models import DEFAULT_MODEL, load_model, load_tokenizer
from optishear_lightning.pruning import check_output_dir, prune
from optishear_lightning.search import SearchConfig, optishear_search, save_plots

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
C4 = SHARED / "c4" / "c4-train.00000-of-01024.head1041.jsonl"
WIKI = SHARED / "wikitext2" / "wiki.test.raw"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--pattern", default="unstructured")
    parser.add_argument("--calibration", default=str(C4) if C4.exists() else "self")
    parser.add_argument("--nsamples", type=int, default=24)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--budget", type=int, default=60)
    parser.add_argument("--pop-size", type=int, default=20)
    parser.add_argument("--proxy-blocks", type=int, default=2)
    parser.add_argument("--proxy-rows", type=int, default=128, help="0 = all rows")
    parser.add_argument("--metric-topk", type=int, default=4)
    parser.add_argument("--objective-samples", type=int, default=8)
    parser.add_argument("--objective-seq-len", type=int, default=128)
    parser.add_argument("--validation-samples", type=int, default=8)
    parser.add_argument("--reconstruct", default=None, choices=[None, "obs", "lsq"])
    parser.add_argument("--eval", default=str(WIKI) if WIKI.exists() else None)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=16, help="0 = the whole text")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output-dir", default=None, help="search result + plots (must not exist)")
    args = parser.parse_args()

    out = check_output_dir(args.output_dir) if args.output_dir else None
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, device=args.device)
    calib = calibration_windows(
        args.calibration, tokenizer, args.nsamples, args.seqlen, seed=0, model=model
    )
    config = SearchConfig(
        budget=args.budget,
        pop_size=args.pop_size,
        proxy_blocks=args.proxy_blocks,
        proxy_rows=args.proxy_rows or None,
        metric_topk=args.metric_topk,
        objective_samples=args.objective_samples,
        objective_seq_len=args.objective_seq_len,
        validation_samples=args.validation_samples,
        reconstruct=args.reconstruct,
    )
    found = optishear_search(model, calib, args.sparsity, args.pattern, config=config)
    if out is not None:
        out.mkdir(parents=True)
        found.save(out / "search_result.json")
        save_plots(found, out)
    if not args.eval:
        return
    tokens = evaluation_tokens(args.eval, tokenizer)
    windows = args.eval_windows or None
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    ratios = None if ":" in args.pattern else found.ratios
    uniform = None if ":" in args.pattern else args.sparsity
    for label, method, sparsity in [
        ("dense", None, None),
        ("wanda (uniform)", "wanda", uniform),
        ("optishear", found.metric, ratios),
        ("wanda + optishear ratios", "wanda", ratios),
    ]:
        model.load_state_dict(dense)
        if method is not None:
            prune(model, calib, method, sparsity, args.pattern, reconstruct=found.reconstruct)
        ppl = perplexity(model, tokens, args.eval_seqlen, max_windows=windows)
        print(f"{label:28s} perplexity {ppl:.3f}")


if __name__ == "__main__":
    main()
