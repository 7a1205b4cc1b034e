"""Triton kernels against the torch reference and float64 math.

Without CUDA this runs the kernels in the Triton interpreter (TRITON_INTERPRET=1, set below
before the kernels are imported); with CUDA it runs them compiled on the GPU. Inputs are fresh
random draws every run (the seed is printed and shown on failure); outputs are poisoned with NaN
first so an element a kernel forgets to write fails the comparison.
"""

import importlib
import os
import secrets

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")

from kernels import reference as ref  # noqa: E402
from kernels import triton_ops  # noqa: E402
from kernels.layout import AMAX_FLOOR, FP8_DTYPE, FP8_MAX, cdiv  # noqa: E402
from kernels.testing import calc_diff, e4m3_edge_values, poison, rel_error  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if triton_ops.INTERPRET != (DEVICE == "cpu"):
    # Another module imported the kernels before TRITON_INTERPRET was set: rebuild them.
    triton_ops = importlib.reload(triton_ops)


@pytest.fixture
def gen() -> torch.Generator:
    seed = secrets.randbits(62)
    print(f"random seed {seed}")
    return torch.Generator().manual_seed(seed)


def _bits(q: torch.Tensor) -> torch.Tensor:
    return q.view(torch.uint8).cpu()


def _edge_tiles(scale: float) -> torch.Tensor:
    """``[tiles, 128]``: each row a tile whose amax is ``448·scale`` and whose other values are
    ``edge·scale`` for the e4m3 rounding edge values, so the scaled values sit on those edges."""
    edges = e4m3_edge_values()
    rows = cdiv(edges.numel(), 127)
    body = torch.zeros(rows * 127)
    body[: edges.numel()] = edges
    tiles = torch.cat([torch.full((rows, 1), FP8_MAX), body.reshape(rows, 127)], dim=1)
    return tiles * scale


def _activations(m: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Random ``[m, k]`` with magnitudes spread over 2^-10..2^10 per row, a zero tile, and -0.0."""
    x = torch.randn(m, k, generator=gen) * torch.exp2(torch.randint(-10, 10, (m, 1), generator=gen).float())
    x[m // 2, : min(k, 128)] = 0.0
    x[0, 0] = -0.0
    return x


def _quant_outputs(q_shape, s_shape):
    return (
        poison(torch.empty(q_shape, dtype=FP8_DTYPE, device=DEVICE)),
        poison(torch.empty(s_shape, dtype=torch.float32, device=DEVICE)),
    )


@pytest.mark.parametrize("shape", [(1, 1), (3, 130), (200, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_act_1x128_bits(shape, dtype, gen):
    x = _activations(*shape, gen).to(dtype)
    q, s = _quant_outputs(shape, (shape[0], cdiv(shape[1], 128)))
    triton_ops.quant_act_1x128(x.to(DEVICE), out=(q, s))
    want_q, want_s = ref.quant_act_1x128(x)
    assert torch.equal(s.cpu(), want_s), "scales differ from the reference"
    # torch's own cast of the same scaled values, with the kernel's scales
    scaled = (x.float() / want_s.repeat_interleave(128, dim=1)[:, : shape[1]]).clamp(-FP8_MAX, FP8_MAX)
    assert torch.equal(_bits(q), _bits(scaled.to(FP8_DTYPE)))
    assert torch.equal(_bits(q), _bits(want_q))


@pytest.mark.parametrize("shape", [(1, 1), (130, 3), (300, 200)])
def test_quant_act_128x1_bits_and_layout(shape, gen):
    x = _activations(*shape, gen).t().contiguous().t()  # column-major input: strides are honoured
    m, k = shape
    q, s = _quant_outputs((k, m), (k, cdiv(m, 128)))
    triton_ops.quant_act_128x1(x.to(DEVICE), out=(q, s))
    want_q, want_s = ref.quant_act_1x128(x.t())  # 128x1 of x is 1x128 of xᵀ
    assert torch.equal(s.cpu(), want_s)
    assert torch.equal(_bits(q), _bits(want_q))


@pytest.mark.parametrize("shape", [(1, 1), (130, 257), (256, 128)])
def test_quant_weight_128x128_bits(shape, gen):
    w = torch.randn(*shape, generator=gen) * 0.02
    w[:128, :128] = 0.0  # an all-zero block
    q, s = _quant_outputs(shape, (cdiv(shape[0], 128), cdiv(shape[1], 128)))
    triton_ops.quant_weight_128x128(w.to(DEVICE), out=(q, s))
    want_q, want_s = ref.quant_weight_128x128(w)
    assert torch.equal(s.cpu(), want_s)
    assert torch.equal(_bits(q), _bits(want_q))
    assert s.cpu()[0, 0].item() == pytest.approx(AMAX_FLOOR / FP8_MAX) and not _bits(q)[:128, :128].any()


@pytest.mark.parametrize("scale", [1.0, 0.125, 0.37, 3.0e-3])
def test_quant_binade_edges(scale):
    """Scaled values on e4m3 rounding midpoints and carries (31.08 -> 32): exact in all three layouts."""
    tiles = _edge_tiles(scale)
    x = tiles.to(DEVICE)
    q, s = triton_ops.quant_act_1x128(x)
    want_q, want_s = ref.quant_act_1x128(tiles)
    assert torch.equal(s.cpu(), want_s) and torch.equal(_bits(q), _bits(want_q))
    q, s = triton_ops.quant_act_128x1(x.t())
    assert torch.equal(s.cpu(), want_s) and torch.equal(_bits(q), _bits(want_q))
    q, s = triton_ops.quant_weight_128x128(x)
    want_q, want_s = ref.quant_weight_128x128(tiles)
    assert torch.equal(s.cpu(), want_s) and torch.equal(_bits(q), _bits(want_q))
    if scale == 1.0:
        # the scale is exactly 1, so the check is against torch's cast of the edge values themselves
        assert torch.equal(_bits(q), _bits(tiles.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)))


@pytest.mark.skipif(DEVICE != "cpu", reason="about the CPU interpreter's cast")
def test_edge_values_catch_a_kernel_that_trusts_the_interpreter_cast():
    """The binade-edge inputs above do fail a kernel that casts float32 -> e4m3 directly."""
    tl = triton.language

    @triton.jit
    def naive_cast(x_ptr, q_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
        tl.store(q_ptr + offs, x.to(tl.float8e4nv), mask=offs < n)

    x = e4m3_edge_values()
    q = poison(torch.empty(x.numel(), dtype=FP8_DTYPE))
    naive_cast[(1,)](x, q, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    assert not torch.equal(_bits(q), _bits(x.to(FP8_DTYPE)))
    assert q[x == 31.08].float().item() != 32.0 or q[x == 126.24].float().item() != 128.0


def _same_with_nan(mine: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal NaN positions, equal bits elsewhere (a NaN's sign and payload are not compared)."""
    mine, want = mine.cpu(), want.cpu()
    mine_nan, want_nan = mine.float().isnan(), want.float().isnan()
    if not torch.equal(mine_nan, want_nan):
        return False
    if mine.dtype == FP8_DTYPE:
        return torch.equal(_bits(mine)[~mine_nan], _bits(want)[~want_nan])
    return torch.equal(mine[~mine_nan], want[~want_nan])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_quantizers_propagate_nan_and_inf_as_torch_does(gen):
    """A NaN in a tile makes its scale and values NaN, an Inf makes the scale Inf (torch's amax and
    clamp propagate NaN; Triton's tl.max / tl.clamp drop it unless told not to)."""
    x = torch.randn(130, 260, generator=gen)
    x[3, 5] = float("nan")  # 1x128 tile (3, 0); 128x1 tile (0, 5); 128x128 block (0, 0)
    x[129, 200] = float("inf")
    x[64, 140] = float("-inf")
    for mine, want in [
        (triton_ops.quant_act_1x128(x.to(DEVICE)), ref.quant_act_1x128(x)),
        (triton_ops.quant_act_128x1(x.to(DEVICE)), ref.quant_act_128x1(x)),
        (triton_ops.quant_weight_128x128(x.to(DEVICE)), ref.quant_weight_128x128(x)),
    ]:
        assert want[1].isnan().any() and want[1].isinf().any(), "the reference must see the NaN and the Infs"
        assert _same_with_nan(mine[1], want[1]), "scales: NaN/Inf not propagated as torch does"
        assert _same_with_nan(mine[0], want[0]), "values: NaN/Inf not propagated as torch does"


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_dequant(out_dtype, gen):
    x = _activations(70, 300, gen)
    q, s = ref.quant_act_1x128(x)
    y = poison(torch.empty(70, 300, dtype=out_dtype, device=DEVICE))
    triton_ops.dequant_act_1x128(q.to(DEVICE), s.to(DEVICE), out_dtype, out=y)
    assert torch.equal(y.cpu(), ref.dequant_act_1x128(q, s, out_dtype))
    w = torch.randn(200, 130, generator=gen)
    q, s = ref.quant_weight_128x128(w)
    y = poison(torch.empty(200, 130, dtype=out_dtype, device=DEVICE))
    triton_ops.dequant_weight_128x128(q.to(DEVICE), s.to(DEVICE), out_dtype, out=y)
    assert torch.equal(y.cpu(), ref.dequant_weight_128x128(q, s, out_dtype))


def _gemm_checks(c: torch.Tensor, deq_a: torch.Tensor, deq_b: torch.Tensor, exact: torch.Tensor | None = None):
    """c against float64 math on the dequantized inputs (and, optionally, on the unquantized ones)."""
    want = deq_a.double() @ deq_b.double().t()
    c = c.cpu()
    assert torch.isfinite(c).all(), "NaN/Inf in the output (unwritten or broken elements)"
    assert rel_error(c, want) <= 1e-3
    assert calc_diff(c, want) < 1e-3
    if exact is not None:
        assert calc_diff(c, exact) < 1e-3


@pytest.mark.parametrize("m,n,k", [(150, 260, 300), (1, 1, 1), (64, 128, 256)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_fp8_gemm_block_scaled(m, n, k, out_dtype, gen):
    a = torch.randn(m, k, generator=gen)
    b = torch.randn(n, k, generator=gen)
    aq, a_s = ref.quant_act_1x128(a)
    bq, b_s = ref.quant_weight_128x128(b)
    c = poison(torch.empty(m, n, dtype=out_dtype, device=DEVICE))
    triton_ops.fp8_gemm(aq.to(DEVICE), a_s.to(DEVICE), bq.to(DEVICE), b_s.to(DEVICE), out_dtype, out=c)
    exact = a.double() @ b.double().t() if k >= 128 else None
    if out_dtype == torch.float32:
        _gemm_checks(c, ref.dequant_act_1x128(aq, a_s), ref.dequant_weight_128x128(bq, b_s), exact)
    else:
        c32 = triton_ops.fp8_gemm(aq.to(DEVICE), a_s.to(DEVICE), bq.to(DEVICE), b_s.to(DEVICE))
        assert torch.equal(c.cpu(), c32.cpu().bfloat16()), "bf16 output is not the rounded float32 result"


def test_fp8_gemm_1x128_operands_weight_grad_layout(gen):
    """Weight-grad form: both operands quantized 128x1 (tokens = K), transposed by the quantizer."""
    g = torch.randn(200, 130, generator=gen)  # [tokens, out]
    x = torch.randn(200, 150, generator=gen)  # [tokens, in]
    gq, gs = triton_ops.quant_act_128x1(g.to(DEVICE))
    xq, xs = triton_ops.quant_act_128x1(x.to(DEVICE))
    c = poison(torch.empty(130, 150, device=DEVICE))
    triton_ops.fp8_gemm(gq, gs, xq, xs, out=c)
    deq_g = ref.dequant_act_1x128(gq.cpu(), gs.cpu())
    deq_x = ref.dequant_act_1x128(xq.cpu(), xs.cpu())
    _gemm_checks(c, deq_g, deq_x, g.double().t() @ x.double())


@pytest.mark.parametrize("counts", [[70, 0, 130, 1], [0, 0, 5]])
def test_fp8_grouped_gemm(counts, gen):
    e, n, k = len(counts), 150, 200
    t = sum(counts)
    a = torch.randn(t, k, generator=gen)
    b = torch.randn(e, n, k, generator=gen)
    aq, a_s = ref.quant_act_1x128(a)
    pairs = [ref.quant_weight_128x128(b[i]) for i in range(e)]
    bq, b_s = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    c = poison(torch.empty(t, n, device=DEVICE))
    triton_ops.fp8_grouped_gemm(aq.to(DEVICE), a_s.to(DEVICE), bq.to(DEVICE), b_s.to(DEVICE), counts, out=c)
    deq_a = ref.dequant_act_1x128(aq, a_s)
    lo = 0
    for i, cnt in enumerate(counts):
        if cnt:
            _gemm_checks(c[lo : lo + cnt], deq_a[lo : lo + cnt], ref.dequant_weight_128x128(*pairs[i]))
        lo += cnt


def test_grouped_128x1_quant_and_k_grouped_wgrad(gen):
    """The MoE weight gradient: per-expert 128x1 tiles padded to whole tiles (bits equal to the
    reference, padding zero), and all experts' dW[e] = g_eᵀ x_e from one K-grouped launch."""
    offsets = [0, 70, 70, 200, 201]  # counts 70, 0, 130, 1
    g = torch.randn(201, 150, generator=gen)
    x = _activations(201, 100, gen)
    out = []
    for t in (g, x):
        q, s, tiles = triton_ops.quant_act_128x1_grouped(t.to(DEVICE), offsets)
        want_q, want_s, want_tiles = ref.quant_act_128x1_grouped(t, offsets)
        assert tiles == want_tiles == [0, 128, 128, 384, 512]
        assert torch.equal(s.cpu(), want_s) and torch.equal(_bits(q), _bits(want_q))
        out.append((q, s))
    (gq, gs), (xq, xs) = out
    c = poison(torch.empty(4, 150, 100, device=DEVICE))
    triton_ops.fp8_grouped_wgrad(gq, gs, xq, xs, tiles, out=c)
    want = ref.fp8_grouped_wgrad(gq.cpu(), gs.cpu(), xq.cpu(), xs.cpu(), tiles)
    assert torch.equal(c[1].cpu(), torch.zeros(150, 100)), "an expert without tokens has a zero gradient"
    for e, (lo, hi) in enumerate(zip(offsets, offsets[1:])):
        if hi > lo:
            _gemm_checks(c[e], ref.dequant_act_1x128(*ref.quant_act_128x1(g[lo:hi])),
                         ref.dequant_act_1x128(*ref.quant_act_128x1(x[lo:hi])))
            assert rel_error(c[e], want[e]) <= 1e-5


def test_bf16_grouped_linear_backward_is_one_k_grouped_launch(gen, monkeypatch):
    """The BF16 MoE weight gradient through the K-grouped kernel (as on a GPU) equals the
    per-expert torch loop up to BF16 output rounding; experts without tokens get zeros."""
    kl = importlib.import_module("kernels.linear")  # the module (kernels.linear is also a function name)

    counts = [70, 0, 130, 1]
    x = torch.randn(sum(counts), 96, generator=gen)
    w = torch.randn(4, 80, 96, generator=gen) * 0.1
    g = torch.randn(sum(counts), 80, generator=gen)
    grads = {}
    for triton_path in (True, False):
        monkeypatch.setattr(kl, "_bf16_grouped_triton", lambda device, on=triton_path: on)
        xd, wd = x.clone().to(DEVICE).requires_grad_(), w.clone().to(DEVICE).requires_grad_()
        kl.grouped_linear(xd, wd, counts, backend="bf16").backward(g.to(DEVICE))
        grads[triton_path] = wd.grad.cpu()
    assert not grads[True][1].any()
    assert rel_error(grads[True], grads[False]) <= 2.0**-7


def test_bf16_gemms(gen):
    a = torch.randn(150, 200, generator=gen).bfloat16()
    b = torch.randn(130, 200, generator=gen).bfloat16()
    c = poison(torch.empty(150, 130, device=DEVICE))
    triton_ops.bf16_gemm(a.to(DEVICE), b.to(DEVICE), out=c)
    _gemm_checks(c, a.float(), b.float())
    cb = poison(torch.empty(150, 130, dtype=torch.bfloat16, device=DEVICE))
    triton_ops.bf16_gemm(a.to(DEVICE), b.to(DEVICE), torch.bfloat16, out=cb)
    assert torch.equal(cb.cpu(), c.cpu().bfloat16())
    counts = [40, 0, 110]
    bg = torch.randn(3, 130, 200, generator=gen).bfloat16()
    cg = poison(torch.empty(150, 130, device=DEVICE))
    triton_ops.bf16_grouped_gemm(a.to(DEVICE), bg.to(DEVICE), counts, out=cg)
    _gemm_checks(cg[:40], a[:40].float(), bg[0].float())
    _gemm_checks(cg[40:], a[40:].float(), bg[2].float())


def test_autotune_key_buckets_token_counts():
    """The dense GEMM's autotune key: per-microbatch / per-expert token counts within a power of two
    share a key (one tuning), so a new count does not re-tune; the weight dims stay exact."""
    assert {triton_ops.tune_bucket(m) for m in (2049, 3000, 4096)} == {4096}
    assert triton_ops.tune_bucket(4097) == 8192 and triton_ops.tune_bucket(1) == triton_ops.tune_bucket(16) == 16


def test_argument_errors():
    a = torch.zeros(4, 130, dtype=FP8_DTYPE, device=DEVICE)
    s = torch.ones(4, 2, device=DEVICE)
    with pytest.raises(ValueError, match="b_scale"):
        triton_ops.fp8_gemm(a, s, a, torch.ones(3, 2, device=DEVICE))
    with pytest.raises(ValueError, match="a_scale"):
        triton_ops.fp8_gemm(a, s[:, :1], a, s)
    with pytest.raises(ValueError, match="bfloat16"):
        triton_ops.bf16_gemm(a.float(), a.float())
    with pytest.raises(ValueError, match="out"):
        triton_ops.fp8_gemm(a, s, a, s, out=torch.empty(3, 3, device=DEVICE))
    with pytest.raises(ValueError, match="add up"):
        triton_ops.fp8_grouped_gemm(a, s, a[None], s[None], [3])
