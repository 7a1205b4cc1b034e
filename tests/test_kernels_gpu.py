"""Triton kernels compiled on a real CUDA device at model-sized shapes, against the torch
reference. Skipped without CUDA; the FP8 cases also need FP8 tensor cores (compute capability
≥ 8.9). The kernels module is imported inside the tests, never at collection, so that on a CPU
machine it is first imported by test_kernels_triton.py with the interpreter switched on."""

import secrets

import pytest
import torch

import kernels
from kernels import reference as ref
from kernels.testing import calc_diff, poison, rel_error

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEV = "cuda"


def _has_fp8() -> bool:
    return torch.cuda.is_available() and torch.version.hip is None and torch.cuda.get_device_capability() >= (8, 9)


needs_fp8 = pytest.mark.skipif(not _has_fp8(), reason="needs FP8 tensor cores (compute capability >= 8.9)")


@pytest.fixture
def ops():
    from kernels import triton_ops

    assert not triton_ops.INTERPRET, "unset TRITON_INTERPRET to test the compiled kernels"
    return triton_ops


@pytest.fixture
def gen() -> torch.Generator:
    seed = secrets.randbits(62)
    print(f"random seed {seed}")
    return torch.Generator(device=DEV).manual_seed(seed)


def _bits(q):
    return q.view(torch.uint8)


@needs_fp8
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quant_bits_at_model_shapes(ops, gen, dtype):
    x = (torch.randn(4096, 7168, device=DEV, generator=gen) * 3).to(dtype)
    x[17, 128:256] = 0.0
    for mine, theirs in [
        (ops.quant_act_1x128(x), ref.quant_act_1x128(x)),
        (ops.quant_act_128x1(x[:1000]), ref.quant_act_128x1(x[:1000])),
        (ops.quant_weight_128x128(x[:2112]), ref.quant_weight_128x128(x[:2112])),
    ]:
        assert torch.equal(mine[1], theirs[1])
        assert torch.equal(_bits(mine[0]), _bits(theirs[0]))


@needs_fp8
@pytest.mark.parametrize("m,n,k", [(4096, 4096, 4096), (128, 2112, 7168), (1000, 7168, 2048), (77, 130, 300)])
def test_fp8_gemm(ops, gen, m, n, k):
    a = torch.randn(m, k, device=DEV, generator=gen)
    b = torch.randn(n, k, device=DEV, generator=gen)
    aq, a_s = ops.quant_act_1x128(a)
    bq, b_s = ops.quant_weight_128x128(b)
    c = poison(torch.empty(m, n, device=DEV))
    ops.fp8_gemm(aq, a_s, bq, b_s, out=c)
    want = ref.dequant_act_1x128(aq, a_s).double() @ ref.dequant_weight_128x128(bq, b_s).double().t()
    assert rel_error(c, want) <= 1e-3 and calc_diff(c, want) < 1e-3
    assert calc_diff(c, a.double() @ b.double().t()) < 1e-3
    cb = poison(torch.empty(m, n, device=DEV, dtype=torch.bfloat16))
    ops.fp8_gemm(aq, a_s, bq, b_s, torch.bfloat16, out=cb)
    assert torch.equal(cb, c.bfloat16())


@needs_fp8
def test_fp8_grouped_gemm(ops, gen):
    counts = [3000, 0, 517, 4096]
    t, n, k = sum(counts), 4096, 7168
    a = torch.randn(t, k, device=DEV, generator=gen)
    b = torch.randn(len(counts), n, k, device=DEV, generator=gen)
    aq, a_s = ops.quant_act_1x128(a)
    q, s = ops.quant_weight_128x128(b.reshape(-1, k))
    bq, b_s = q.reshape(b.shape), s.reshape(len(counts), n // 128, -1)
    c = poison(torch.empty(t, n, device=DEV))
    ops.fp8_grouped_gemm(aq, a_s, bq, b_s, counts, out=c)
    assert torch.isfinite(c).all()
    want = ref.fp8_grouped_gemm(aq, a_s, bq, b_s, counts)
    assert rel_error(c, want) <= 1e-3 and calc_diff(c, want) < 1e-6


def test_bf16_gemms(ops, gen):
    a = torch.randn(3000, 2048, device=DEV, generator=gen).bfloat16()
    b = torch.randn(3, 1500, 2048, device=DEV, generator=gen).bfloat16()
    c = poison(torch.empty(3000, 1500, device=DEV))
    ops.bf16_gemm(a, b[0], out=c)
    assert rel_error(c, a.double() @ b[0].double().t()) <= 1e-3
    counts = [1000, 0, 2000]
    cg = poison(torch.empty(3000, 1500, device=DEV))
    ops.bf16_grouped_gemm(a, b, counts, out=cg)
    assert rel_error(cg, ref.bf16_grouped_gemm(a, b, counts)) <= 1e-3


@needs_fp8
def test_fp8_linear_on_gpu_matches_cpu_emulation(gen):
    x = torch.randn(2, 300, 1024, device=DEV, generator=gen)
    w = torch.randn(640, 1024, device=DEV, generator=gen) * 0.03
    g = torch.randn(2, 300, 640, device=DEV, generator=gen)
    results = []
    for device in (DEV, "cpu"):
        xd, wd = x.to(device).requires_grad_(), w.to(device).requires_grad_()
        y = kernels.linear(xd, wd, backend="fp8")
        y.backward(g.to(device))
        results.append([t.detach().cpu() for t in (y, xd.grad, wd.grad)])
    # same quantized operands; only the float32 summation order differs
    for gpu, cpu in zip(*results):
        assert calc_diff(gpu, cpu) < 1e-9


def test_backend_choice_on_this_gpu():
    cap = torch.cuda.get_device_capability()
    hopper = torch.version.hip is None and cap[0] == 9
    assert kernels.backend_for(DEV) == ("fp8" if hopper else "bf16")
    info = kernels.describe_backend(DEV, kernels.backend_for(DEV))
    assert info["capability"] == f"{cap[0]}.{cap[1]}" and info["device_name"]
