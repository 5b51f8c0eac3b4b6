"""Fused Triton pruning kernels vs PyTorch on LLaMA-3-8B shapes (bfloat16, random weights).

Per block: q/o 4096x4096, k/v 1024x4096, gate/up 14336x4096, down 4096x14336; 32 blocks, all
224 matrices resident (~15 GB, plus a pristine copy to restore between timed passes). Measures:

1. the device copy bandwidth (``dst.copy_(src)`` on a large bfloat16 tensor, read + write);
2. Wanda at 50% (per output row) and 2:4 over all 224 matrices with
   - the eager reference way of research scripts (float32 score tensor, ``torch.sort`` per row
     or per group, ``scatter_`` of the mask, masked zeroing; Wanda's own code for rows),
   - the engine's PyTorch path (``METHODS["wanda"].prune_`` under the ``torch`` backend),
   - the engine's kernel path (the same call under ``auto``: fused kernel, in-place weights +
     keep mask, NaN check),
   - the kernel alone: in place + mask, in place only, mask only (no NaN check sync);
   each with its bytes/s against the floor (read W once, write W and/or the mask once);
3. per-shape kernel times for the launch knobs (search: bisection or two-level, warps,
   coarse bits), the default marked and each config's speed relative to it.

Masks of the kernel and of the engine's PyTorch path are compared on block 0 first.

    PYTHONPATH=$PWD/src python benchmarks/bench_kernels.py --out benchmarks/results/kernels_h200
    PYTHONPATH=$PWD/src python benchmarks/bench_kernels.py --tiny --device cpu --out /tmp/k
      (the CPU runs the kernels in Triton's interpreter: tiny shapes, smoke test only)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from harness import Timer, command_line, md_table, utc_now, write_report
from llama3_8b import SHAPES_8B

SHAPES_TINY = {  # row lengths 96 and 160: not powers of two, like 14336
    "q_proj": (16, 96),
    "k_proj": (8, 96),
    "v_proj": (8, 96),
    "o_proj": (16, 96),
    "gate_proj": (24, 96),
    "up_proj": (24, 96),
    "down_proj": (16, 160),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="path prefix: writes <out>.json and <out>.md")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny shapes, 1 block (smoke test)")
    p.add_argument("--blocks", type=int, default=None, help="decoder blocks (default 32)")
    p.add_argument("--repeats", type=int, default=5, help="timed passes of the kernel paths")
    p.add_argument("--ref-repeats", type=int, default=3, help="timed passes of torch paths")
    p.add_argument("--no-sweep", action="store_true", help="skip the launch-knob sweep")
    p.add_argument("--copy-gib", type=float, default=4.0, help="size of the bandwidth copy")
    return p.parse_args()


ARGS = parse_args()
if ARGS.device == "cpu":
    # The kernels run on the CPU only in Triton's interpreter, which has to be chosen before
    # the kernels are first imported (below).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from optishear_lightning.calibration import LayerStats  # noqa: E402
from optishear_lightning.dispatch import (  # noqa: E402
    deferred_nan_checks,
    fused_score,
    triton_prune,
)
from optishear_lightning.kernels import kernel_backend  # noqa: E402
from optishear_lightning.masks import parse_pattern  # noqa: E402
from optishear_lightning.metrics import METHODS  # noqa: E402

WANDA = METHODS["wanda"]
UNSTRUCTURED, TWO_FOUR = parse_pattern("unstructured"), parse_pattern("2:4")


def copy_bandwidth(device: torch.device, timer: Timer, gib: float) -> dict:
    numel = int(gib * 2**30) // 2
    src = torch.randn(numel, device=device, dtype=torch.float32).to(torch.bfloat16)
    dst = torch.empty_like(src)
    result = timer.median(lambda: dst.copy_(src), repeats=10, warmup=3)
    moved = 2 * src.numel() * src.element_size()  # read + write
    result.update(bytes=moved, bytes_per_s=moved / result["median_s"])
    return result


def eager_rows_(w: torch.Tensor, stats: LayerStats, sparsity: float) -> torch.Tensor:
    """Wanda's reference code: score, stable sort per row, scatter the mask, zero in place."""
    metric = w.abs() * torch.sqrt(stats.act_sq_mean.reshape(1, -1))
    mask = torch.zeros_like(metric, dtype=torch.bool)
    order = torch.sort(metric, dim=-1, stable=True)[1]
    mask.scatter_(1, order[:, : int(w.shape[1] * sparsity)], True)
    w[mask] = 0
    return ~mask


def eager_nm_(w: torch.Tensor, stats: LayerStats, n: int, m: int) -> torch.Tensor:
    """The same for N:M, vectorised over groups (Wanda's code loops over column groups)."""
    metric = (w.abs() * torch.sqrt(stats.act_sq_mean.reshape(1, -1))).reshape(w.shape[0], -1, m)
    mask = torch.zeros_like(metric, dtype=torch.bool)
    order = torch.sort(metric, dim=-1, stable=True)[1]
    mask.scatter_(-1, order[..., : m - n], True)
    mask = mask.reshape(w.shape)
    w[mask] = 0
    return ~mask


def main() -> None:
    args = ARGS
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("No CUDA device: run with --device cpu --tiny (Triton interpreter) instead.")
    shapes = SHAPES_TINY if args.tiny else SHAPES_8B
    n_blocks = args.blocks or (1 if args.tiny else 32)
    if args.tiny:  # the interpreter runs ~50 rows a second
        args.copy_gib = min(args.copy_gib, 0.0625)
        args.repeats, args.ref_repeats = 1, 1
    timer = Timer(device)
    env = environment(device, n_blocks, shapes)
    print(json.dumps(env), flush=True)
    report: dict = {"env": env}
    report["copy"] = copy_bandwidth(device, timer, args.copy_gib)
    copy_bw = report["copy"]["bytes_per_s"]
    print(f"copy bandwidth: {copy_bw / 1e9:.1f} GB/s", flush=True)

    bench = KernelBench(device, timer, shapes, n_blocks, copy_bw)
    report["matrices"] = len(bench.pristine)
    report["weights"] = bench.numel
    # Correctness first: kernel masks == the engine's PyTorch masks on block 0.
    identical = bench.masks_identical_block0()
    report["masks_identical_block0"] = identical
    print(f"kernel masks identical to the engine's PyTorch masks (block 0): {identical}")
    bench.specs = {key: fused_score(WANDA, w, bench.stats[key]) for key, w in bench.work.items()}
    for tag, pattern, sparsity in (("50%", UNSTRUCTURED, 0.5), ("2:4", TWO_FOUR, None)):
        measure_pattern(args, bench, tag, pattern, sparsity)
    report["runs"] = bench.runs
    for tag in ("50%", "2:4"):
        report[f"speedup_{tag}"] = speedups(bench.runs, tag)

    # Launch knobs per shape (mask only: no restore needed), on block 0's matrices.
    sweep = []
    if not args.no_sweep:
        bench.restore()
        sweep = sweep_rows(args, shapes, bench.work, bench.specs, timer)
    report["sweep_mask_only_50"] = sweep
    report["sweep_nm_2of4"] = (
        sweep_nm(args, shapes, bench.work, bench.specs, timer) if not args.no_sweep else []
    )
    text = markdown(report)
    write_report(args.out, report, text)
    print(text)


def environment(device: torch.device, n_blocks: int, shapes: dict) -> dict:
    import triton

    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
        "date": utc_now(),
        "command": command_line(prefix="", quote=False),
        "blocks": n_blocks,
        "shapes": shapes,
        "dtype": "bfloat16",
    }


class KernelBench:
    """The weights of every block (pristine and working copies), their statistics, and the
    timed runs recorded so far."""

    def __init__(self, device, timer: Timer, shapes: dict, n_blocks: int, copy_bw: float):
        self.device, self.timer, self.shapes, self.n_blocks = device, timer, shapes, n_blocks
        self.copy_bw = copy_bw
        # Weights (random, not zeros) and per-matrix activation statistics.
        gen = torch.Generator(device=device).manual_seed(0)
        self.pristine, self.stats = {}, {}
        for b, n in [(b, n) for b in range(n_blocks) for n in shapes]:
            rows, cols = shapes[n]
            w = torch.randn(rows, cols, device=device, generator=gen, dtype=torch.float32)
            self.pristine[b, n] = (w * 0.02).to(torch.bfloat16)
            sq = torch.rand(cols, device=device, generator=gen) * 4 + 1e-3
            self.stats[b, n] = LayerStats(sq, n_tokens=1)
        self.work = {key: w.clone() for key, w in self.pristine.items()}
        self.numel = sum(w.numel() for w in self.pristine.values())
        self.specs: dict = {}
        self.runs: dict[str, dict] = {}

    def restore(self) -> None:
        for key, w in self.work.items():
            w.copy_(self.pristine[key])

    def masks_identical_block0(self) -> bool:
        identical = True
        for (b, n), w in self.pristine.items():
            if b:
                continue
            for pattern, sparsity in ((UNSTRUCTURED, 0.5), (TWO_FOUR, None)):
                with kernel_backend("torch"):
                    ref = WANDA.prune_(w.clone(), self.stats[b, n], sparsity, pattern)
                spec = fused_score(WANDA, w, self.stats[b, n])
                keep = triton_prune(w, spec, sparsity, pattern, inplace=False)
                identical &= bool(torch.equal(ref, keep))
        return identical

    def record(self, label: str, result: dict, floor_bytes: int) -> None:
        result.update(
            floor_bytes=floor_bytes,
            bytes_per_s=floor_bytes / result["median_s"],
            fraction_of_copy=floor_bytes / result["median_s"] / self.copy_bw,
        )
        self.runs[label] = result
        print(
            f"{label:<42} {result['median_s'] * 1e3:10.2f} ms  "
            f"{result['bytes_per_s'] / 1e9:8.1f} GB/s ({result['fraction_of_copy']:.0%} of copy)",
            flush=True,
        )

    def run_all(self, fn):
        return lambda: [fn(key, w) for key, w in self.work.items()]

    def run_engine(self, fn):
        # As pruning.prune runs the engine: one block at a time, the kernels' NaN checks read
        # back once per block (deferred_nan_checks) instead of after every matrix.
        def run():
            for b in range(self.n_blocks):
                with deferred_nan_checks():
                    for n in self.shapes:
                        fn((b, n), self.work[b, n])

        return run

    def measure(self, label: str, fn, floor_bytes: int, repeats: int, engine: bool = False):
        # Dense weights before every pass (untimed): pruned weights would be a tie-heavy case.
        runner = self.run_engine(fn) if engine else self.run_all(fn)
        result = self.timer.median(runner, repeats=repeats, warmup=1, before=self.restore)
        self.record(label, result, floor_bytes)

    def measure_graph(self, label, kw, pattern, sparsity, floor_bytes, repeats) -> None:
        # The same 224 launches captured once in a CUDA graph and replayed: the GPU time of the
        # kernels without the Python/Triton launch overhead between them.
        def launch_all():
            for key, w in self.work.items():
                triton_prune(w, self.specs[key], sparsity, pattern, check_nan=False, **kw)

        self.restore()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            launch_all()  # compiled and warm before the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            launch_all()
        result = self.timer.median(graph.replay, repeats=repeats, warmup=1, before=self.restore)
        del graph
        torch.cuda.empty_cache()
        self.record(label, result, floor_bytes)


def measure_pattern(args, bench: KernelBench, tag: str, pattern, sparsity) -> None:
    """Every path at one pattern: eager, engine (PyTorch, kernels), bare kernel, CUDA graph."""
    numel, stats, specs = bench.numel, bench.stats, bench.specs
    bytes_w = 2 * numel  # one pass over the bfloat16 weights

    def eager(key, w):
        if pattern.is_nm:
            return eager_nm_(w, stats[key], pattern.n, pattern.m)
        return eager_rows_(w, stats[key], sparsity)

    def engine(key, w):
        return WANDA.prune_(w, stats[key], sparsity, pattern)

    bench.measure(f"{tag} eager reference (sort + scatter)", eager, 5 * numel, args.ref_repeats)
    with kernel_backend("torch"):
        bench.measure(f"{tag} engine, PyTorch backend", engine, 5 * numel, args.ref_repeats, True)
    with kernel_backend("triton" if bench.device.type == "cpu" else "auto"):
        bench.measure(f"{tag} engine, kernel backend", engine, 5 * numel, args.repeats, True)
    for label, kw, floor in (
        ("kernel: in place + mask", {}, 5 * numel),
        ("kernel: in place only", {"return_mask": False}, 2 * bytes_w),
        ("kernel: mask only", {"inplace": False}, bytes_w + numel),
    ):
        bench.measure(
            f"{tag} {label}",
            lambda key, w, kw=kw: triton_prune(
                w, specs[key], sparsity, pattern, check_nan=False, **kw
            ),
            floor,
            args.repeats,
        )
    if bench.device.type == "cuda":
        for label, kw, floor in (
            ("kernel: in place + mask", {}, 5 * numel),
            ("kernel: in place only", {"return_mask": False}, 2 * bytes_w),
        ):
            label = f"{tag} {label}, CUDA graph replay"
            bench.measure_graph(label, kw, pattern, sparsity, floor, args.repeats)


def speedups(runs: dict[str, dict], tag: str) -> dict[str, float]:
    """The engine's kernel path against the eager reference and the engine's PyTorch path."""
    t_kernel = runs[f"{tag} engine, kernel backend"]["median_s"]
    return {
        "vs_eager_reference": runs[f"{tag} eager reference (sort + scatter)"]["median_s"]
        / t_kernel,
        "vs_engine_pytorch": runs[f"{tag} engine, PyTorch backend"]["median_s"] / t_kernel,
    }


def distinct_shapes(shapes: dict) -> dict:
    """``(rows, cols) -> name`` of the first matrix of each shape (q and o, k and v, gate and
    up share one)."""
    distinct: dict = {}
    for n, shape in shapes.items():
        distinct.setdefault(shape, n)
    return distinct


def row_knob_options(tk, block: int) -> list[tuple]:
    """(select, coarse bits, warps) to sweep; ``(None, None, None)`` = the launcher's defaults.

    The bisection with and without the bucket copy (coarse 12 / 32), and the two-level search.
    """
    options = [(None, None, None)]
    searches = [("bisect", 32), ("bisect", tk.COARSE_BITS), ("two_level", None)]
    searches += [(sel, None) for sel in tk.SELECTS if sel not in ("bisect", "two_level")]
    for select, coarse in searches:
        for warps in (1, 2, 4, 8, 16):
            # up to 128 keys a thread (more spills registers)
            if 1 <= block // (32 * warps) <= 128:
                options.append((select, coarse, warps))
    return options


def sweep_rows(args, shapes, work, specs, timer) -> list[dict]:
    """Mask only at 50% per shape for the row kernel's launch knobs."""
    import triton

    from optishear_lightning.kernels import triton_kernels as tk

    sweep = []
    for (rows, cols), n in distinct_shapes(shapes).items():
        w, spec = work[0, n], specs[0, n]
        default = tk.default_row_knobs(cols)
        default_key = (default["select"], default["coarse_bits"], default["num_warps"])
        for select, coarse, warps in row_knob_options(tk, triton.next_power_of_2(cols)):

            def call(select=select, coarse=coarse, warps=warps, w=w, spec=spec):
                triton_prune(
                    w, spec, 0.5, inplace=False, check_nan=False,
                    coarse_bits=coarse, num_warps=warps, select=select,
                )  # fmt: skip

            try:
                reps, warm = (1, 0) if args.tiny else (max(args.repeats, 3) * 4, 2)
                res = timer.median(call, repeats=reps, warmup=warm)
                t = res["median_s"]
                row = {"bytes_per_s": (2 + 1) * rows * cols / t, "error": None}
            except Exception as e:  # a config that does not compile or fit
                t, row = float("nan"), {"bytes_per_s": None, "error": repr(e)[:200]}
            resolved = (
                default_key
                if select is None
                else (select, coarse if select == "bisect" else None, warps)
            )
            row.update(
                shape=n, rows=rows, cols=cols, select=resolved[0], coarse_bits=resolved[1],
                num_warps=resolved[2], seconds=t, default=select is None,
            )  # fmt: skip
            sweep.append(row)
            tag = "default " if select is None else ""
            print(
                f"sweep {n:<10} {tag}select={resolved[0]} coarse={resolved[1]} "
                f"warps={resolved[2]}: {t * 1e6:9.1f} us",
                flush=True,
            )
    return sweep


def sweep_nm(args, shapes, work, specs, timer) -> list[dict]:
    """2:4 in place + mask per shape for the N:M kernel's implementations and launch knobs."""
    import inspect

    from optishear_lightning.kernels import triton_kernels as tk

    params = inspect.signature(tk.launch_nm).parameters
    impls = [None]
    if "nm_impl" in params:
        impls += list(getattr(tk, "NM_IMPLS", ("pairwise", "split4")))
    rows_out = []
    for (rows, cols), n in distinct_shapes(shapes).items():
        w, spec = work[0, n], specs[0, n]
        options = [(None, None, None)]
        for impl in impls[1:]:
            blocks = (None,) if impl == "pairwise" else (512, 1024, 2048, 4096)
            for block in blocks:  # the pairwise kernel takes no block
                for warps in (1, 2, 4, 8):
                    options.append((impl, block, warps))
        base = None
        for impl, block, warps in options:

            def call(impl=impl, block=block, warps=warps, w=w, spec=spec):
                triton_prune(
                    w, spec, None, "2:4", check_nan=False, num_warps=warps,
                    nm_impl=impl, nm_block=block,
                )  # fmt: skip

            try:
                reps, warm = (1, 0) if args.tiny else (max(args.repeats, 3) * 4, 2)
                t = timer.median(call, repeats=reps, warmup=warm)["median_s"]
                err = None
            except Exception as e:  # a config that does not compile or fit
                t, err = float("nan"), repr(e)[:200]
            if impl is None:
                base = t
            row = dict(
                shape=n, rows=rows, cols=cols, nm_impl=impl or "default", block=block,
                num_warps=warps, seconds=t, error=err,
                bytes_per_s=(2 * 2 + 1) * rows * cols / t if err is None else None,
                vs_default=base / t if base and err is None else None,
            )  # fmt: skip
            rows_out.append(row)
            print(
                f"sweep 2:4 {n:<10} impl={row['nm_impl']} block={block} warps={warps}: "
                f"{t * 1e6:9.1f} us {err or ''}",
                flush=True,
            )
    return rows_out


def markdown(report: dict) -> str:
    env = report["env"]
    copy_bw = report["copy"]["bytes_per_s"]
    lines = [
        "# Fused pruning kernels: LLaMA-3-8B shapes, bfloat16",
        "",
        f"- device: {env['device']}; torch {env['torch']} (CUDA {env['cuda']}); "
        f"triton {env['triton']}{' (interpreter)' if env['triton_interpret'] == '1' else ''}",
        f"- date: {env['date']}; command: `{env['command']}`",
        f"- {report['matrices']} matrices ({env['blocks']} blocks x 7), "
        f"{report['weights'] / 1e9:.3f} G weights, random normal x 0.02; Wanda scores",
        f"- copy bandwidth (`dst.copy_(src)`, read + write): {copy_bw / 1e9:.1f} GB/s",
        f"- kernel masks identical to the engine's PyTorch masks (block 0): "
        f"{report['masks_identical_block0']}",
        "- floor: bytes that must move (read W once; write W and/or the bool mask once); "
        "GB/s = floor bytes / time",
        "",
        *md_table(
            ("run", "time (ms)", "GB/s", "of copy bandwidth"),
            [
                (
                    label,
                    f"{r['median_s'] * 1e3:.2f}",
                    f"{r['bytes_per_s'] / 1e9:.1f}",
                    f"{r['fraction_of_copy']:.0%}",
                )
                for label, r in report["runs"].items()
            ],
            "lrrr",
        ),
        "",
    ]
    for tag in ("50%", "2:4"):
        s = report[f"speedup_{tag}"]
        lines.append(
            f"- {tag}: engine kernel path is {s['vs_eager_reference']:.1f}x the eager reference "
            f"and {s['vs_engine_pytorch']:.1f}x the engine's PyTorch path"
        )
    if report["sweep_mask_only_50"]:
        lines += row_sweep_lines(report["sweep_mask_only_50"])
    if report.get("sweep_nm_2of4"):
        lines += nm_sweep_lines(report["sweep_nm_2of4"])
    return "\n".join(lines) + "\n"


def row_sweep_lines(sweep: list[dict]) -> list[str]:
    """The row kernel's launch-knob table (mask only at 50%)."""
    lines = [
        "",
        "Launch knobs, mask only at 50% (one matrix per shape). **default** = what "
        "`triton_prune` picks without knobs (`default_row_knobs`); `bisect` with 32 coarse "
        "bits = bisection over the whole row, 12 = bucket copy after 12 bits; `two_level` = "
        "whole-row bisection until the bucket is small, then over the bucket; `snap` = "
        "bisection whose bracket snaps onto actual keys (~15 passes, 3 reductions each):",
        "",
    ]
    base = {r["shape"]: r["seconds"] for r in sweep if r.get("default")}
    rows = []
    for r in sweep:
        bw = "error" if r["bytes_per_s"] is None else f"{r['bytes_per_s'] / 1e9:.1f}"
        label = "**default**: " if r.get("default") else ""
        rel = base.get(r["shape"], float("nan")) / r["seconds"]
        rows.append(
            (f"{r['shape']} {r['rows']}x{r['cols']}", f"{label}{r.get('select', 'bisect')}",
             r["coarse_bits"], r["num_warps"], f"{r['seconds'] * 1e6:.1f}", bw, f"{rel:.2f}x")
        )  # fmt: skip
    columns = ("shape", "select", "coarse bits", "warps", "time (us)", "GB/s", "vs default")
    lines += md_table(columns, rows, "llrrrrr")
    return lines


def nm_sweep_lines(sweep: list[dict]) -> list[str]:
    """The N:M kernel's implementation and launch-knob table (2:4)."""
    lines = [
        "",
        "N:M kernel, 2:4 in place + mask (one matrix per shape); GB/s against the floor "
        "(read W, write W and the mask):",
        "",
    ]
    rows = []
    for r in sweep:
        bw = "error" if r["bytes_per_s"] is None else f"{r['bytes_per_s'] / 1e9:.1f}"
        rel = "" if r["vs_default"] is None else f"{r['vs_default']:.2f}x"
        rows.append(
            (f"{r['shape']} {r['rows']}x{r['cols']}", r["nm_impl"], r["block"],
             r["num_warps"], f"{r['seconds'] * 1e6:.1f}", bw, rel)
        )  # fmt: skip
    columns = ("shape", "implementation", "block", "warps", "time (us)", "GB/s", "vs default")
    lines += md_table(columns, rows, "llrrrrr")
    return lines


if __name__ == "__main__":
    main()
