"""2:4 semi-structured export: validation and errors everywhere, the conversion on a GPU."""

from __future__ import annotations

import pytest
import torch

from optishear_lightning.kernels import (
    check_2to4,
    check_semi_structured_support,
    compare_outputs,
    export_semi_structured,
    is_2to4,
    resolve_backend,
)
from optishear_lightning.masks import keep_mask_from_scores
from optishear_lightning.models import named_prunable_linears

from ..conftest import tiny_llama
from .conftest import requires_cuda


def two_four(rows: int, cols: int, dtype=torch.bfloat16, device="cpu", seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen)
    return (w * keep_mask_from_scores(w.abs(), None, "2:4")).to(device=device, dtype=dtype)


def prune_2to4_(model) -> None:
    with torch.no_grad():
        for lin in named_prunable_linears(model).values():
            lin.weight.mul_(keep_mask_from_scores(lin.weight.float().abs(), None, "2:4"))


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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_cpu_tensors_are_refused_and_the_model_is_left_alone():
    with pytest.raises(ValueError, match="CUDA GPUs only"):
        check_semi_structured_support(two_four(64, 64), "cutlass")
    model = tiny_llama(layers=1).to(torch.bfloat16)
    prune_2to4_(model)
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="CUDA GPUs only"):
        export_semi_structured(model)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_export_validates_every_layer_first():
    model = tiny_llama(layers=1).to(torch.bfloat16)  # not pruned
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight is not 2:4"):
        export_semi_structured(model, "cutlass")
    with pytest.raises(ValueError, match=r"not an nn\.Linear"):
        export_semi_structured(model, names=["model.layers.0.self_attn"])


def test_compare_outputs():
    ref = torch.tensor([1.0, -4.0, 2.0])
    check = compare_outputs(ref, ref + torch.tensor([0.0, 0.05, 0.0]))
    assert check.ok and check.rel_err == pytest.approx(0.0125)
    assert not compare_outputs(ref, ref * 1.1).ok
    assert "max|diff|" in str(check)


@requires_cuda
def test_export_on_gpu_matches_dense():
    major, _ = torch.cuda.get_device_capability()
    if major < 8:
        pytest.skip("needs sparse tensor cores (compute capability 8.0+)")
    from torch.sparse import SparseSemiStructuredTensor

    model = tiny_llama(layers=2, hidden=128).to(device="cuda", dtype=torch.bfloat16)
    prune_2to4_(model)
    ids = torch.randint(0, 128, (2, 64), device="cuda")
    result = export_semi_structured(model, "cusparselt", example_inputs=ids)
    assert len(result.names) == 14
    assert all(check.ok for check in result.layer_checks.values())
    assert result.model_check is not None and result.model_check.ok
    for lin in named_prunable_linears(model).values():
        assert isinstance(lin.weight, SparseSemiStructuredTensor)
    with pytest.raises(TypeError, match="float32"):
        check_semi_structured_support(two_four(64, 64, torch.float32, "cuda"), "cusparselt")


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


@requires_cuda
def test_export_cusparselt_cached_and_restore_on_failure():
    from optishear_lightning.kernels import CuSparseLtLinear, cusparselt_library_available

    if torch.cuda.get_device_capability()[0] < 8 or not cusparselt_library_available():
        pytest.skip("needs sparse tensor cores and the cuSPARSELt library")
    model = tiny_llama(layers=2, hidden=128).to(device="cuda", dtype=torch.bfloat16)
    prune_2to4_(model)
    ids = torch.randint(0, 128, (2, 64), device="cuda")
    with torch.no_grad():
        dense_logits = model(ids).logits
    originals = named_prunable_linears(model)
    with pytest.raises(ValueError, match="differs from dense"):  # rtol < 0: every check fails
        export_semi_structured(model, "cusparselt_cached", rtol=-1.0)
    assert named_prunable_linears(model) == originals  # the dense modules are back
    result = export_semi_structured(model, "cusparselt_cached", example_inputs=ids)
    assert len(result.names) == 14 and result.model_check.ok
    modules = dict(model.named_modules())
    assert all(isinstance(modules[n], CuSparseLtLinear) for n in result.names)
    with torch.no_grad():
        assert compare_outputs(dense_logits, model(ids).logits, rtol=2.0**-4).ok
