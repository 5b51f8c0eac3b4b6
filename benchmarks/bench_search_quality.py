"""Search quality side by side, in one run: fixed methods, SparseGPT, OptiShear with and without
weight reconstruction, the objective's fidelity and the search's cost.

For each setting (``0.5``, ``0.6``, ``0.7``, ``4:8``, ``2:4``...) on one model, one calibration
set and one evaluation text:

- uniform Wanda, RIA and SparseGPT (``prune``), and Wanda with each reconstruction;
- OptiShear mask-only with the default :class:`SearchConfig` (its state file is kept), then the
  same search with ``reconstruct=...`` (only its finalist phase runs again: the state file
  holds everything before it);
- for N:M settings, with ``--permute-methods`` / ``--search-permute``, the same with the input
  channels permuted before N:M selection (``permute=True``, labelled ``+perm``);
- the objective's fidelity: every finalist of the mask-only search is pruned again and its
  WikiText-2 perplexity measured; Spearman's rho between the finalists' objective (and
  validation) values and their perplexities;
- optionally, mean zero-shot accuracy of SparseGPT and of the reconstructed OptiShear.

Every model starts from the same dense weights (copied back from a CPU copy). Writes
``search_quality.json`` and ``search_quality.md`` into ``--out-dir``.

    python benchmarks/bench_search_quality.py --model SmolLM2-135M-Instruct.Q4_1.gguf \
        --calib c4-train.jsonl --eval wiki.test.raw --settings 0.5 2:4 --out-dir results/
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from harness import cpu_model, md_table, utc_now, write_json, write_text_atomic
from scipy.stats import spearmanr

from optishear_lightning import load_model, load_tokenizer, prune
from optishear_lightning.data import calibration_windows, evaluation_tokens
from optishear_lightning.evaluation import perplexity, zero_shot_accuracy
from optishear_lightning.masks import parse_pattern
from optishear_lightning.search import SearchConfig, optishear_search
from optishear_lightning.search.result import describe, method_from_dict
from optishear_lightning.search.windows import split_calibration


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--calib", required=True)
    p.add_argument("--eval", required=True)
    p.add_argument("--zeroshot", default=None, help="folder of the zero-shot task files")
    p.add_argument("--zs-limit", type=int, default=None, help="examples per zero-shot task")
    p.add_argument("--zs-settings", nargs="*", default=["0.5"])
    p.add_argument("--settings", nargs="+", default=["0.5"])
    p.add_argument("--fixed", nargs="*", default=["wanda", "ria", "sparsegpt"])
    p.add_argument("--permute-methods", nargs="*", default=[], help="N:M: fixed methods + perm")
    p.add_argument("--search-permute", action="store_true", help="N:M: also search with perm")
    p.add_argument("--skip-search", action="store_true", help="fixed methods only")
    p.add_argument("--fidelity", nargs="*", default=["0.5"], help="settings to measure rho on")
    p.add_argument("--reconstruct", nargs="*", default=["lsq", "obs"], help="for fixed methods")
    p.add_argument("--recon-methods", nargs="*", default=["wanda", "sparsegpt"])
    p.add_argument("--search-reconstruct", nargs="*", default=["lsq", "obs"])
    p.add_argument(
        "--recon-baselines",
        nargs="*",
        default=["wanda", "ria", "sparsegpt"],
        help="baselines of the searches with reconstruction",
    )
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--max-eval-windows", type=int, default=None, help="default: all (a dry run)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--search", default="{}", help="JSON of SearchConfig overrides")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--tag", default="search_quality")
    return p.parse_args()


class Bench:
    """The model, data and the dense weights every configuration starts from."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.tok = load_tokenizer(args.model)
        self.model = load_model(args.model, dtype=args.dtype, device=args.device)
        self.dense = {
            k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()
        }
        self.calib = calibration_windows(
            args.calib, self.tok, n_samples=args.nsamples, seq_len=args.seqlen, seed=0
        )
        self.tokens = evaluation_tokens(args.eval, self.tok)
        self.rows: list[dict[str, Any]] = []

    def reset(self) -> None:
        self.model.load_state_dict(self.dense)

    def ppl(self) -> float:
        return perplexity(
            self.model,
            self.tokens,
            seq_len=self.args.eval_seqlen,
            batch_size=8,
            max_windows=self.args.max_eval_windows,
        )

    def zero_shot(self) -> float | None:
        if not self.args.zeroshot:
            return None
        scores = zero_shot_accuracy(
            self.model, self.tok, self.args.zeroshot, limit=self.args.zs_limit, batch_size=16
        )
        accs = [v["acc_norm"] if "acc_norm" in v else v["acc"] for v in scores.values()]
        return sum(accs) / len(accs)

    def add(self, setting: str, method: str, **fields: Any) -> None:
        row = {"setting": setting, "method": method} | fields
        self.rows.append(row)
        print(json.dumps(row), flush=True)


def sparsity_args(setting: str) -> tuple[float | None, str]:
    if ":" in setting:
        return None, setting
    return float(setting), "unstructured"


def run_fixed(
    b: Bench, setting: str, method: str, reconstruct: str | None = None, permute: bool = False
) -> None:
    sparsity, pattern = sparsity_args(setting)
    b.reset()
    res = prune(b.model, b.calib, method, sparsity, pattern, batch_size=b.args.batch_size,
                reconstruct=reconstruct, keep_masks=False, permute=permute)  # fmt: skip
    zs = b.zero_shot() if setting in b.args.zs_settings and method == "sparsegpt" else None
    b.add(setting, res.method + ("+perm" if permute else ""), ppl=b.ppl(),
          sparsity=res.overall_sparsity, prune_s=res.seconds, zero_shot=zs)  # fmt: skip


def run_search(
    b: Bench, setting: str, reconstruct: str | None, state: Path, permute: bool = False
) -> Any:
    sparsity, pattern = sparsity_args(setting)
    config = SearchConfig(**json.loads(b.args.search)).replace(
        reconstruct=reconstruct, permute=permute
    )
    if reconstruct:
        config = config.replace(baselines=b.args.recon_baselines)
    b.reset()
    if b.args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    found = optishear_search(
        b.model, b.calib, sparsity, pattern, config=config,
        batch_size=b.args.batch_size, state_path=state, progress=False,
    )  # fmt: skip
    search_s = time.perf_counter() - t0
    b.reset()
    ratios = None if ":" in setting else found.ratios
    res = prune(b.model, b.calib, found.metric, ratios, pattern, batch_size=b.args.batch_size,
                reconstruct=reconstruct, keep_masks=False, permute=permute)  # fmt: skip
    zs = b.zero_shot() if setting in b.args.zs_settings and reconstruct else None
    label = "optishear" + (f"+{reconstruct}" if reconstruct else "") + ("+perm" if permute else "")
    b.add(setting, label, ppl=b.ppl(), sparsity=res.overall_sparsity, search_s=search_s,
          chosen_by=found.chosen_by, metric=describe(found.metric),
          uniform=len(set(found.ratios)) == 1, timing=found.timing,
          finalists=found.finalists, zero_shot=zs)  # fmt: skip
    return found


def fidelity(b: Bench, setting: str, found: Any) -> None:
    """Perplexity of every finalist (pruned as the search pruned it) against its objective."""
    _, pattern = sparsity_args(setting)
    config = SearchConfig(**json.loads(b.args.search))
    stats = split_calibration(b.calib, config, b.args.batch_size).statistics
    values = []
    for f in found.finalists:
        b.reset()
        prune(b.model, stats, method_from_dict(f["method"]),
              None if ":" in setting else f["ratios"], pattern, batch_size=b.args.batch_size,
              reconstruct=found.reconstruct, keep_masks=False)  # fmt: skip
        values.append((f["objective"], f["validation"], b.ppl()))
    obj, val, ppl = zip(*values, strict=True)
    b.add(setting, "fidelity", finalist_ppl=list(ppl), objective=list(obj), validation=list(val),
          rho_objective=float(spearmanr(obj, ppl)[0]), rho_validation=float(spearmanr(val, ppl)[0]),
          reconstruct=found.reconstruct)  # fmt: skip


def render(report: dict[str, Any]) -> str:
    lines = [f"# Search quality: {report['model']}", "", f"- Machine: {report['machine']}",
             f"- Status: {report.get('status', 'complete')}",
             f"- Date: {report['date']}", f"- Command: `{report['command']}`", ""]  # fmt: skip
    rows = []
    for r in report["rows"]:
        if r["method"] == "fidelity":
            continue
        zs = f"{r['zero_shot']:.4f}" if r.get("zero_shot") is not None else ""
        search_s = f"{r['search_s']:.0f}" if "search_s" in r else ""
        rows.append(
            [r["setting"], r["method"], f"{r['ppl']:.2f}", f"{r['sparsity']:.4f}", zs, search_s,
             f"{r.get('chosen_by', '')} {r.get('metric', '')}"]
        )  # fmt: skip
    columns = ("setting", "method", "ppl", "sparsity", "zero-shot", "search s", "chosen by")
    lines += md_table(columns, rows, "llrrrrl")
    lines += ["", "## Objective fidelity (finalists)", ""]
    for r in report["rows"]:
        if r["method"] == "fidelity":
            lines.append(
                f"- {r['setting']} (reconstruct {r['reconstruct']}): Spearman rho objective vs "
                f"WikiText-2 ppl {r['rho_objective']:.3f}, validation vs ppl "
                f"{r['rho_validation']:.3f}; finalist ppl "
                f"{[round(p, 2) for p in r['finalist_ppl']]}"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    b = Bench(args)
    machine = f"{cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    if args.device.startswith("cuda"):
        machine = f"{torch.cuda.get_device_name()}; {machine}"
    report = {"model": args.model, "machine": machine, "rows": b.rows,
              "date": utc_now(),
              "command": "python benchmarks/bench_search_quality.py " + " ".join(
                  f"{k}={v}" for k, v in vars(args).items()),
              "versions": {"torch": torch.__version__}}  # fmt: skip
    b.reset()
    b.add("dense", "dense", ppl=b.ppl(), sparsity=0.0, zero_shot=b.zero_shot())

    def save() -> None:
        write_json(out / f"{args.tag}.json", report, end="")
        write_text_atomic(out / f"{args.tag}.md", render(report))

    for setting in args.settings:
        parse_pattern(setting if ":" in setting else "unstructured")
        nm = ":" in setting
        for method in args.fixed:
            run_fixed(b, setting, method)
        for method in args.permute_methods if nm else []:
            run_fixed(b, setting, method, permute=True)
        for recon in args.reconstruct:
            for method in args.recon_methods:
                run_fixed(b, setting, method, recon)
        save()
        if args.skip_search:
            continue
        state = out / f"{args.tag}_state_{setting.replace(':', 'of')}.json"
        state.unlink(missing_ok=True)
        found = run_search(b, setting, None, state)
        save()
        if nm and args.search_permute:
            run_search(b, setting, None, state, permute=True)
            save()
        for recon in args.search_reconstruct:
            run_search(b, setting, recon, state)
            save()
        if setting in args.fidelity:  # last: the targets above matter more if time runs out
            fidelity(b, setting, found)
        state.unlink(missing_ok=True)
    save()


if __name__ == "__main__":
    main()
