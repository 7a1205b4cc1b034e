"""Autograd linear / grouped_linear on every backend (CPU: fp8 runs the reference emulation), and
the per-device backend choice."""

import json
import secrets

import pytest
import torch

import kernels
from kernels import backend as backend_mod
from kernels import WeightGradDeferral, grouped_linear, linear
from kernels.testing import calc_diff


@pytest.fixture
def gen() -> torch.Generator:
    seed = secrets.randbits(62)
    print(f"random seed {seed}")
    return torch.Generator().manual_seed(seed)


def _run(backend, x, w, b, g):
    """Forward and backward of ``linear``; returns (y, dx, dw, db)."""
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    b = b.detach().requires_grad_() if b is not None else None
    y = linear(x, w, b, backend=backend)
    y.backward(g)
    return y.detach(), x.grad, w.grad, b.grad if b is not None else None


def test_fp32_is_plain_matmul(gen):
    x = torch.randn(3, 5, 40, generator=gen)
    w = torch.randn(24, 40, generator=gen)
    g = torch.randn(3, 5, 24, generator=gen)
    y, dx, dw, _ = _run("fp32", x, w, None, g)
    assert torch.equal(y, torch.matmul(x, w.t()))
    assert torch.equal(dx, torch.matmul(g, w))
    assert torch.equal(dw, torch.matmul(g.reshape(-1, 24).t(), x.reshape(-1, 40)))


def test_fp8_grads_match_bf16_within_fp8_tolerance(gen):
    x = torch.randn(4, 64, 300, generator=gen)
    w = torch.randn(260, 300, generator=gen) * 0.05
    b = torch.randn(260, generator=gen)
    g = torch.randn(4, 64, 260, generator=gen)
    fp32 = _run("fp32", x, w, b, g)
    bf16 = _run("bf16", x, w, b, g)
    fp8 = _run("fp8", x, w, b, g)
    for name, a, r, ref32 in zip(("y", "dx", "dw", "db"), fp8, bf16, fp32):
        assert a.dtype == torch.float32 and torch.isfinite(a).all(), name
        # FP8 tolerance: the DeepGEMM-level similarity bound (typical 7e-4 for one quantized GEMM)
        assert calc_diff(a, r) < 1e-3, name
        assert calc_diff(a, ref32) < 1e-3, name
        assert calc_diff(r, ref32) < 1e-4, name


@pytest.mark.parametrize("backend", kernels.BACKENDS)
def test_deferred_weight_grads_are_identical(backend, gen):
    x = torch.randn(2, 70, 130, generator=gen)
    w = torch.randn(90, 130, generator=gen) * 0.1
    b = torch.randn(90, generator=gen)
    g = torch.randn(2, 70, 90, generator=gen)
    y0, dx0, dw0, db0 = _run(backend, x, w, b, g)

    xp, wp, bp = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    with WeightGradDeferral([wp, bp]).capture() as pending:
        linear(xp, wp, bp, backend=backend).backward(g)
    assert wp.grad is None and len(pending) == 1, "B pass must leave the weight gradient to W"
    assert torch.equal(xp.grad, dx0) and torch.equal(bp.grad, db0)
    wp.grad = torch.ones_like(w)  # W accumulates like autograd does
    for fn in pending:
        fn()
    assert wp.grad.dtype == torch.float32
    assert not wp.grad.requires_grad, "W must run outside autograd: a grad that requires grad leaks the graph"
    assert torch.equal(wp.grad, dw0 + 1.0)


@pytest.mark.parametrize("backend", kernels.BACKENDS)
def test_grouped_linear_is_per_expert_linear_and_defers(backend, gen):
    counts = [37, 0, 130, 3]
    x = torch.randn(sum(counts), 140, generator=gen)
    w = torch.randn(4, 96, 140, generator=gen) * 0.1
    g = torch.randn(sum(counts), 96, generator=gen)

    xp, wp = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = grouped_linear(xp, wp, torch.tensor(counts), backend=backend)
    y.backward(g)
    offs = [0, 37, 37, 167, 170]
    for e in range(4):
        lo, hi = offs[e], offs[e + 1]
        xe, we = x[lo:hi].clone().requires_grad_(), w[e].clone().requires_grad_()
        ye = linear(xe, we, backend=backend)
        ye.backward(g[lo:hi])
        assert torch.equal(y[lo:hi], ye)
        assert torch.equal(xp.grad[lo:hi], xe.grad)
        assert torch.equal(wp.grad[e], we.grad if hi > lo else torch.zeros_like(we))

    xd, wd = x.clone().requires_grad_(), w.clone().requires_grad_()
    with WeightGradDeferral([wd]).capture() as pending:
        grouped_linear(xd, wd, offs, backend=backend).backward(g)
    assert wd.grad is None
    for fn in pending:
        fn()
    assert torch.equal(wd.grad, wp.grad) and torch.equal(xd.grad, xp.grad)


def test_fp8_grouped_matches_fp32_within_tolerance(gen):
    counts = [100, 0, 156]
    x = torch.randn(256, 256, generator=gen, requires_grad=True)
    w = (torch.randn(3, 128, 256, generator=gen) * 0.05).requires_grad_()
    outs = {}
    for backend in ("fp32", "fp8"):
        x.grad = w.grad = None
        y = grouped_linear(x, w, counts, backend=backend)
        y.backward(torch.ones_like(y))
        outs[backend] = (y.detach(), x.grad.clone(), w.grad.clone())
    for a, r in zip(outs["fp8"], outs["fp32"]):
        assert calc_diff(a, r) < 1e-3


@pytest.mark.parametrize("backend", ["bf16", "fp8"])
def test_dtypes(backend, gen):
    w = torch.randn(130, 64, generator=gen, requires_grad=True)
    xb = torch.randn(7, 64, generator=gen).bfloat16().requires_grad_()
    y = linear(xb, w, backend=backend)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert xb.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    y1 = linear(torch.randn(64, generator=gen), w, backend=backend)  # a single vector
    assert y1.shape == (130,)


def test_argument_errors():
    x, w = torch.zeros(2, 8), torch.zeros(4, 8)
    with pytest.raises(ValueError, match=r"'fp16' is not one of \('fp32', 'bf16', 'fp8'\)"):
        linear(x, w, backend="fp16")
    with pytest.raises(ValueError, match="weight must be"):
        linear(x, w.t(), backend="bf16")
    with pytest.raises(ValueError, match="weight \\[experts, out, in\\]"):
        grouped_linear(x, w, [2], backend="fp8")
    with pytest.raises(ValueError, match="add up"):
        grouped_linear(x, w[None], [3], backend="fp8")


def test_backend_for_cpu_and_override():
    assert kernels.backend_for("cpu") == "bf16"
    assert kernels.backend_for(torch.device("cpu"), "fp8") == "fp8"
    assert kernels.backend_for("cpu", "fp32") == "fp32"
    with pytest.raises(ValueError, match=r"not one of \('fp32', 'bf16', 'fp8'\)"):
        kernels.backend_for("cpu", "int8")
    info = kernels.describe_backend("cpu", "fp8")
    assert info["backend"] == "fp8" and "emulation" in info["gemm"]
    json.dumps(info)  # loggable as is
    with pytest.raises(ValueError, match="backend"):
        kernels.describe_backend("cpu", "fp4")


@pytest.mark.parametrize(
    "cap,hip,auto,fp8_ok",
    [((9, 0), None, "fp8", True), ((8, 9), None, "bf16", True), ((8, 0), None, "bf16", False), ((9, 4), "6.2", "bf16", False)],
)
def test_backend_for_cuda_capabilities(monkeypatch, cap, hip, auto, fp8_ok):
    monkeypatch.setattr(backend_mod, "_capability", lambda device: cap)
    monkeypatch.setattr(torch.version, "hip", hip)
    assert kernels.backend_for("cuda:0") == auto
    assert kernels.backend_for("cuda:0", "bf16") == "bf16"
    if fp8_ok:
        assert kernels.backend_for("cuda:0", "fp8") == "fp8"
    else:
        with pytest.raises(ValueError, match="use backend 'bf16'"):
            kernels.backend_for("cuda:0", "fp8")


@pytest.mark.parametrize("device", ["xpu", "mps", "privateuseone"])
def test_other_accelerators_get_bf16(device):
    assert kernels.backend_for(device) == "bf16"
    with pytest.raises(ValueError, match="no E4M3 FP8 GEMM"):
        kernels.backend_for(device, "fp8")
