"""Backend setting and dispatch: auto / triton / torch, and the errors of a forced Triton."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from optishear_lightning.kernels import (
    ENV_VAR,
    backend,
    get_kernel_backend,
    kernel_backend,
    kernels_for,
    set_kernel_backend,
)
from optishear_lightning.masks import parse_pattern
from optishear_lightning.metrics import METHODS

from .conftest import DEVICE, random_stats, random_weight, requires_triton

CPU = torch.device("cpu")


def test_setting_precedence(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert get_kernel_backend() == "auto"
    monkeypatch.setenv(ENV_VAR, "Torch")
    assert get_kernel_backend() == "torch"
    set_kernel_backend("triton")
    assert get_kernel_backend() == "triton"
    with kernel_backend("auto"):
        assert get_kernel_backend() == "auto"
        with kernel_backend("torch"):
            assert get_kernel_backend() == "torch"
        assert get_kernel_backend() == "auto"
    assert get_kernel_backend() == "triton"
    set_kernel_backend(None)
    assert get_kernel_backend() == "torch"  # back to the env var


def test_bad_settings(monkeypatch):
    with pytest.raises(ValueError, match="auto, triton, torch"):
        set_kernel_backend("cuda")
    monkeypatch.setenv(ENV_VAR, "fast")
    with pytest.raises(ValueError, match="OPTISHEAR_KERNELS='fast'"):
        get_kernel_backend()


def test_auto_and_torch_resolution():
    with kernel_backend("torch"):
        assert not kernels_for(DEVICE)
    with kernel_backend("auto"):
        assert not kernels_for(CPU)  # the interpreter is never chosen automatically
        assert kernels_for(torch.device("cuda")) == backend.triton_available()


def test_forced_triton_without_triton(monkeypatch):
    monkeypatch.setattr(backend, "triton_available", lambda: False)
    with kernel_backend("auto"):
        assert not kernels_for(torch.device("cuda"))
    with kernel_backend("triton"), pytest.raises(RuntimeError, match="Triton is not installed"):
        kernels_for(CPU)


def test_forced_triton_on_other_devices():
    with kernel_backend("triton"), pytest.raises(RuntimeError, match="do not run on meta"):
        kernels_for(torch.device("meta"))


@requires_triton
def test_forced_triton_on_cpu_needs_the_interpreter_before_import():
    # A fresh interpreter without TRITON_INTERPRET: the error says what to change, both before
    # and after the kernel module was imported (setting the variable late does not help).
    script = textwrap.dedent(
        """
        import os, torch
        from optishear_lightning.kernels import kernels_for, set_kernel_backend
        set_kernel_backend("triton")
        for step in ("unset", "imported"):
            try:
                kernels_for(torch.device("cpu"))
            except RuntimeError as e:
                print(step, "->", e)
            if step == "unset":
                import optishear_lightning.kernels.triton_kernels
                os.environ["TRITON_INTERPRET"] = "1"
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", ENV_VAR)}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("unset -> ") and "TRITON_INTERPRET=1 is not set" in lines[0]
    assert lines[1].startswith("imported -> ") and "was imported without it" in lines[1]
    assert "'auto'/'torch'" in lines[0]


@requires_triton
def test_env_var_forces_the_kernels(monkeypatch):
    from optishear_lightning import dispatch

    calls = []

    def fake_kernel(weight, *args, **kwargs):
        calls.append(1)
        return torch.ones_like(weight, dtype=torch.bool)

    monkeypatch.setattr(dispatch, "triton_prune", fake_kernel)
    w = random_weight(2, 16)
    stats = random_stats(16)
    monkeypatch.setenv(ENV_VAR, "torch")
    METHODS["wanda"].prune_(w.clone(), stats, 0.5, parse_pattern("unstructured"))
    assert calls == []
    monkeypatch.setenv(ENV_VAR, "triton")
    METHODS["wanda"].prune_(w.clone(), stats, 0.5, parse_pattern("unstructured"))
    assert calls == [1]
    monkeypatch.setenv(ENV_VAR, "auto")
    METHODS["wanda"].prune_(w.clone(), stats, 0.5, parse_pattern("unstructured"))
    assert calls == [1] + ([1] if DEVICE.type == "cuda" else [])


def test_unsupported_cases_fall_back_to_torch(monkeypatch):
    from optishear_lightning import dispatch

    monkeypatch.setattr(dispatch, "kernels_for", lambda device: True)
    monkeypatch.setattr(dispatch, "triton_prune", lambda *a, **k: pytest.fail("kernel called"))
    stats = random_stats(16)
    unstructured = parse_pattern("unstructured")
    w = random_weight(4, 16, torch.float64)  # float64: PyTorch
    keep = METHODS["wanda"].prune_(w, stats, 0.5, unstructured)
    assert (~keep).sum() == 32
    w = random_weight(4, 16)
    keep = METHODS["wanda"].prune_(w, stats, 0.5, unstructured, group="layer")
    assert (~keep).sum() == 32


def test_auto_falls_back_when_the_kernels_cannot_run(monkeypatch):
    from optishear_lightning import dispatch

    def broken(*args, **kwargs):
        raise RuntimeError("PTX compilation failed")

    w = random_weight(4, 16)
    stats = random_stats(16)
    unstructured = parse_pattern("unstructured")
    with kernel_backend("torch"):
        expected = METHODS["wanda"].prune_(w.clone(), stats, 0.5, unstructured)
    monkeypatch.setattr(dispatch, "kernels_for", lambda device: True)  # as on a GPU
    monkeypatch.setattr(dispatch, "triton_prune", broken)
    monkeypatch.setattr(dispatch, "_auto_failure", None)
    with kernel_backend("triton"), pytest.raises(RuntimeError, match="PTX compilation"):
        METHODS["wanda"].prune_(w.clone(), stats, 0.5, unstructured)
    with kernel_backend("auto"), pytest.warns(RuntimeWarning, match="pruning with PyTorch"):
        keep = METHODS["wanda"].prune_(w.clone(), stats, 0.5, unstructured)
    assert torch.equal(keep, expected)
    assert "PTX compilation failed" in dispatch._auto_failure
    with kernel_backend("auto"):  # off from now on: no second attempt, no second warning
        assert dispatch.try_fused_prune_(w, METHODS["wanda"], stats, 0.5, unstructured) is None
