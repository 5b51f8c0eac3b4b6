"""2:4 semi-structured tensors: validation and errors everywhere, cuSPARSELt on a GPU."""

from __future__ import annotations

import pytest
import torch

from optishear_lightning.kernels import (
    check_2to4,
    check_semi_structured_support,
    compare_outputs,
    is_2to4,
    resolve_backend,
)
from optishear_lightning.masks import keep_mask_from_scores

from .conftest import requires_cuda


def two_four(rows: int, cols: int, dtype=torch.bfloat16, device="cpu", seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen)
    return (w * keep_mask_from_scores(w.abs(), None, "2:4")).to(device=device, dtype=dtype)


def test_is_2to4_and_check():
    w = two_four(4, 16, torch.float32)
    assert is_2to4(w)
    check_2to4(w)
    w[2, 9] = 1.0 if w[2, 9] == 0 else w[2, 9]
    w[2, 8:12] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    assert not is_2to4(w)
    with pytest.raises(ValueError, match=r"1 of 16 groups .* row 2, columns 8-11"):
        check_2to4(w, "layer.weight")
    with pytest.raises(ValueError, match="multiple of 4"):
        check_2to4(torch.zeros(2, 6))
    assert not is_2to4(torch.zeros(2, 6))


def test_backend_names():
    assert resolve_backend("CUTLASS") == "cutlass"
    assert resolve_backend("auto") in ("cutlass", "cusparselt", "cusparselt_cached")
    with pytest.raises(ValueError, match="auto, cusparselt, cutlass"):
        resolve_backend("sputnik")


def test_unsupported_dtypes():
    with pytest.raises(TypeError, match=r"float32, which the cusparselt .* does not support"):
        check_semi_structured_support(two_four(64, 64, torch.float32), "cusparselt")
    with pytest.raises(TypeError, match="float64, which the cutlass"):
        check_semi_structured_support(two_four(64, 64, torch.float64), "cutlass")


def test_unsupported_shapes():
    # CUTLASS bfloat16: out_features a multiple of 32, in_features a multiple of 64.
    with pytest.raises(ValueError, match="multiple of 32 and in_features a multiple of 64"):
        check_semi_structured_support(two_four(16, 64), "cutlass")
    with pytest.raises(ValueError, match="48x64"):
        check_semi_structured_support(two_four(48, 64), "cutlass")
    with pytest.raises(ValueError, match="multiple of 16"):
        check_semi_structured_support(two_four(16, 40), "cusparselt")


def test_not_2to4_is_refused():
    w = torch.randn(64, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        check_semi_structured_support(w, "cutlass", "q.weight")


def test_compare_outputs():
    ref = torch.tensor([1.0, -4.0, 2.0])
    check = compare_outputs(ref, ref + torch.tensor([0.0, 0.05, 0.0]))
    assert check.ok and check.rel_err == pytest.approx(0.0125)
    assert not compare_outputs(ref, ref * 1.1).ok
    assert "max|diff|" in str(check)


def test_cusparselt_cached_backend_checks():
    from optishear_lightning.kernels import CuSparseLtLinear

    assert resolve_backend("cusparselt_cached") == "cusparselt_cached"
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        check_semi_structured_support(two_four(64, 64, torch.float32), "cusparselt_cached")
    with pytest.raises(ValueError, match="multiples of 16 and at least 32"):
        check_semi_structured_support(two_four(40, 64), "cusparselt_cached")
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        check_semi_structured_support(torch.ones(64, 64, dtype=torch.bfloat16), "cusparselt_cached")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="run on CUDA GPUs only"):
            check_semi_structured_support(two_four(64, 64), "cusparselt_cached")
        lin = torch.nn.Linear(64, 64, bias=False, dtype=torch.bfloat16)
        with pytest.raises(ValueError, match="move the model to the GPU"):
            CuSparseLtLinear(lin)


@requires_cuda
def test_cusparselt_linear_matches_dense():
    from optishear_lightning.kernels import CuSparseLtLinear, cusparselt_library_available

    if torch.cuda.get_device_capability()[0] < 8 or not cusparselt_library_available():
        pytest.skip("needs sparse tensor cores and the cuSPARSELt library")
    gen = torch.Generator(device="cuda").manual_seed(0)
    lin = torch.nn.Linear(256, 128, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(two_four(128, 256, device="cuda"))
    sparse = CuSparseLtLinear(lin)
    for tokens in (64, 100, 64):  # 100: rows padded to 16; 64 again: the cached plan
        x = torch.randn(tokens, 256, device="cuda", dtype=torch.bfloat16, generator=gen)
        check = compare_outputs(lin(x), sparse(x))
        assert check.ok, (tokens, check)
    assert sorted(sparse._plans) == [64, 112]
    x = torch.randn(2, 3, 256, device="cuda", dtype=torch.bfloat16, generator=gen)
    assert sparse(x).shape == (2, 3, 128)
    assert sparse(x[:, :0]).shape == (2, 0, 128)  # no rows: no plan, an empty output
    with pytest.raises(ValueError, match=r"takes torch\.bfloat16 inputs"):
        sparse(x.float())
