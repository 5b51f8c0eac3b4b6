"""OptiShear vs the engine baselines, side by side (issue 3's quality benchmark).

For each target (50% unstructured by default, plus 2:4, 4:8, 60%, 70% on request) it measures
WikiText-2 perplexity of: magnitude, Wanda, RIA, SparseGPT (uniform ratios); OptiShear (searched
metric + searched ratios); Wanda and RIA with OptiShear's ratios. Optionally zero-shot accuracy
for dense / Wanda / OptiShear. Every number comes from this run; results are written to JSON
after each step and rendered to Markdown at the end.

    python benchmarks/bench_optishear.py --device cuda --out benchmarks/results/optishear_h200.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from optishear_lightning.data import calibration_windows, evaluation_tokens
from optishear_lightning.evaluation import perplexity, zero_shot_accuracy
from optishear_lightning.masks import parse_pattern
from optishear_lightning.models import load_model, load_tokenizer
from optishear_lightning.pruning import prune
from optishear_lightning.search import optishear_search

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import SHARED_DATA as SHARED
from harness import command_line, describe_environment, write_json, write_text_atomic


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--calib", default=str(SHARED / "c4" / "c4-train.00000-of-01024.head1041.jsonl"))
    p.add_argument("--eval", default=str(SHARED / "wikitext2" / "wiki.test.raw"))
    p.add_argument("--zeroshot-dir", default=str(SHARED / "zeroshot"))
    p.add_argument("--zeroshot-limit", type=int, default=0, help="0 = skip zero-shot")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--eval-windows", type=int, default=0, help="0 = the whole test set")
    p.add_argument("--targets", nargs="+", default=["0.5"], help="e.g. 0.5 2:4 4:8 0.6 0.7")
    p.add_argument("--baselines", nargs="+", default=["magnitude", "wanda", "ria", "sparsegpt"])
    p.add_argument("--budget", type=int, default=300)
    p.add_argument("--pop-size", type=int, default=40)
    p.add_argument("--objective-samples", type=int, default=8)
    p.add_argument("--proxy-blocks", type=int, default=8)
    p.add_argument("--proxy-rows", type=int, default=0, help="0 = all rows")
    p.add_argument("--metric-topk", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", required=True, help="Markdown file; a .json is written beside it")
    p.add_argument("--note", action="append", default=[])
    return p.parse_args()


class Session:
    """The model, its dense weights, the data, and the report every step is added to."""

    def __init__(self, args: argparse.Namespace, report: dict[str, Any], raw_path: Path):
        self.args, self.report, self.raw_path = args, report, raw_path
        self.tokenizer = load_tokenizer(args.model)
        self.model = load_model(args.model, dtype=args.dtype, device=args.device)
        self.dense_weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.calib = calibration_windows(
            args.calib, self.tokenizer, args.nsamples, args.seqlen, seed=0
        )
        self.tokens = evaluation_tokens(args.eval, self.tokenizer)
        self.windows = args.eval_windows or None

    def save(self) -> None:
        write_json(self.raw_path, self.report, default=str, end="")

    def reset(self) -> None:
        self.model.load_state_dict(self.dense_weights)

    def ppl(self) -> float:
        return perplexity(
            self.model, self.tokens, self.args.eval_seqlen, batch_size=4, max_windows=self.windows
        )

    def zeroshot(self, name: str) -> None:
        args = self.args
        if args.zeroshot_limit:
            t = time.perf_counter()
            self.report["zeroshot"][name] = zero_shot_accuracy(
                self.model, self.tokenizer, args.zeroshot_dir, limit=args.zeroshot_limit,
                batch_size=16,
            )  # fmt: skip
            self.report["zeroshot"][name]["_seconds"] = time.perf_counter() - t

    def row(self, target: str, method: str, value: float, seconds: float | None, extra: str = ""):
        self.report["rows"].append(
            {"target": target, "method": method, "ppl": value, "seconds": seconds, "note": extra}
        )
        print(f"[{target}] {method}: ppl {value:.3f} ({seconds or 0:.1f}s) {extra}", flush=True)
        self.save()

    def prune(self, method: Any, sparsity: Any, pattern: str) -> None:
        prune(self.model, self.calib, method, sparsity, pattern, batch_size=self.args.batch_size)


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    raw_path = out.with_suffix(".json")
    report: dict[str, Any] = {
        "command": command_line(),
        "environment": describe_environment(args.device),
        "args": vars(args),
        "rows": [],
        "searches": {},
        "zeroshot": {},
    }
    s = Session(args, report, raw_path)
    s.row("dense", "dense", s.ppl(), None)
    s.zeroshot("dense")
    for target in args.targets:
        run_target(s, target, out)
    s.reset()
    write_text_atomic(out, render(report))
    print(f"wrote {out} and {raw_path}")


def run_target(s: Session, target: str, out: Path) -> None:
    """The baselines, the search, and the baselines with the searched ratios at ``target``."""
    pattern = target if ":" in target else "unstructured"
    sparsity = None if ":" in target else float(target)
    for method in s.args.baselines:
        s.reset()
        t = time.perf_counter()
        s.prune(method, sparsity, pattern)
        s.row(target, method, s.ppl(), time.perf_counter() - t)
        if method == "wanda" and target == "0.5":
            s.zeroshot("wanda_0.5")
    s.reset()
    found, search_s = search(s, target, pattern, sparsity, out)
    ratios = None if sparsity is None else found.ratios
    t = time.perf_counter()
    s.prune(found.metric, ratios, pattern)
    s.row(target, "optishear", s.ppl(), search_s + time.perf_counter() - t, str(found.metric))
    if target == "0.5":
        s.zeroshot("optishear_0.5")
    if sparsity is not None:
        for method in ("wanda", "ria"):
            s.reset()
            t = time.perf_counter()
            s.prune(method, ratios, pattern)
            s.row(target, f"{method} + optishear ratios", s.ppl(), time.perf_counter() - t)


def search(s: Session, target: str, pattern: str, sparsity: float | None, out: Path) -> Any:
    """The OptiShear search at ``target``: its result (also saved beside ``out``), seconds."""
    args = s.args
    t = time.perf_counter()
    found = optishear_search(
        s.model,
        s.calib,
        float(sparsity or parse_pattern(pattern).sparsity),
        pattern,
        budget=args.budget,
        pop_size=args.pop_size,
        objective_samples=args.objective_samples,
        proxy_blocks=args.proxy_blocks,
        proxy_rows=args.proxy_rows or None,
        metric_topk=args.metric_topk,
        batch_size=args.batch_size,
        progress=False,
    )
    search_s = time.perf_counter() - t
    found.save(out.parent / f"optishear_{target.replace(':', 'of')}_search.json")
    s.report["searches"][target] = {
        "metric": str(found.metric),
        "ratios": found.ratios,
        "achieved_sparsity": found.achieved_sparsity,
        "timing": found.timing,
        "search_seconds": search_s,
        "candidates_evaluated": len(found.history),
    }
    return found, search_s


def render(report: dict[str, Any]) -> str:
    env = report["environment"]
    gpu = env.get("gpu") or {}
    a = report["args"]
    lines = [
        "# OptiShear vs baselines",
        "",
        f"- Date: {env['date_utc']}",
        f"- Machine: {env['cpu']}, {env['cpu_cores']} cores"
        + (f"; GPU {gpu.get('name')} (CUDA {gpu.get('cuda')})" if gpu else "; no GPU"),
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
        f"- Command: `{report['command']}`",
        f"- Calibration: {a['nsamples']} x {a['seqlen']} tokens from `{Path(a['calib']).name}`,"
        " seed 0 (Wanda's get_c4 sampling).",
        f"- Evaluation: WikiText-2 test, windows of {a['eval_seqlen']} tokens, "
        + ("all windows." if not a["eval_windows"] else f"first {a['eval_windows']} windows only."),
        f"- Search: budget {a['budget']} ratio candidates, population {a['pop_size']}, objective on"
        f" {a['objective_samples']} calibration windows, proxy on {a['proxy_blocks']} blocks"
        f" ({a.get('proxy_rows') or 'all'} rows per matrix), "
        f"top {a['metric_topk']} metrics decided model-wise.",
    ]
    lines += [f"- Note: {n}" for n in a["note"]]
    lines += [
        "",
        "| target | method | WikiText-2 ppl | time s | notes |",
        "|---|---|---:|---:|---|",
    ]
    for r in report["rows"]:
        secs = "" if r["seconds"] is None else f"{r['seconds']:.1f}"
        lines.append(f"| {r['target']} | {r['method']} | {r['ppl']:.2f} | {secs} | {r['note']} |")
    lines += ["", "## Searches", ""]
    for target, s in report["searches"].items():
        t = s["timing"]
        lines.append(
            f"- **{target}**: metric `{s['metric']}`; achieved sparsity "
            f"{s['achieved_sparsity']:.4f}; {s['candidates_evaluated']} candidates in history "
            f"({int(t.get('model_evaluations', 0))} model-wise evaluations, "
            f"{t.get('evaluations_per_s', 0):.2f}/s); search wall time {s['search_seconds']:.1f}s"
            f" (calibration {t.get('calibration_s', 0):.1f}s,"
            f" metric {t.get('metric_screen_s', 0) + t.get('metric_decide_s', 0):.1f}s,"
            f" ratios {t.get('ratio_search_s', 0):.1f}s,"
            f" finalists {t.get('validation_s', 0):.1f}s)."
        )
        lines.append(f"  ratios: {' '.join(f'{r:.2f}' for r in s['ratios'])}")
    if report["zeroshot"]:
        tasks = sorted({k for v in report["zeroshot"].values() for k in v if not k.startswith("_")})
        lines += ["", "## Zero-shot accuracy (acc / acc_norm)", ""]
        lines += ["| model | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
        for name, res in report["zeroshot"].items():
            cells = [f"{res[t]['acc']:.3f} / {res[t]['acc_norm']:.3f}" for t in tasks]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append(f"\nFirst {a['zeroshot_limit']} examples of each task.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
