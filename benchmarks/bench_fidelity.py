"""Objective fidelity of an earlier search, without running the search again.

Reads the finalists that ``bench_search_quality.py`` recorded (method, ratios, objective and
validation values of each), prunes the dense model with each finalist exactly as the search
validated it (on the search's statistics windows), measures WikiText-2 perplexity, and reports
Spearman's rho between the finalists' objective (and validation) values and their perplexities.
Saves after every finalist, so a run stopped by a time limit keeps what it measured.

``--prune-on all`` prunes each finalist on *all* calibration rows instead (as the final prune
does) and scores it again on the validation windows (KL to the dense model, computed here):
it measures whether deciding among the finalists pruned exactly as they would be returned
would have chosen another one (the validation text is then inside the activation statistics).

    python benchmarks/bench_fidelity.py --result benchmarks/results/sq_h200_50.json \
        --setting 0.5 --rows optishear optishear+obs --model SmolLM2-135M-Instruct.Q4_1.gguf \
        --calib c4-train.jsonl --eval wiki.test.raw --tag fidelity_h200_50
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from bench_search_quality import Bench, sparsity_args
from harness import command_line, utc_now, write_json
from scipy.stats import spearmanr

from optishear_lightning import prune
from optishear_lightning.models import output_logits
from optishear_lightning.search import SearchConfig
from optishear_lightning.search.objectives import get_objective
from optishear_lightning.search.result import describe, method_from_dict
from optishear_lightning.search.windows import split_calibration


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--result", required=True, help="a bench_search_quality JSON with finalists")
    p.add_argument("--setting", default="0.5")
    p.add_argument("--rows", nargs="+", default=["optishear"], help="its search rows to check")
    p.add_argument("--model", required=True)
    p.add_argument("--calib", required=True)
    p.add_argument("--eval", required=True)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--max-eval-windows", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--search", default="{}", help="JSON of the search's SearchConfig overrides")
    p.add_argument(
        "--prune-on",
        choices=["statistics", "all"],
        default="statistics",
        help="calibration rows each finalist is pruned on: the search's statistics windows "
        "(as validated) or all rows (as the final prune)",
    )
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--tag", default="fidelity")
    args = p.parse_args()
    args.zeroshot, args.zs_limit = None, None  # Bench's zero-shot is not used here
    return args


def searched_rows(path: str, setting: str, labels: list[str]) -> list[dict[str, Any]]:
    rows = json.loads(Path(path).read_text())["rows"]
    found = [r for r in rows if r["setting"] == setting and r["method"] in labels]
    missing = set(labels) - {r["method"] for r in found}
    if missing:
        raise SystemExit(f"{path} has no {sorted(missing)} rows at setting {setting}.")
    return found


def spearman(xs: list[float], ys: list[float]) -> float | None:
    return float(spearmanr(xs, ys)[0]) if len(xs) > 2 else None


@torch.no_grad()
def final_hidden(model: torch.nn.Module, windows: list[torch.Tensor]) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    return [model.base_model(input_ids=w.to(device), use_cache=False).last_hidden_state
            for w in windows]  # fmt: skip


@torch.no_grad()
def validation_kl(
    model: torch.nn.Module, windows: list[torch.Tensor], dense: list[torch.Tensor]
) -> float:
    """Mean KL(dense || pruned) per token on ``windows`` (the search's validation objective)."""
    kl = get_objective("kl")
    total, n_tokens = 0.0, 0
    for pruned, ref in zip(final_hidden(model, windows), dense, strict=True):
        pruned, ref = pruned.flatten(0, 1), ref.flatten(0, 1)
        for start in range(0, pruned.shape[0], 2048):
            part = slice(start, start + 2048)
            p_logits, d_logits = output_logits(model, pruned[part]), output_logits(model, ref[part])
            total += float(kl.partial(p_logits.float(), d_logits.float()))
        n_tokens += pruned.shape[0]
    return kl.reduce(total, n_tokens)


def main() -> None:
    args = parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sources = searched_rows(args.result, args.setting, args.rows)
    b = Bench(args)
    _, pattern = sparsity_args(args.setting)
    stats = split_calibration(b.calib, SearchConfig(**json.loads(args.search)), args.batch_size)
    prune_rows = stats.statistics if args.prune_on == "statistics" else b.calib
    dense_validation = final_hidden(b.model, stats.validation)
    report: dict[str, Any] = {
        "command": command_line(),
        "machine": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "versions": {"torch": torch.__version__},
        "date": utc_now(),
        "prune_on": args.prune_on,
        "rows": [],
    }
    for source in sources:
        reconstruct = source["method"].split("+")[1] if "+" in source["method"] else None
        row: dict[str, Any] = {"row": source["method"], "reconstruct": reconstruct, "finalists": []}
        report["rows"].append(row)
        for f in source["finalists"]:
            b.reset()
            ratios = None if ":" in args.setting else f["ratios"]
            method = method_from_dict(f["method"])
            prune(b.model, prune_rows, method, ratios, pattern, batch_size=args.batch_size,
                  reconstruct=reconstruct, keep_masks=False)  # fmt: skip
            row["finalists"].append(
                {
                    "method": describe(method),
                    "objective": f["objective"],
                    "validation": f["validation"],
                    "validation_here": validation_kl(b.model, stats.validation, dense_validation),
                    "ppl": b.ppl(),
                }
            )
            ppl = [x["ppl"] for x in row["finalists"]]
            row["rho_objective"] = spearman([x["objective"] for x in row["finalists"]], ppl)
            row["rho_validation"] = spearman([x["validation"] for x in row["finalists"]], ppl)
            here = [x["validation_here"] for x in row["finalists"]]
            row["rho_validation_here"] = spearman(here, ppl)
            print(json.dumps(row["finalists"][-1]), flush=True)
            write_json(out / f"{args.tag}.json", report)
    print(json.dumps({r["row"]: (r["rho_objective"], r["rho_validation"]) for r in report["rows"]}))


if __name__ == "__main__":
    main()
