"""2:4 semi-structured sparse vs dense matmuls on LLaMA-3-8B shapes (bfloat16), and prefill.

1. Each projection of a LLaMA-3-8B block (q/o 4096x4096, k/v 1024x4096, gate/up 14336x4096,
   down 4096x14336), 2:4-pruned by magnitude (random weights): ``F.linear`` time dense (with
   zeros) vs semi-structured sparse at 2048, 8192 and 16384 tokens, per backend, with the
   sums over the MLP (gate/up/down) and the attention projections (q/k/v/o), and the output
   difference (norm-wise, bfloat16 tolerance).
2. End-to-end prefill of a randomly initialised LLaMA-3-8B-shaped ``LlamaForCausalLM``
   (bfloat16, built on the GPU), pruned 2:4 by magnitude with the engine (``prune``), then
   exported with :func:`~optishear_lightning.kernels.export_semi_structured` (which checks
   every layer and the logits against the dense model): dense vs sparse forward time.

CUDA events, warm-up, median of ``--repeats``. Needs a GPU with sparse tensor cores
(compute capability 8.0+); PyTorch's CUTLASS kernels run on 8.x only, so on Hopper the
``cutlass`` backend is reported as an error and cuSPARSELt is measured.

    PYTHONPATH=$PWD/src python benchmarks/bench_semi_structured.py \\
        --out benchmarks/results/semi_structured_h200
    PYTHONPATH=$PWD/src python benchmarks/bench_semi_structured.py --tiny --out /tmp/ss
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import (
    Timer,
    command_line,
    cuda_peak_bytes,
    md_row,
    md_table,
    optional_version,
    utc_now,
    write_report,
)
from llama3_8b import LLAMA3_8B, SHAPES_8B

from optishear_lightning.dispatch import triton_prune
from optishear_lightning.export import _restore as restore_dense_linears
from optishear_lightning.export import export_semi_structured
from optishear_lightning.kernels import (
    FusedScore,
    check_semi_structured_support,
    compare_outputs,
    resolve_backend,
)
from optishear_lightning.masks import keep_mask_from_scores
from optishear_lightning.models import named_prunable_linears

SHAPES_TINY = {
    "q_proj": (256, 256),
    "k_proj": (64, 256),
    "v_proj": (64, 256),
    "o_proj": (256, 256),
    "gate_proj": (512, 256),
    "up_proj": (512, 256),
    "down_proj": (256, 512),
}
GROUPS = {
    "attention (q+k+v+o)": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "MLP (gate+up+down)": ("gate_proj", "up_proj", "down_proj"),
}
LLAMA_TINY = dict(
    LLAMA3_8B,
    vocab_size=1024,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="path prefix: writes <out>.json and <out>.md")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="small shapes and model (quick check)")
    p.add_argument("--tokens", type=int, nargs="+", default=None, help="default 2048 8192 16384")
    p.add_argument("--backends", nargs="+", default=["cusparselt_cached", "cusparselt", "cutlass"])
    p.add_argument(
        "--prefill-backends",
        nargs="+",
        default=["cusparselt_cached", "cusparselt"],
        help="backends of the prefill comparison, each on the same pruned model",
    )
    p.add_argument("--prefill-tokens", type=int, default=None, help="default 2048")
    p.add_argument("--layers", type=int, default=None, help="decoder blocks of the model")
    p.add_argument("--no-prefill", action="store_true")
    p.add_argument("--repeats", type=int, default=10)
    return p.parse_args()


def environment(device: torch.device) -> dict:
    env = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": utc_now(),
        "command": command_line(prefix="", quote=False),
        "device": "cpu",
        "triton": optional_version("triton"),
        "transformers": optional_version("transformers"),
    }
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        cusparselt = getattr(torch.backends, "cusparselt", None)
        env["cusparselt"] = (
            cusparselt.version() if cusparselt and cusparselt.is_available() else None
        )
    return env


def median_time(fn, repeats: int, warmup: int = 3) -> float:
    """Median seconds of ``fn()`` on the GPU (CUDA events) after ``warmup`` untimed calls."""
    return Timer("cuda").median(fn, repeats, warmup)["median_s"]


def two_four_weight(rows: int, cols: int, device, seed: int) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    w = (torch.randn(rows, cols, device=device, generator=gen) * 0.02).to(torch.bfloat16)
    if device.type == "cuda":
        triton_prune(w, FusedScore(), None, "2:4")  # magnitude 2:4, the engine's kernel
    else:
        w.mul_(keep_mask_from_scores(w.float().abs(), None, "2:4"))
    return w


def sparse_forward(w: torch.Tensor, backend: str):
    """``x -> x @ w.T`` on the backend's 2:4 kernels (what export_semi_structured installs)."""
    if backend == "cusparselt_cached":
        from optishear_lightning.kernels.cusparselt import CuSparseLtLinear

        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        lin.weight.data.copy_(w)
        return CuSparseLtLinear(lin)
    cls = {
        "cutlass": torch.sparse.SparseSemiStructuredTensorCUTLASS,
        "cusparselt": torch.sparse.SparseSemiStructuredTensorCUSPARSELT,
    }[backend]
    sparse = cls.from_dense(w)
    return lambda x: F.linear(x, sparse)


def bench_layers(args, device, shapes, tokens_list) -> dict:
    out: dict = {"layers": [], "groups": [], "errors": {}}
    weights = {n: two_four_weight(r, c, device, i) for i, (n, (r, c)) in enumerate(shapes.items())}
    forwards: dict[str, dict] = {}
    for backend in dict.fromkeys(resolve_backend(b) for b in args.backends):
        try:
            for name, w in weights.items():
                check_semi_structured_support(w, backend, name)
            forwards[backend] = {n: sparse_forward(w, backend) for n, w in weights.items()}
            q = weights["q_proj"]
            forwards[backend]["q_proj"](torch.ones(64, q.shape[1], device=device, dtype=q.dtype))
        except Exception as e:  # backend missing on this GPU/build: report, go on
            out["errors"][backend] = f"{type(e).__name__}: {e}"
            print(f"{backend}: {out['errors'][backend]}", flush=True)
    for tokens in tokens_list:
        times: dict = {}
        for name, w in weights.items():
            x = torch.randn(tokens, w.shape[1], device=device, dtype=torch.bfloat16)
            # Dense before and after the sparse backends, the faster of the two kept: cuBLAS
            # times drift by up to ~20% within a run on the H200, and the speedups should not
            # profit from a slow dense measurement.
            dense_t = median_time(lambda x=x, w=w: F.linear(x, w), args.repeats)
            sparse_ts = {
                backend: median_time(lambda x=x, f=fwd[name]: f(x), args.repeats)
                for backend, fwd in forwards.items()
            }
            dense_t = min(dense_t, median_time(lambda x=x, w=w: F.linear(x, w), args.repeats))
            flops = 2 * tokens * w.shape[0] * w.shape[1]
            for backend, sparse_t in sparse_ts.items():
                check = compare_outputs(F.linear(x, w), forwards[backend][name](x))
                times[backend, name] = (dense_t, sparse_t)
                out["layers"].append(
                    dict(
                        backend=backend,
                        tokens=tokens,
                        layer=name,
                        shape=list(w.shape),
                        dense_s=dense_t,
                        sparse_s=sparse_t,
                        speedup=dense_t / sparse_t,
                        dense_tflops=flops / dense_t / 1e12,
                        sparse_dense_equivalent_tflops=flops / sparse_t / 1e12,
                        rel_err=check.rel_err,
                        within_bf16_tolerance=check.ok,
                    )
                )
                print(
                    f"{backend} {tokens:>6} {name:<10} dense {dense_t * 1e6:9.1f} us  sparse "
                    f"{sparse_t * 1e6:9.1f} us  x{dense_t / sparse_t:.2f}  "
                    f"err {check.rel_err:.2e}",
                    flush=True,
                )
        for backend in forwards:
            for group, members in GROUPS.items():
                dense_t = sum(times[backend, m][0] for m in members)
                sparse_t = sum(times[backend, m][1] for m in members)
                out["groups"].append(
                    dict(
                        backend=backend,
                        tokens=tokens,
                        group=group,
                        dense_s=dense_t,
                        sparse_s=sparse_t,
                        speedup=dense_t / sparse_t,
                    )
                )
    out["layers"].sort(key=lambda r: list(forwards).index(r["backend"]))
    return out


def bench_prefill(args, device) -> dict:
    from optishear_lightning.pruning import prune

    config = dict(LLAMA_TINY if args.tiny else LLAMA3_8B)
    if args.layers:
        config["num_hidden_layers"] = args.layers
    tokens = args.prefill_tokens or (256 if args.tiny else 2048)
    model, init_s = random_llama(config, device)
    t = time.perf_counter()
    prune(model, None, "magnitude", None, "2:4")  # on CUDA: the fused N:M kernel
    torch.cuda.synchronize()
    prune_s = time.perf_counter() - t
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, config["vocab_size"], (1, tokens), device=device, generator=gen)

    @torch.no_grad()
    def forward():
        # Prefill as a server runs it: all layers over the prompt, logits of the last token.
        return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits

    dense_s = median_time(forward, max(3, args.repeats // 2))
    dense_logits = forward().float()
    result = dict(
        config=config,
        tokens=tokens,
        init_s=init_s,
        prune_s=prune_s,
        dense_s=dense_s,
        dense_tokens_per_s=tokens / dense_s,
        backends=[],
    )
    # Backends that swap modules (cusparselt_cached) go first: putting the dense linears back
    # afterwards is exact; PyTorch's backends replace the weights in place (last).
    order = sorted(args.prefill_backends, key=lambda b: b != "cusparselt_cached")
    for backend in order:
        linears = named_prunable_linears(model)
        row, export = export_and_time(args, model, backend, ids, forward, dense_logits, result)
        result["backends"].append(row)
        if export is None:
            continue
        if export.backend == "cusparselt_cached":
            # The original (dense, 2:4) linears back, as a failed export check does.
            restore_dense_linears(model, linears, export.names, export.backend)
        else:
            break  # the weights are semi-structured now: no further dense comparison
    result["peak_cuda_bytes"] = cuda_peak_bytes(device)
    return result


def random_llama(config: dict, device) -> tuple[torch.nn.Module, float]:
    """A randomly initialised bfloat16 ``LlamaForCausalLM`` built on ``device``; seconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    t = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**config)).eval()
    torch.set_default_dtype(torch.float32)
    return model, time.perf_counter() - t


def export_and_time(args, model, backend: str, ids, forward, dense_logits, result: dict):
    """Export ``model`` to ``backend`` and time its prefill: the result row and the export
    (``None`` when the export failed: the row holds the error)."""
    t = time.perf_counter()
    try:
        export = export_semi_structured(model, backend, example_inputs=ids[:, :128])
    except Exception as e:  # report and go on with the next backend
        print(f"prefill {backend}: {type(e).__name__}: {e}", flush=True)
        return dict(backend=backend, error=f"{type(e).__name__}: {e}"), None
    torch.cuda.synchronize()
    export_s = time.perf_counter() - t
    sparse_s = median_time(forward, max(3, args.repeats // 2))
    last = compare_outputs(dense_logits, forward().float(), rtol=2.0**-4)
    dense_s, tokens = result["dense_s"], result["tokens"]
    row = dict(
        backend=export.backend,
        export_s=export_s,
        converted_linears=len(export.names),
        layer_checks_ok=all(c.ok for c in export.layer_checks.values()),
        worst_layer_rel_err=max(c.rel_err for c in export.layer_checks.values()),
        model_check_rel_err=export.model_check.rel_err,
        model_check_ok=export.model_check.ok,
        last_token_logits_rel_err=last.rel_err,
        sparse_s=sparse_s,
        speedup=dense_s / sparse_s,
        sparse_tokens_per_s=tokens / sparse_s,
    )
    print(f"prefill {export.backend}: dense {dense_s:.4f} s sparse {sparse_s:.4f} s", flush=True)
    return row, export


def markdown(report: dict) -> str:
    env = report["env"]
    lines = [
        "# 2:4 semi-structured sparse vs dense, LLaMA-3-8B shapes, bfloat16",
        "",
        f"- device: {env['device']} (capability {env.get('capability')}); torch {env['torch']} "
        f"(CUDA {env['cuda']}, cuSPARSELt {env.get('cusparselt')}); triton {env['triton']}; "
        f"transformers {env['transformers']}",
        f"- date: {env['date']}; command: `{env['command']}`",
    ]
    if report.get("skipped"):
        return "\n".join([*lines, "", f"**Skipped:** {report['skipped']}", ""]) + "\n"
    lines.append(
        "- random weights x 0.02, 2:4-pruned by magnitude; dense = the same weights with their "
        "zeros; CUDA events, median; dense timed before and after the sparse backends, the "
        "faster kept; err = max|diff| / max|dense| of the outputs"
    )
    for backend, error in report["layers"]["errors"].items():
        lines.append(f"- {backend}: not measured: {error}")
    layers = [
        [r["backend"], r["tokens"], f"{r['layer']} {r['shape'][0]}x{r['shape'][1]}",
         f"{r['dense_s'] * 1e6:.1f}", f"{r['sparse_s'] * 1e6:.1f}", f"{r['speedup']:.2f}x",
         f"{r['rel_err']:.1e}"]
        for r in report["layers"]["layers"]
    ]  # fmt: skip
    columns = ("backend", "tokens", "layer", "dense (us)", "sparse (us)", "speedup", "err")
    lines += ["", *md_table(columns, layers, "lrlrrrr")]
    groups = [
        [r["backend"], r["tokens"], r["group"], f"{r['dense_s'] * 1e6:.1f}",
         f"{r['sparse_s'] * 1e6:.1f}", f"{r['speedup']:.2f}x"]
        for r in report["layers"]["groups"]
    ]  # fmt: skip
    columns = ("backend", "tokens", "group", "dense (us)", "sparse (us)", "speedup")
    lines += ["", *md_table(columns, groups, "lrlrrr")]
    if report.get("prefill"):
        lines += prefill_lines(report["prefill"])
    elif report.get("prefill_error"):
        lines += ["", f"Prefill not measured: {report['prefill_error']}"]
    return "\n".join(lines) + "\n"


def prefill_lines(p: dict) -> list[str]:
    """The prefill table: dense, then each backend (or why it did not run)."""
    columns = ("backend", "linears", "export (s)", "time (ms)", "tokens/s", "speedup", "checks")
    lines = [
        "",
        f"Prefill, {p['config']['num_hidden_layers']}-block LLaMA-3-8B-shaped model "
        f"(random init), batch 1 x {p['tokens']} tokens, last-token logits; engine prune "
        f"(2:4 magnitude) {p['prune_s']:.2f} s:",
        "",
        *md_table(columns, [], "lrrrrrl"),
        f"| dense (2:4 zeros) | | | {p['dense_s'] * 1e3:.1f} | "
        f"{p['dense_tokens_per_s']:.0f} | 1.00x | |",
    ]
    for b in p["backends"]:
        if "error" in b:
            lines.append(f"| {b['backend']} | | | | | | not run: {b['error']} |")
            continue
        checks = (
            f"layers ok: {b['layer_checks_ok']} (worst {b['worst_layer_rel_err']:.1e}); logits "
            f"on 128 tokens {b['model_check_rel_err']:.1e} (ok: {b['model_check_ok']}); "
            f"last-token logits {b['last_token_logits_rel_err']:.1e}"
        )
        cells = [b["backend"], b["converted_linears"], f"{b['export_s']:.2f}",
                 f"{b['sparse_s'] * 1e3:.1f}", f"{b['sparse_tokens_per_s']:.0f}",
                 f"{b['speedup']:.2f}x", checks]  # fmt: skip
        lines.append(md_row(cells))
    return lines


def write(report: dict, out: Path) -> None:
    text = markdown(report)
    write_report(out, report, text)
    print(text)


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    out = Path(args.out)
    if device.type != "cuda" or not torch.cuda.is_available():
        reason = (
            "semi-structured sparse matmuls need a CUDA GPU with sparse tensor cores "
            "(compute capability 8.0+); nothing can be timed on this machine "
            f"(device {args.device}, CUDA available: {torch.cuda.is_available()})."
        )
        report = {"env": environment(torch.device("cpu")), "skipped": reason}
        try:  # show the error the export gives for CPU weights
            check_semi_structured_support(two_four_weight(64, 64, torch.device("cpu"), 0))
        except (ValueError, TypeError, RuntimeError) as e:
            report["cpu_error"] = str(e)
        print(f"bench_semi_structured: {reason}\nexport on CPU says: {report.get('cpu_error')}")
        write(report, out)
        return
    shapes = SHAPES_TINY if args.tiny else SHAPES_8B
    tokens = args.tokens or ([128, 512] if args.tiny else [2048, 8192, 16384])
    report: dict = {"env": environment(device)}
    print(json.dumps(report["env"]), flush=True)
    report["layers"] = bench_layers(args, device, shapes, tokens)
    write(report, out)  # keep the layer results even if the prefill fails
    if not args.no_prefill:
        torch.cuda.empty_cache()
        try:
            report["prefill"] = bench_prefill(args, device)
        except Exception as e:
            report["prefill_error"] = f"{type(e).__name__}: {e}"
            print(f"prefill failed: {report['prefill_error']}", flush=True)
    write(report, out)


if __name__ == "__main__":
    main()
