"""The "fp8" backend on the CPU is exactly the composition of the reference pieces, it really
quantizes, and its caches are right. Each test names the bug it catches:

- bit-for-bit composition: a layer that quantizes the wrong operand or layout (1x128 instead of
  128x1 for the weight gradient, W's blocks not transposed for dgrad), skips a quantization, or
  uses a stale FP8 weight copy;
- the FP8-vs-FP32 gap: a path that silently stopped quantizing (falls back to BF16/FP32 math)
  would still pass every "close to FP32" check; here its error must be FP8-sized, far above BF16's;
- the weight cache: re-quantizing every microbatch (cost), or never re-quantizing after the
  optimizer step (wrong numbers);
- what the backward keeps: full-precision activations held until W.
"""

import secrets

import pytest
import torch

from actors.optim import AdamW, OptimConfig
from kernels import WeightGradDeferral, grouped_linear, linear
from kernels import reference as ref
from kernels.layout import FP8_DTYPE
from kernels.testing import calc_diff


@pytest.fixture
def gen() -> torch.Generator:
    seed = secrets.randbits(62)
    print(f"random seed {seed}")
    return torch.Generator().manual_seed(seed)


def _fwd_bwd(fn, x, w, g, *extra):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    y = fn(x, w, *extra)
    y.backward(g)
    return y.detach(), x.grad, w.grad


def test_fp8_linear_is_the_reference_composition_bit_for_bit(gen):
    x = torch.randn(2, 70, 300, generator=gen)
    w = torch.randn(260, 300, generator=gen) * 0.05
    g = torch.randn(2, 70, 260, generator=gen)  # a non-constant output gradient
    y, dx, dw = _fwd_bwd(lambda a, b: linear(a, b, backend="fp8"), x, w, g)
    x2, g2 = x.reshape(-1, 300), g.reshape(-1, 260)
    want_y = ref.fp8_gemm(*ref.quant_act_1x128(x2), *ref.quant_weight_128x128(w))
    # dgrad against Wᵀ quantized on its own (128x128 blocks of Wᵀ): the layer transposes W's blocks
    want_dx = ref.fp8_gemm(*ref.quant_act_1x128(g2), *ref.quant_weight_128x128(w.t().contiguous()))
    # wgrad: both operands 128x1 (per channel, per 128 tokens)
    want_dw = ref.fp8_gemm(*ref.quant_act_128x1(g2), *ref.quant_act_128x1(x2))
    assert torch.equal(y.reshape(-1, 260), want_y)
    assert torch.equal(dx.reshape(-1, 300), want_dx)
    assert torch.equal(dw, want_dw)


def test_fp8_grouped_linear_is_the_reference_composition_bit_for_bit(gen):
    counts = [70, 0, 200, 3]
    offs = [0, 70, 70, 270, 273]
    x = torch.randn(273, 300, generator=gen)
    w = torch.randn(4, 128, 300, generator=gen) * 0.05  # N = 128: experts quantized stacked
    g = torch.randn(273, 128, generator=gen)
    y, dx, dw = _fwd_bwd(lambda a, b: grouped_linear(a, b, counts, backend="fp8"), x, w, g)
    xq, xs = ref.quant_act_1x128(x)
    gq, gs = ref.quant_act_1x128(g)
    for e in range(4):
        lo, hi = offs[e], offs[e + 1]
        wq, ws = ref.quant_weight_128x128(w[e])
        assert torch.equal(y[lo:hi], ref.fp8_gemm(xq[lo:hi], xs[lo:hi], wq, ws)), e
        wtq, wts = ref.quant_weight_128x128(w[e].t().contiguous())
        assert torch.equal(dx[lo:hi], ref.fp8_gemm(gq[lo:hi], gs[lo:hi], wtq, wts)), e
        if hi > lo:
            want = ref.fp8_gemm(*ref.quant_act_128x1(g[lo:hi]), *ref.quant_act_128x1(x[lo:hi]))
        else:
            want = torch.zeros(128, 300)
        assert torch.equal(dw[e], want), e


def test_fp8_differs_from_fp32_by_an_fp8_sized_amount(gen):
    """E4M3 keeps 3 mantissa bits, BF16 7: FP8's squared error (calc_diff) is ~2^8 times BF16's.
    A path that stopped quantizing lands at BF16's level or below and fails the lower bound."""
    x = torch.randn(256, 384, generator=gen)
    w = torch.randn(256, 384, generator=gen) * 0.05
    g = torch.randn(256, 256, generator=gen)
    results = {b: _fwd_bwd(lambda a, ww: linear(a, ww, backend=b), x, w, g) for b in ("fp32", "bf16", "fp8")}
    counts = [100, 0, 156]
    we = torch.randn(3, 256, 384, generator=gen) * 0.05
    grouped = {b: _fwd_bwd(lambda a, ww: grouped_linear(a, ww, counts, backend=b), x, we, g)
               for b in ("fp32", "bf16", "fp8")}
    for table in (results, grouped):
        for i, name in enumerate(("y", "dx", "dw")):
            d8 = calc_diff(table["fp8"][i], table["fp32"][i])
            d16 = calc_diff(table["bf16"][i], table["fp32"][i])
            assert 1e-5 < d8 < 2e-3, f"{name}: FP8 vs FP32 calc_diff {d8:.2e} is not FP8-sized"
            assert d8 > 20 * d16, f"{name}: FP8 error {d8:.2e} not well above BF16's {d16:.2e}: not quantizing?"


def test_weight_quantized_once_per_optimizer_step(gen, monkeypatch):
    calls = []
    real = ref.quant_weight_128x128
    monkeypatch.setattr(ref, "quant_weight_128x128", lambda w: (calls.append(tuple(w.shape)), real(w))[1])
    w = torch.nn.Parameter(torch.randn(130, 200, generator=gen) * 0.05)
    we = torch.nn.Parameter(torch.randn(2, 128, 130, generator=gen) * 0.05)
    opt = AdamW([w, we], OptimConfig(lr=1e-2, warmup_steps=0))

    def microbatch(x):
        y = grouped_linear(linear(x, w, backend="fp8"), we, [5, 11], backend="fp8")
        y.backward(torch.randn(y.shape, generator=gen))
        return y.detach()

    x = torch.randn(16, 200, generator=gen)
    for _ in range(3):  # three microbatches of one step
        microbatch(x)
    assert len(calls) == 2, f"expected one quantization per weight per step, got {calls}"
    opt.step(global_norm=1.0)
    y = microbatch(x)
    assert len(calls) == 4, "the optimizer step must invalidate the FP8 copies"
    # the fresh copy is the updated weight's (not a stale one): compare with the composition
    h = ref.fp8_gemm(*ref.quant_act_1x128(x), *real(w.detach()))
    want = torch.cat([ref.fp8_gemm(*ref.quant_act_1x128(h[:5]), *real(we[0].detach())),
                      ref.fp8_gemm(*ref.quant_act_1x128(h[5:]), *real(we[1].detach()))])
    assert torch.equal(y, want)
    with torch.no_grad():
        w.add_(1e-3)  # any in-place write invalidates as well
    microbatch(x)
    assert len(calls) == 5


def test_backward_keeps_fp8_copies_not_activations(gen):
    """What the B and the deferred W hold of x: 128x1 FP8 tiles and their scales, never x itself."""
    x = torch.randn(256, 384, generator=gen, requires_grad=True)
    w = torch.randn(256, 384, generator=gen, requires_grad=True)
    we = torch.randn(2, 128, 256, generator=gen, requires_grad=True)
    h = linear(x, w, backend="fp8")
    y = grouped_linear(h, we, [100, 156], backend="fp8")
    for node, act in ((h.grad_fn, x), (y.grad_fn, h)):
        kept = [t for t in node.saved_tensors]
        big_float = [t for t in kept if t.is_floating_point() and t.dtype != FP8_DTYPE and t.numel() >= act.numel()
                     and t is not w and t is not we]
        assert not big_float, f"{node.name()} keeps full-precision tensors {[tuple(t.shape) for t in big_float]}"
        assert any(t.dtype == FP8_DTYPE for t in kept)
    with WeightGradDeferral([w, we]).capture() as pending:
        y.backward(torch.randn(y.shape, generator=gen))
    assert len(pending) == 2
    for fn in pending:  # the closures hold FP8 operands and small scales (and the weight to accumulate into)
        held = [t for t in _closure_tensors(fn) if t is not w and t is not we]
        assert any(t.dtype == FP8_DTYPE for t in held)
        big = [tuple(t.shape) for t in held if t.dtype != FP8_DTYPE and t.numel() >= 256 * 128]
        assert not big, f"W holds full-precision tensors {big}"


def _closure_tensors(fn, seen=None) -> list[torch.Tensor]:
    """Every tensor reachable through ``fn``'s closure cells (nested closures included)."""
    seen = set() if seen is None else seen
    found = []
    for cell in fn.__closure__ or ():
        v = cell.cell_contents
        if id(v) in seen:
            continue
        seen.add(id(v))
        if torch.is_tensor(v):
            found.append(v)
        elif isinstance(v, (tuple, list)):
            found.extend(t for t in v if torch.is_tensor(t))
        elif callable(v) and getattr(v, "__closure__", None):
            found.extend(_closure_tensors(v, seen))
    return found


def test_scaled_mm_scale_layouts_and_probe_on_cpu():
    """F.scaled_mm's blockwise layouts from ours (outer-dim-major 1x128; 128x128 padded to a multiple
    of 4 K blocks and transposed), and no blockwise backend claimed where there is no Hopper GPU."""
    from kernels import scaled_mm

    a_s, w_s, g_s = torch.rand(300, 5), torch.rand(3, 5), torch.rand(260, 5)
    sa, sb, recipe = scaled_mm.scaled_mm_scales(a_s, w_s, 260)
    assert recipe == "BlockWise128x128" and sa.stride() == (1, 300) and torch.equal(sa, a_s)
    assert sb.shape == (8, 3) and sb.stride() == (1, 8) and torch.equal(sb[:5], w_s.t()) and not sb[5:].any()
    sa, sb, recipe = scaled_mm.scaled_mm_scales(a_s, g_s, 260)
    assert recipe == "BlockWise1x128" and sb.stride() == (1, 260) and torch.equal(sb, g_s)
    assert not scaled_mm.available("cpu")
    assert scaled_mm.unavailable_reason("cpu") in ("device cpu is not a CUDA GPU",
                                                    f"torch {torch.__version__} has no F.scaled_mm / F.ScalingType")
    assert scaled_mm.supports(128, 7168, 2048) and not scaled_mm.supports(128, 7168, 2000)
