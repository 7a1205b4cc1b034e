"""The pure-torch reference kernels (the tests' oracle and the CPU "fp8" path) from first principles."""

import secrets

import pytest
import torch

from kernels import reference as ref
from kernels.layout import AMAX_FLOOR, FP8_DTYPE, FP8_MAX, expert_offsets
from kernels.testing import calc_diff, e4m3_edge_values, poison, rel_error


@pytest.fixture
def gen() -> torch.Generator:
    seed = secrets.randbits(62)
    print(f"random seed {seed}")
    return torch.Generator().manual_seed(seed)


def test_quant_1x128_tile_by_tile(gen):
    x = torch.randn(5, 300, generator=gen)
    x[2, 128:256] = 0.0
    q, s = ref.quant_act_1x128(x)
    assert q.dtype == FP8_DTYPE and s.shape == (5, 3)
    for r in range(5):
        for t, cols in enumerate([slice(0, 128), slice(128, 256), slice(256, 300)]):
            tile = x[r, cols]
            scale = max(tile.abs().max().item(), AMAX_FLOOR) / FP8_MAX
            assert s[r, t].item() == pytest.approx(scale, rel=1e-6)
            want = (tile / s[r, t]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
            assert torch.equal(q[r, cols].view(torch.uint8), want.view(torch.uint8))
    # the zero tile: finite positive scale, zero values
    assert s[2, 1].item() > 0 and not q[2, 128:256].float().any()
    # the tile max maps to ±448 exactly
    assert q.float().abs().amax(dim=1).eq(FP8_MAX).all()


def test_quant_error_bound(gen):
    x = torch.randn(64, 256, generator=gen) * 10
    q, s = ref.quant_act_1x128(x)
    err = (ref.dequant_act_1x128(q, s) - x).abs()
    # E4M3 keeps 3 mantissa bits: relative error ≤ 2^-4 in the normal range, and the subnormal
    # step (2^-9 · scale) bounds the rest.
    bound = torch.maximum(x.abs() * 2.0**-4, s.repeat_interleave(128, dim=1) * 2.0**-10)
    assert (err <= bound * (1 + 1e-6)).all()


def test_layouts_128x1_and_128x128(gen):
    x = torch.randn(300, 130, generator=gen)
    q_t, s_t = ref.quant_act_128x1(x)
    assert q_t.shape == (130, 300) and s_t.shape == (130, 3) and q_t.is_contiguous()
    for c in (0, 129):
        for t, rows in enumerate([slice(0, 128), slice(128, 256), slice(256, 300)]):
            assert s_t[c, t].item() == pytest.approx(x[rows, c].abs().max().item() / FP8_MAX, rel=1e-6)
    w = torch.randn(130, 300, generator=gen)
    q, s = ref.quant_weight_128x128(w)
    assert s.shape == (2, 3)
    assert s[1, 2].item() == pytest.approx(w[128:, 256:].abs().max().item() / FP8_MAX, rel=1e-6)
    deq = ref.dequant_weight_128x128(q, s)
    assert calc_diff(deq, w) < 1e-3


def test_edge_values_cover_the_carry_cases():
    v = e4m3_edge_values()
    assert v.abs().max() <= FP8_MAX and (v == 31.08).any() and (v == -126.24).any()
    assert v.to(FP8_DTYPE).float()[v == torch.tensor(31.08)].item() == 32.0


def test_fp8_gemm_matches_float64_and_unquantized(gen):
    a = torch.randn(96, 384, generator=gen)
    b = torch.randn(200, 384, generator=gen)
    aq, a_s = ref.quant_act_1x128(a)
    bq, b_s = ref.quant_weight_128x128(b)
    c = ref.fp8_gemm(aq, a_s, bq, b_s)
    want = ref.dequant_act_1x128(aq, a_s).double() @ ref.dequant_weight_128x128(bq, b_s).double().t()
    assert rel_error(c, want) < 1e-5
    assert calc_diff(c, a.double() @ b.double().t()) < 1e-3
    # 1x128 right operand (the weight-grad form) reads per-row scales
    bq1, b_s1 = ref.quant_act_1x128(b)
    c1 = ref.fp8_gemm(aq, a_s, bq1, b_s1)
    assert rel_error(c1, ref.dequant_act_1x128(aq, a_s).double() @ ref.dequant_act_1x128(bq1, b_s1).double().t()) < 1e-5


def test_grouped_gemm_is_per_expert(gen):
    a = torch.randn(50, 130, generator=gen)
    b = torch.randn(3, 70, 130, generator=gen)
    aq, a_s = ref.quant_act_1x128(a)
    pairs = [ref.quant_weight_128x128(b[i]) for i in range(3)]
    bq, b_s = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    c = ref.fp8_grouped_gemm(aq, a_s, bq, b_s, [0, 20, 20, 50])
    assert torch.equal(c[:20], ref.fp8_gemm(aq[:20], a_s[:20], *pairs[0]))
    assert torch.equal(c[20:], ref.fp8_gemm(aq[20:], a_s[20:], *pairs[2]))
    cb = ref.bf16_grouped_gemm(a, b, [20, 0, 30], torch.bfloat16)
    assert torch.equal(cb[20:], ref.bf16_gemm(a[20:], b[2], torch.bfloat16))


def test_expert_offsets():
    assert expert_offsets([2, 0, 3], 3, 5) == [0, 2, 2, 5]
    assert expert_offsets(torch.tensor([0, 2, 2, 5]), 3, 5) == [0, 2, 2, 5]
    with pytest.raises(ValueError, match="add up"):
        expert_offsets([2, 0, 2], 3, 5)
    with pytest.raises(ValueError, match="pass 3 per-expert counts or 4 offsets"):
        expert_offsets([5], 3, 5)
    with pytest.raises(ValueError, match="not decrease"):
        expert_offsets([0, 3, 2, 5], 3, 5)


def test_grouped_128x1_offsets_checked():
    """Decreasing offsets would give a negative expert a tile count and a wrong layout, not an error."""
    x = torch.ones(5, 8)
    for bad in ([0, 3, 2, 5], [0, 3], [5]):
        with pytest.raises(ValueError, match="offsets must run from 0 to the 5 rows of x without decreasing"):
            ref.quant_act_128x1_grouped(x, bad)


def test_metrics_flag_nan():
    x = torch.ones(4)
    assert calc_diff(x, x) == 0.0 and rel_error(x, x) == 0.0
    y = x.clone()
    y[1] = float("nan")
    assert rel_error(y, x) == float("inf")
    assert not calc_diff(y, x) < 1e-3
    assert poison(torch.empty(3, dtype=FP8_DTYPE)).float().isnan().all()
