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


# Tolerance of GPU vs CPU emulation on the same quantized operands: the Triton kernel lets Hopper's
# FP8 MMA accumulate one 128-wide K block (max_num_imprecise_acc=128) in its ~14-bit accumulator
# (DeepSeek-V3 §3.3.2) before promoting to float32, so each block's partial product is off by up to
# ~2^-13 relative and so is their float32 sum; 4x margin. The CPU emulation sums exactly in float32.
HOPPER_REL_TOL = 2.0**-11


@needs_fp8
@pytest.mark.parametrize("tokens,n,k", [(300, 640, 1024), (1024, 1536, 2048)])
def test_fp8_linear_on_gpu_matches_cpu_emulation(gen, tokens, n, k):
    """Forward, dgrad and wgrad at model shapes (hidden 2048) against the CPU emulation."""
    x = torch.randn(2, tokens, k, device=DEV, generator=gen)
    w = torch.randn(n, k, device=DEV, generator=gen) * 0.03
    g = torch.randn(2, tokens, n, device=DEV, generator=gen)
    results = []
    for device in (DEV, "cpu"):
        xd, wd = x.to(device).requires_grad_(), w.to(device).requires_grad_()
        y = kernels.linear(xd, wd, backend="fp8")
        y.backward(g.to(device))
        results.append([t.detach().cpu() for t in (y, xd.grad, wd.grad)])
    for name, gpu, cpu in zip(("y", "dx", "dw"), *results):
        assert rel_error(gpu, cpu) <= HOPPER_REL_TOL, name


@needs_fp8
def test_fp8_grouped_linear_on_gpu_matches_cpu_emulation(gen):
    """Skewed per-expert counts (one expert empty, one tiny): forward, dgrad and the K-grouped wgrad."""
    counts = [900, 0, 3, 121, 2000]
    x = torch.randn(sum(counts), 2048, device=DEV, generator=gen)
    w = torch.randn(len(counts), 1024, 2048, device=DEV, generator=gen) * 0.03
    g = torch.randn(sum(counts), 1024, device=DEV, generator=gen)
    results = []
    for device in (DEV, "cpu"):
        xd, wd = x.to(device).requires_grad_(), w.to(device).requires_grad_()
        y = kernels.grouped_linear(xd, wd, counts, backend="fp8")
        y.backward(g.to(device))
        results.append([t.detach().cpu() for t in (y, xd.grad, wd.grad)])
    for name, gpu, cpu in zip(("y", "dx", "dw"), *results):
        assert rel_error(gpu, cpu) <= HOPPER_REL_TOL, name
    assert not results[0][2][1].any(), "an expert without tokens has a zero weight gradient"


@needs_fp8
def test_scaled_mm_blockwise_backend_when_present(gen):
    """F.scaled_mm blockwise: probed (not assumed), and where present it matches the reference."""
    from kernels import scaled_mm

    why_not = scaled_mm.unavailable_reason(str(torch.device(DEV)))
    if why_not is not None:
        pytest.skip(f"F.scaled_mm blockwise not usable here: {why_not}")
    a = torch.randn(4096, 2048, device=DEV, generator=gen)
    b = torch.randn(7168, 2048, device=DEV, generator=gen)
    aq, a_s = ref.quant_act_1x128(a)
    for bq, b_s in (ref.quant_weight_128x128(b), ref.quant_act_1x128(b)):
        got = scaled_mm.fp8_gemm(aq, a_s, bq, b_s)
        assert rel_error(got, ref.fp8_gemm(aq, a_s, bq, b_s)) <= HOPPER_REL_TOL


def test_backend_choice_on_this_gpu():
    cap = torch.cuda.get_device_capability()
    hopper = torch.version.hip is None and cap[0] == 9
    assert kernels.backend_for(DEV) == ("fp8" if hopper else "bf16")
    info = kernels.describe_backend(DEV, kernels.backend_for(DEV))
    assert info["capability"] == f"{cap[0]}.{cap[1]}" and info["device_name"]
