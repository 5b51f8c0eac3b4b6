"""Where does 2:4 time go on this GPU? cuSPARSELt through PyTorch's wrappers, layer by layer.

For one 2:4-pruned bf16 weight per shape, times (CUDA events, median of 20): the dense
``F.linear``; ``F.linear`` with a ``SparseSemiStructuredTensor`` weight (what
``export_semi_structured`` installs); ``torch._cslt_sparse_mm`` on the compressed weight
directly; and the same with the algorithm picked by ``torch._cslt_sparse_mm_search``. A large
constant gap between the first sparse column and the last tells per-call overhead from GEMM time.

    python benchmarks/probe_cusparselt.py --out benchmarks/results/probe_cusparselt_h200.json
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from harness import Timer, utc_now, write_json
from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

SHAPES = {"k_proj": (1024, 4096), "q_proj": (4096, 4096), "gate_proj": (14336, 4096)}


def timed(fn, *args, repeats: int = 20, **kwargs) -> float:
    """Median microseconds of ``fn(*args, **kwargs)`` (CUDA events) after 3 warm-up calls."""
    result = Timer("cuda").median(lambda: fn(*args, **kwargs), repeats, warmup=3)
    return result["median_s"] * 1e6


def two_four(w: torch.Tensor) -> torch.Tensor:
    groups = w.abs().reshape(w.shape[0], -1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(2, dim=-1).indices, True)
    return w * keep.reshape(w.shape)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    SparseSemiStructuredTensor._FORCE_CUTLASS = False
    rows = []
    for name, (out_f, in_f) in SHAPES.items():
        w = two_four(torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16) * 0.02)
        ws = to_sparse_semi_structured(w)
        compressed = torch._cslt_compress(w)
        for n in args.tokens:
            x = torch.randn(n, in_f, device="cuda", dtype=torch.bfloat16)
            xt = x.t().contiguous()
            row = {"layer": name, "shape": [out_f, in_f], "tokens": n}
            row["dense_us"] = timed(F.linear, x, w)
            row["sparse_linear_us"] = timed(F.linear, x, ws)
            row["cslt_mm_us"] = timed(torch._cslt_sparse_mm, compressed, xt)
            try:
                alg = torch._cslt_sparse_mm_search(compressed, xt)
                row["alg_id"] = int(alg)
                row["cslt_mm_searched_us"] = timed(
                    torch._cslt_sparse_mm, compressed, xt, alg_id=alg
                )
            except (RuntimeError, TypeError) as err:
                row["search_error"] = str(err)[:200]
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = {
        "date": utc_now(),
        "device": torch.cuda.get_device_name(),
        "torch": str(torch.__version__),
        "cusparselt": torch.backends.cusparselt.version(),
        "rows": rows,
    }
    write_json(args.out, report, end="")


if __name__ == "__main__":
    main()
