"""2:4 export of a model: validation and errors everywhere, the conversion on a GPU."""

from __future__ import annotations

import pytest
import torch

from optishear_lightning.export import export_semi_structured
from optishear_lightning.kernels import check_semi_structured_support, compare_outputs
from optishear_lightning.masks import keep_mask_from_scores
from optishear_lightning.models import named_prunable_linears

from .conftest import tiny_llama
from .kernels.conftest import requires_cuda
from .kernels.test_semi_structured import two_four


def prune_2to4_(model) -> None:
    with torch.no_grad():
        for lin in named_prunable_linears(model).values():
            lin.weight.mul_(keep_mask_from_scores(lin.weight.float().abs(), None, "2:4"))


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
