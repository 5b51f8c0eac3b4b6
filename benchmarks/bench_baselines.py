#!/usr/bin/env python3
"""Baseline pruning benchmark: magnitude / Wanda / RIA / SparseGPT on one model.

For every configuration (dense, then each method at each sparsity layout) the script starts
from a freshly loaded model, prunes it with :func:`optishear_lightning.pruning.prune` on
calibration windows drawn from C4 train (Wanda's ``get_c4`` sampling, seed 0), and measures
WikiText-2 test perplexity with :func:`optishear_lightning.evaluation.perplexity` (the
Wanda/SparseGPT protocol: non-overlapping windows, token NLL averaged over all of them).
It also records the wall time and the peak memory of each prune.

Results are written after every configuration, to a JSON file (raw numbers) and a Markdown
report (machine, versions, exact command line, protocol, table), so an interrupted run keeps
what it finished; ``--resume`` skips the configurations already in the JSON file.

How each configuration gets a fresh model (``--fresh``):

* ``subprocess`` (default on CPU): each configuration runs in its own Python process that
  calls ``load_model`` again. The process peak RSS (``ru_maxrss``) is then that configuration's
  own, which is the only honest way to report peak RSS on the CPU.
* ``reload``: ``load_model`` again in this process.
* ``restore`` (default on CUDA): load once and copy the original weights back (from a CPU copy
  taken right after loading) before each configuration. Same weights as a reload, without
  de-quantising the GGUF file again for every configuration.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` reset right before the prune (the
model's own weights, which live on the GPU, are included). On the CPU, the peak resident set
size sampled every 5 ms during the prune (includes the loaded model), plus the process
``ru_maxrss`` in the JSON file.

Example (the CPU reduced protocol of ``benchmarks/results/baselines_cpu.md``)::

    python benchmarks/bench_baselines.py --nsamples 32 --seqlen 512 --eval-seqlen 512 \\
        --eval-windows 64 --configs 0.5 2:4 --out benchmarks/results/baselines_cpu.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from harness import (
    REPO_ROOT,
    MiB,
    RssSampler,
    command_line,
    current_rss,
    describe_environment,
    log,
    md_table,
    ru_maxrss,
    script_command,
    src_digest,
    sync,
    use_source_tree,
    utc_now,
    write_json,
    write_text_atomic,
)

DEFAULT_CALIB = (
    REPO_ROOT / ".." / "shared" / "data" / "c4" / "c4-train.00000-of-01024.head1041.jsonl"
)
DEFAULT_EVAL = REPO_ROOT / ".." / "shared" / "data" / "wikitext2" / "wiki.test.raw"
ALL_METHODS = ("magnitude", "wanda", "ria", "sparsegpt")
ALL_CONFIGS = ("0.5", "2:4", "4:8", "0.6", "0.7")
RUN_KEYS = ("key", "config", "method", "pattern", "sparsity")

# Let `python benchmarks/bench_baselines.py` work from a source checkout that is not installed.
use_source_tree()


# --------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------


def parse_config(text: str) -> dict[str, Any]:
    """``"dense"``, ``"0.5"`` (unstructured 50%), ``"unstructured:0.5"`` or ``"2:4"``."""
    t = text.strip().lower()
    if t == "dense":
        return {"config": "dense", "pattern": "dense", "sparsity": 0.0}
    t = t.removeprefix("unstructured").lstrip(":-_ ")
    m = re.fullmatch(r"(\d+)\s*:\s*(\d+)", t)
    if m:
        n, mm = int(m.group(1)), int(m.group(2))
        if not 1 <= n < mm:
            raise argparse.ArgumentTypeError(f"bad N:M pattern {text!r}")
        return {"config": f"{n}:{mm}", "pattern": f"{n}:{mm}", "sparsity": (mm - n) / mm}
    try:
        s = float(t.rstrip("%")) / (100 if t.endswith("%") else 1)
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"unknown configuration {text!r}: use dense, a sparsity such as 0.5, or N:M such as 2:4"
        ) from err
    if not 0 < s < 1:
        raise argparse.ArgumentTypeError(f"sparsity must be in (0, 1), got {text!r}")
    return {"config": f"unstructured {s:g}", "pattern": "unstructured", "sparsity": s}


def build_runs(args: argparse.Namespace) -> list[dict[str, Any]]:
    runs = []
    if args.dense:
        runs.append({**parse_config("dense"), "method": "dense"})
    for cfg in args.configs:
        c = parse_config(cfg)
        if c["pattern"] == "dense":
            continue
        for method in args.methods:
            runs.append({**c, "method": method})
    for r in runs:
        r["key"] = f"{r['config']}|{r['method']}"
    return runs


# --------------------------------------------------------------------------------------------
# One configuration
# --------------------------------------------------------------------------------------------


def run_config(
    run: dict[str, Any], model: Any, calib: Any, tokens: Any, opts: dict[str, Any]
) -> dict[str, Any]:
    """Prune ``model`` (already fresh) as ``run`` says and measure perplexity."""
    import torch

    from optishear_lightning.evaluation import perplexity
    from optishear_lightning.pruning import prune

    device = opts["device"]
    out: dict[str, Any] = {k: run[k] for k in RUN_KEYS}
    out["rss_before_prune_bytes"] = current_rss()
    out["ru_maxrss_before_prune_bytes"] = ru_maxrss()
    if run["method"] != "dense":
        nm = run["pattern"] != "unstructured"
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with RssSampler() as sampler:
            started = time.perf_counter()
            result = prune(
                model,
                calib,
                run["method"],
                None if nm else run["sparsity"],
                run["pattern"] if nm else "unstructured",
                device=device,
                batch_size=opts["batch_size"],
                keep_masks=False,
            )
            sync(device)
            out["prune_s"] = time.perf_counter() - started
        out["prune_s_engine"] = result.seconds
        out["overall_sparsity"] = result.overall_sparsity
        out["engine_peak_memory"] = dict(result.peak_memory)
        out["rss_peak_during_prune_bytes"] = sampler.peak
        out["ru_maxrss_after_prune_bytes"] = ru_maxrss()
        if device.startswith("cuda"):
            out["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
            out["cuda_peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
        log(
            f"{run['key']}: pruned in {out['prune_s']:.1f}s, sparsity {result.overall_sparsity:.4f}"
        )
    started = time.perf_counter()
    ppl = perplexity(
        model,
        tokens,
        seq_len=opts["eval_seqlen"],
        batch_size=opts["eval_batch_size"],
        max_windows=opts["eval_windows"],
    )
    sync(device)
    out["eval_s"] = time.perf_counter() - started
    out["ppl"] = ppl
    log(f"{run['key']}: perplexity {ppl:.3f} ({out['eval_s']:.1f}s)")
    return out


def _load(opts: dict[str, Any]) -> tuple[Any, float]:
    from optishear_lightning.models import load_model

    started = time.perf_counter()
    model = load_model(opts["model"], dtype=opts["dtype"], device=opts["device"])
    sync(opts["device"])
    return model, time.perf_counter() - started


def model_info(model: Any) -> dict[str, int]:
    from optishear_lightning.models import find_decoder_blocks, find_prunable_linears

    _, blocks = find_decoder_blocks(model)
    return {
        "n_blocks": len(blocks),
        "n_prunable": sum(
            lin.weight.numel() for b in blocks for lin in find_prunable_linears(b).values()
        ),
        # Tied embeddings / LM head are one tensor: count each parameter once.
        "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
    }


def _safe_run(run, make_model, calib, tokens, opts) -> dict[str, Any]:
    try:
        model, load_s = make_model()
        res = run_config(run, model, calib, tokens, opts)
        res["model_load_s"] = load_s
        return res
    except Exception as err:  # record and go on with the next configuration
        log(f"{run['key']}: FAILED: {err!r}")
        return {
            **{k: run[k] for k in RUN_KEYS},
            "error": f"{type(err).__name__}: {err}",
            "traceback": traceback.format_exc(),
        }


def worker_main(spec_path: str, result_path: str) -> int:
    """Entry point of one configuration in a fresh process (``--fresh subprocess``)."""
    import torch

    spec = json.loads(Path(spec_path).read_text())
    opts, run = spec["opts"], spec["run"]
    data = torch.load(spec["data_path"])
    info: dict[str, Any] = {}

    def make_model():
        model, load_s = _load(opts)
        info.update(model_info(model))
        return model, load_s

    res = _safe_run(run, make_model, data["calib"], data["tokens"], opts)
    res["model_info"] = info
    res["ru_maxrss_process_bytes"] = ru_maxrss()
    res["src_digest"] = src_digest()
    Path(result_path).write_text(json.dumps(res))
    return 0


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------


def _mib(value: Any) -> str:
    return "–" if value is None else f"{value / MiB:,.0f} MiB"


def _fmt_ppl(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if value < 1e3:
        return f"{value:.2f}"
    return f"{value:,.1f}" if value < 1e6 else f"{value:.4g}"


def peak_memory_cell(res: dict[str, Any], device: str) -> str:
    if res.get("method") == "dense" or "error" in res:
        return "–"
    if device.startswith("cuda"):
        return _mib(res.get("cuda_peak_allocated_bytes"))
    return _mib(res.get("rss_peak_during_prune_bytes"))


def render_markdown(report: dict[str, Any]) -> str:
    """The Markdown report of a (finished, running or stopped) run."""
    lines = [
        *_header_lines(report),
        "",
        "## Protocol",
        "",
        *[f"- {item}" for item in report["protocol"]["text"]],
        "",
        "## Results",
        "",
        *_results_lines(report),
        "",
        _memory_note(report["options"]),
        "",
        "### Details",
        "",
        *_details_lines(report),
        "",
    ]
    failed = [r for r in report["results"] if "error" in r]
    if failed:
        lines += ["### Failures", ""]
        for r in failed:
            lines += [f"- {r['key']}: `{r['error']}`"]
        lines.append("")
    return "\n".join(lines)


def _machine_text(env: dict[str, Any]) -> str:
    gpu = env.get("gpu")
    machine = f"{env['cpu']}, {env['cpu_cores']} CPU cores"
    if env.get("cpu_affinity") and env["cpu_affinity"] != env["cpu_cores"]:
        machine += f" ({env['cpu_affinity']} usable)"
    machine += f", torch threads {env['torch_threads']}"
    if env.get("ram_bytes"):
        machine += f", {env['ram_bytes'] / 2**30:.0f} GiB RAM"
    if gpu:
        machine += (
            f"; GPU: {gpu['name']} ({gpu['memory_bytes'] / 2**30:.0f} GiB, CUDA {gpu['cuda']})"
        )
    else:
        machine += "; no GPU"
    return machine


def _header_lines(report: dict[str, Any]) -> list[str]:
    """Title, date, status, machine, versions, command and notes."""
    env, opts = report["environment"], report["options"]
    lines = [f"# Baselines: {opts['model_id']} — magnitude / Wanda / RIA / SparseGPT", ""]
    lines += [
        f"- Date: {env['date_utc']}"
        + (f" (last update {report['updated_utc']})" if report.get("updated_utc") else ""),
        f"- Status: {report['status']}",
    ]
    if report.get("resumed_from"):
        rf = report["resumed_from"]
        lines.append(
            f"- Resumed: {rf['n_results']} configuration(s) come from an earlier run of the same "
            f"protocol started {rf['date_utc']} (`--resume`)"
        )
    lines.append(f"- Machine: {_machine_text(env)}")
    v = env["versions"]
    lines.append(
        f"- Versions: python {v['python']}, torch {v['torch']}, transformers {v['transformers']}, "
        f"optishear_lightning {v['optishear_lightning']}, gguf {v['gguf']}, "
        f"torchmetrics {v['torchmetrics']}"
        + (f"; git HEAD at start {env['git_revision']}" if env.get("git_revision") else "")
        + (f"; engine source digest {env['src_digest']}" if env.get("src_digest") else "")
    )
    digests = {r["src_digest"] for r in report["results"] if r.get("src_digest")}
    if len(digests) > 1:
        lines.append(
            "- Warning: the engine's source files changed while this benchmark ran (other "
            f"engineers were editing them); rows ran with digests {', '.join(sorted(digests))} "
            "(per row in the JSON file)."
        )
    lines += ["- Command:", "", "  ```", f"  {report['command']}", "  ```", ""]
    for note in opts.get("notes") or []:
        lines.append(f"- Note: {note}")
    return lines


def _results_lines(report: dict[str, Any]) -> list[str]:
    """The main table: perplexity, prune time and peak memory per configuration."""
    device = report["options"]["device"]
    results = {r["key"]: r for r in report["results"]}
    rows = []
    for run in report["runs"]:
        res = results.get(run["key"])
        if res is None:
            rows.append([run["config"], run["method"], "not run", "–", "–"])
        elif "error" in res:
            rows.append([run["config"], run["method"], f"failed: {res['error'][:80]}", "–", "–"])
        else:
            prune_s = "–" if res.get("prune_s") is None else f"{res['prune_s']:.1f}"
            ppl = _fmt_ppl(res.get("ppl"))
            rows.append([run["config"], run["method"], ppl, prune_s, peak_memory_cell(res, device)])
    columns = ("config", "method", "ppl", "prune time s", "peak memory")
    return md_table(columns, rows, "llrrr")


def _memory_note(opts: dict[str, Any]) -> str:
    """What the peak memory column measured, on this device."""
    if opts["device"].startswith("cuda"):
        return (
            "Peak memory: `torch.cuda.max_memory_allocated` over the prune, reset right before "
            "it; the model's weights live on the GPU and are included "
            f"({_mib(opts.get('weights_bytes'))} of parameters)."
        )
    return (
        "Peak memory: peak resident set size of the process, sampled every 5 ms during the "
        "prune; it includes the loaded model "
        f"({_mib(opts.get('weights_bytes'))} of parameters) and the Python/torch runtime. "
        + (
            "Each configuration ran in its own process (`--fresh subprocess`)."
            if opts["fresh"] == "subprocess"
            else "All configurations ran in one process, so freed memory kept by the "
            "allocator can inflate later rows."
        )
    )


def _details_lines(report: dict[str, Any]) -> list[str]:
    """Achieved sparsity, change against dense, times and the other memory readings."""
    results = {r["key"]: r for r in report["results"]}
    dense = results.get("dense|dense", {}).get("ppl")
    rows = []
    for run in report["runs"]:
        res = results.get(run["key"])
        if res is None or "error" in res:
            continue
        sp = res.get("overall_sparsity")
        delta = (
            "–"
            if dense is None or res["method"] == "dense" or res.get("ppl") is None
            else f"{res['ppl'] - dense:+.2f}"
        )
        maxrss = res.get("ru_maxrss_process_bytes", res.get("ru_maxrss_after_prune_bytes"))
        rows.append(
            [
                run["config"],
                run["method"],
                "–" if sp is None else f"{sp:.4f}",
                delta,
                f"{res['eval_s']:.1f}",
                f"{res.get('model_load_s', float('nan')):.1f}",
                _mib(res.get("rss_before_prune_bytes")),
                _mib(maxrss),
                _mib(res.get("cuda_peak_reserved_bytes")),
            ]
        )
    columns = (
        "config",
        "method",
        "achieved sparsity",
        "Δ ppl vs dense",
        "eval s",
        "model load s",
        "RSS before prune",
        "ru_maxrss (process)",
        "CUDA peak reserved",
    )
    return md_table(columns, rows, "llrrrrrrr")


def protocol_text(opts: dict[str, Any], n_eval_tokens: int) -> list[str]:
    total_windows = n_eval_tokens // opts["eval_seqlen"]
    used = (
        total_windows if opts["eval_windows"] is None else min(total_windows, opts["eval_windows"])
    )
    if used == total_windows:
        eval_desc = (
            f"all {total_windows} non-overlapping windows of {opts['eval_seqlen']} tokens "
            f"(full test set: {n_eval_tokens:,} tokens; the last "
            f"{n_eval_tokens - used * opts['eval_seqlen']} are dropped, as in the papers)"
        )
    else:
        eval_desc = (
            f"only the FIRST {used} of the {total_windows} non-overlapping windows of "
            f"{opts['eval_seqlen']} tokens ({used * opts['eval_seqlen']:,} of {n_eval_tokens:,} "
            "tokens) — a reduced protocol, NOT the full test set, so the numbers are not "
            "directly comparable with published ones"
        )
    std = (
        opts["nsamples"] == 128
        and opts["seqlen"] == 2048
        and opts["eval_seqlen"] == 2048
        and used == total_windows
    )
    return [
        f"Model: `{opts['model']}` (id `{opts['model_id']}`), loaded with `load_model` in "
        f"{opts['dtype']} on {opts['device']}"
        + (
            f" — the GGUF checkpoint `{opts['gguf_file']}` de-quantised on load"
            if opts.get("gguf_file")
            else ""
        )
        + f"; {opts.get('n_blocks', '?')} decoder blocks, "
        f"{opts.get('n_prunable', 0):,} prunable linear weights "
        "(embeddings and LM head are never pruned).",
        f"Calibration: {opts['nsamples']} windows of {opts['seqlen']} tokens drawn from "
        f"`{opts['calib_display']}` with `calibration_windows(..., seed=0)` (Wanda/SparseGPT "
        "`get_c4` sampling); one set shared by every method; batch size "
        f"{opts['batch_size']}. Magnitude ignores it.",
        f"Evaluation: WikiText-2 test (`{opts['eval_display']}`) tokenised once with "
        f"`evaluation_tokens`; perplexity with `perplexity(seq_len={opts['eval_seqlen']}, "
        f"max_windows={opts['eval_windows']})` over {eval_desc}; eval batch size "
        f"{opts['eval_batch_size']}.",
        "Pruning: `prune(model, calib, method, sparsity, pattern, device=..., batch_size=...)`, "
        "sequential block by block (each block's inputs come from the already-pruned previous "
        "blocks), every `nn.Linear` of every decoder block; unstructured = per-output-row "
        "comparison group (Wanda's); N:M along the input dimension; SparseGPT with 128-column "
        "blocks and 1% dampening.",
        "Fresh model for every configuration: "
        + {
            "subprocess": "a new Python process that calls `load_model` again.",
            "reload": "`load_model` again in the same process.",
            "restore": "loaded once; the original weights are copied back from a CPU copy "
            "before every configuration (checked tensor by tensor to equal the loaded weights).",
        }[opts["fresh"]],
        "Prune time: wall time of the `prune` call (calibration forward passes included; model "
        "loading and tokenisation excluded).",
        "This is the literature's standard protocol (128 × 2048 C4 calibration, full WikiText-2 "
        "test at 2048)."
        if std
        else "This is NOT the literature's standard protocol (128 × 2048 C4 calibration, full "
        "WikiText-2 test at 2048): see the numbers above.",
    ]


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_protocol_options(p)
    _add_run_options(p)
    args = p.parse_args(argv)
    if args._worker:
        return args
    for c in args.configs:
        try:
            parse_config(c)
        except argparse.ArgumentTypeError as err:
            p.error(str(err))
    if args.out is None and args.json is None:
        p.error("give --out and/or --json")
    if args.json is None:
        args.json = str(Path(args.out).with_suffix(".json"))
    if args.eval_windows is not None and args.eval_windows < 1:
        p.error("--eval-windows must be >= 1")
    return args


def _add_protocol_options(p: argparse.ArgumentParser) -> None:
    """Model, data, calibration and evaluation: what the numbers mean."""
    p.add_argument(
        "--model", default="smollm2-135m", help="built-in name, GGUF file, directory or hub id"
    )
    p.add_argument("--dtype", default="float32")
    p.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1... (default: cuda if available)"
    )
    p.add_argument(
        "--calib",
        default=str(DEFAULT_CALIB),
        help="calibration source: path or name (c4, wikitext2...)",
    )
    p.add_argument(
        "--eval",
        default=str(DEFAULT_EVAL),
        help="WikiText-2 test: path (wiki.test.raw) or 'wikitext2'",
    )
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=2048, help="calibration window length")
    p.add_argument("--eval-seqlen", type=int, default=2048, help="evaluation window length")
    p.add_argument(
        "--eval-windows",
        type=int,
        default=None,
        help="evaluate only the first N windows (None: all of them)",
    )
    p.add_argument(
        "--eval-batch-size", type=int, default=1, help="windows per forward pass in perplexity"
    )
    p.add_argument(
        "--batch-size", type=int, default=8, help="calibration sequences per forward pass in prune"
    )
    p.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=ALL_METHODS)
    p.add_argument(
        "--configs",
        nargs="+",
        default=list(ALL_CONFIGS),
        help="sparsity layouts: a ratio (unstructured, e.g. 0.5) or N:M (e.g. 2:4)",
    )
    p.add_argument("--no-dense", dest="dense", action="store_false", help="skip the dense baseline")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """Fresh models, output files, resuming, the time budget."""
    p.add_argument(
        "--fresh",
        choices=("auto", "subprocess", "reload", "restore"),
        default="auto",
        help="how each configuration gets a fresh model (auto: subprocess on CPU, restore on CUDA)",
    )
    p.add_argument(
        "--out", default=None, help="Markdown report (default: next to --json, or stdout only)"
    )
    p.add_argument(
        "--json",
        default=None,
        help="raw results, rewritten after every configuration (default: --out with .json)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="skip configurations already in --json (same protocol)",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds: start no configuration after this much time (plus the longest one so far)",
    )
    p.add_argument(
        "--note", action="append", default=[], help="free-text note for the report (repeatable)"
    )
    p.add_argument(
        "--render-only",
        action="store_true",
        help="only rewrite --out from --json (e.g. after a run was stopped), running nothing",
    )
    p.add_argument("--_worker", nargs=2, metavar=("SPEC", "RESULT"), help=argparse.SUPPRESS)


def _display_path(value: str) -> str:
    path = Path(value)
    if not path.exists():
        return value
    with contextlib.suppress(ValueError):
        return os.path.relpath(path.resolve(), REPO_ROOT.resolve())
    return value


def render_only(json_path: Path, md_path: Path | None) -> int:
    """Rewrite the Markdown report from the JSON file of a finished or stopped run."""
    report = json.loads(json_path.read_text())
    done = {r["key"] for r in report["results"]}
    missing = [r["key"] for r in report["runs"] if r["key"] not in done]
    if report.get("status") == "running":
        report["status"] = (
            "complete"
            if not missing
            else f"stopped: {len(missing)} configuration(s) not run ({', '.join(missing)})"
        )
        write_json(json_path, report, indent=2, end="")
    text = render_markdown(report)
    if md_path is not None:
        write_text_atomic(md_path, text)
    print(text)
    return 0


#: Options that must match for ``--resume`` to reuse a JSON file's results.
PROTOCOL_KEYS = ("model_id", "dtype", "device", "nsamples", "seqlen", "eval_seqlen", "eval_windows")


def _device_and_fresh(args: argparse.Namespace) -> tuple[str, str]:
    """The device (``--device`` or cuda when available) and how models are made fresh."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.fresh != "auto":
        return device, args.fresh
    return device, "restore" if device.startswith("cuda") else "subprocess"


def load_data(args: argparse.Namespace, source: Any) -> tuple[Any, Any]:
    """Calibration windows and evaluation tokens, computed once for every configuration."""
    from optishear_lightning.data import calibration_windows, evaluation_tokens
    from optishear_lightning.models import load_tokenizer

    tokenizer = load_tokenizer(source)
    t0 = time.perf_counter()
    tokens = evaluation_tokens(args.eval, tokenizer)
    calib = calibration_windows(args.calib, tokenizer, args.nsamples, args.seqlen, seed=0)
    took = time.perf_counter() - t0
    log(f"tokens: eval {tokens.numel():,}, calibration {tuple(calib.shape)} ({took:.1f}s)")
    return calib, tokens


def build_opts(args: argparse.Namespace, source: Any, device: str, fresh: str) -> dict[str, Any]:
    """The run's options, as the JSON file records them (and the workers receive them)."""
    return {
        "model": args.model,
        "model_id": source.model_id,
        "gguf_file": source.gguf_file,
        "dtype": args.dtype,
        "device": device,
        "calib": args.calib,
        "eval": args.eval,
        "calib_display": _display_path(args.calib),
        "eval_display": _display_path(args.eval),
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "eval_seqlen": args.eval_seqlen,
        "eval_windows": args.eval_windows,
        "eval_batch_size": args.eval_batch_size,
        "batch_size": args.batch_size,
        "fresh": fresh,
        "notes": args.note,
    }


def load_previous(
    args: argparse.Namespace, json_path: Path, opts: dict[str, Any]
) -> tuple[list[dict[str, Any]], str | None]:
    """``--resume``: the successful results of ``json_path`` and when that run started."""
    if not (args.resume and json_path.is_file()):
        return [], None
    old = json.loads(json_path.read_text())
    mismatch = [k for k in PROTOCOL_KEYS if old.get("options", {}).get(k) != opts[k]]
    if mismatch:
        raise SystemExit(f"--resume: {json_path} was made with a different {', '.join(mismatch)}")
    previous = [r for r in old.get("results", []) if "error" not in r]
    for k in ("n_blocks", "n_prunable", "weights_bytes"):
        if k in old.get("options", {}):
            opts.setdefault(k, old["options"][k])
    log(f"resuming: {len(previous)} configurations already done in {json_path}")
    return previous, old.get("environment", {}).get("date_utc")


def model_factory(opts: dict[str, Any]) -> Any:
    """``make_model()`` for ``--fresh reload`` / ``restore``: loads the model once now."""
    model, first_load_s = _load(opts)
    opts.update(model_info(model))
    if opts["fresh"] == "restore":
        return _restorer(model, first_load_s, opts["device"])
    return _reloader(model, first_load_s, opts)


def _restorer(model: Any, first_load_s: float, device: str) -> Any:
    """Copy the loaded weights back (from a CPU copy) before every configuration but the first."""
    import torch

    original = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    loads = [first_load_s]

    def make_model():
        with torch.no_grad():
            if not loads:
                t = time.perf_counter()
                model.load_state_dict(original)
                sync(device)
                loads.append(time.perf_counter() - t)
            same = all(
                torch.equal(v.detach().cpu(), original[k]) for k, v in model.state_dict().items()
            )
        if not same:
            raise RuntimeError("restoring the original weights failed (they differ)")
        return model, loads.pop()

    return make_model


def _reloader(model: Any, first_load_s: float, opts: dict[str, Any]) -> Any:
    """``load_model`` again before every configuration but the first."""
    import torch

    loads = [first_load_s]

    def make_model():
        nonlocal model
        if loads:
            return model, loads.pop()
        model = None
        if opts["device"].startswith("cuda"):
            torch.cuda.empty_cache()
        model, s = _load(opts)
        return model, s

    return make_model


class Driver:
    """Runs the configurations in order, saving the report after each one."""

    def __init__(self, args, opts, runs, report, n_tokens, started_all):
        self.args, self.opts, self.runs, self.report = args, opts, runs, report
        self.n_tokens, self.started_all = n_tokens, started_all
        self.json_path = Path(args.json)
        self.md_path = Path(args.out) if args.out else None

    def save(self, status: str) -> None:
        report = self.report
        report["status"] = status
        report["protocol"]["text"] = protocol_text(self.opts, self.n_tokens)
        report["updated_utc"] = utc_now()
        write_json(self.json_path, report, indent=2, end="")
        if self.md_path is not None:
            write_text_atomic(self.md_path, render_markdown(report))

    def run_all(self, make_model: Any, calib: Any, tokens: Any) -> bool:
        """Every configuration not done yet; ``True`` when the time budget stopped it early."""
        import torch

        done = {r["key"] for r in self.report["results"]}
        longest = 0.0
        tmpdir = data_path = None
        if self.opts["fresh"] == "subprocess":
            tmpdir = tempfile.TemporaryDirectory(prefix="bench_baselines_")
            data_path = os.path.join(tmpdir.name, "data.pt")
            torch.save({"calib": calib, "tokens": tokens}, data_path)
        try:
            for i, run in enumerate(self.runs):
                if run["key"] in done:
                    continue
                elapsed = time.perf_counter() - self.started_all
                budget = self.args.time_budget
                if budget is not None and elapsed + longest > budget:
                    log(f"time budget reached after {elapsed:.0f}s: stopping before {run['key']}")
                    return True
                log(f"[{i + 1}/{len(self.runs)}] {run['key']}")
                t = time.perf_counter()
                if tmpdir is not None:
                    res = self.run_in_subprocess(i, run, tmpdir.name, data_path)
                else:
                    res = _safe_run(run, make_model, calib, tokens, self.opts)
                res["wall_s"] = time.perf_counter() - t
                longest = max(longest, res["wall_s"])
                self.add_result(run, res)
        finally:
            if tmpdir is not None:
                tmpdir.cleanup()
        return False

    def run_in_subprocess(self, i: int, run: dict, tmp: str, data_path: str) -> dict[str, Any]:
        """One configuration in a fresh Python process (``--fresh subprocess``)."""
        spec = os.path.join(tmp, f"spec{i}.json")
        result = os.path.join(tmp, f"result{i}.json")
        Path(spec).write_text(json.dumps({"opts": self.opts, "run": run, "data_path": data_path}))
        proc = subprocess.run(script_command(__file__, "--_worker", spec, result))
        if proc.returncode != 0 or not os.path.exists(result):
            return {
                **{k: run[k] for k in RUN_KEYS},
                "error": f"worker process exited with code {proc.returncode}",
            }
        res = json.loads(Path(result).read_text())
        for k, v in res.pop("model_info", {}).items():
            self.opts.setdefault(k, v)
        return res

    def add_result(self, run: dict[str, Any], res: dict[str, Any]) -> None:
        report, keys = self.report, [x["key"] for x in self.runs]
        report["results"] = [r for r in report["results"] if r["key"] != run["key"]] + [res]
        report["results"].sort(key=lambda r: keys.index(r["key"]))
        self.save("running")

    def finish(self, stopped_early: bool) -> None:
        """The final status, saved; the report on stdout."""
        done = {x["key"] for x in self.report["results"]}
        missing = [r["key"] for r in self.runs if r["key"] not in done]
        status = (
            "complete"
            if not missing
            else (
                f"incomplete: {len(missing)} configuration(s) not run"
                + (" (time budget)" if stopped_early else "")
            )
        )
        if any("error" in r for r in self.report["results"]):
            status += "; some configurations failed (see Failures)"
        self.save(status)
        log(f"done in {time.perf_counter() - self.started_all:.0f}s: {status}")
        if self.md_path is not None:
            print(render_markdown(self.report))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._worker:
        return worker_main(*args._worker)
    if args.render_only:
        return render_only(Path(args.json), Path(args.out) if args.out else None)

    from optishear_lightning.models import resolve_model_source

    device, fresh = _device_and_fresh(args)
    source = resolve_model_source(args.model)
    runs = build_runs(args)
    command = command_line(argv)
    log(f"{len(runs)} configurations: {', '.join(r['key'] for r in runs)}")
    started_all = time.perf_counter()
    calib, tokens = load_data(args, source)
    opts = build_opts(args, source, device, fresh)
    previous, resumed_from = load_previous(args, Path(args.json), opts)
    make_model = model_factory(opts) if fresh in ("reload", "restore") else None
    report: dict[str, Any] = {
        "environment": describe_environment(device),
        "command": command,
        "options": opts,
        "protocol": {"n_eval_tokens": tokens.numel()},
        "runs": runs,
        "results": list(previous),
        "status": "running",
    }
    if previous:
        report["resumed_from"] = {"date_utc": resumed_from, "n_results": len(previous)}
    driver = Driver(args, opts, runs, report, tokens.numel(), started_all)
    driver.save("running")
    stopped_early = driver.run_all(make_model, calib, tokens)
    driver.finish(stopped_early)
    return 0


if __name__ == "__main__":
    sys.exit(main())
