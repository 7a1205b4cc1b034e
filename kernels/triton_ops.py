"""Triton kernels: FP8 (E4M3) block quantization, dequantization, block-scaled GEMMs, and BF16 GEMMs.

Same functions and semantics as :mod:`kernels.reference`; each also takes ``out=`` buffers (the
tests poison them to catch unwritten elements). Layouts: see :mod:`kernels.layout`.

Casts. Every narrowing cast in these kernels (float32 -> e4m3, float32 -> bfloat16) is preceded
by an explicit round-to-nearest-even onto the target grid done in float32/int32 arithmetic
(:func:`_round_e4m3`, :func:`_round_bf16`), so the cast itself only ever sees exactly
representable values. The Triton CPU interpreter's own narrowing casts are wrong (31.08 -> 16
instead of 32 for e4m3, truncation for bfloat16); exact values cast correctly everywhere, so the
kernels give torch's bit patterns in the interpreter and on a GPU alike, from one code path.
Divisions use ``div_rn`` (IEEE) because Triton's ``/`` is an approximate division on NVIDIA GPUs
and the bit patterns must equal torch's ``x / scale``.

NaN and Inf. The quantizers give torch's (the reference's) results: a NaN in a tile makes its
scale and all its values NaN, an Inf makes the scale Inf, the Inf a NaN and the rest zeros.
Triton's ``tl.max``/``tl.maximum``/``tl.clamp`` drop NaNs by default (the hardware min/max
return the other operand), which would hide a NaN behind a finite scale: the tile max is made
NaN when the tile holds one (a second, integer max reduction), and the element-wise
max/clamp use ``propagate_nan=ALL``.

GEMMs. FP8: each 128-wide K block is one ``tl.dot`` into a fresh float32 partial, scaled by the
block's activation and weight scales and added to a float32 accumulator: the per-128 promotion
of DeepSeek-V3 (the FP8 tensor-core accumulator is not trusted across K blocks). BF16: plain
``tl.dot`` accumulation in float32. The grouped variant runs all experts in one launch from a
host-built tile map (expert, first row, end row) over the contiguous layout. The MoE weight
gradient is grouped along K instead (each expert's tokens are the reduction axis): one launch,
a grid axis per expert, each program reducing over its expert's 128-token tiles only.
Autotuning: the dense GEMM is tuned per (M, K) bucketed to powers of two (token counts vary per
microbatch; an exact key would re-tune on every new count), the grouped ones use fixed configs.

The interpreter's ``tl.dot`` on bfloat16 adds raw bits, so under ``TRITON_INTERPRET=1`` the
GEMM kernel upcasts its tiles to float32 first (exact for bf16/e4m3 values); on a GPU the tiles
go to the tensor cores as they are. Whether the interpreter is used is fixed when this module is
imported (that is when ``@triton.jit`` decides), so set ``TRITON_INTERPRET`` before importing it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from kernels.layout import (
    AMAX_FLOOR,
    BLOCK,
    FP8_DTYPE,
    FP8_MAX,
    b_scale_rows,
    cdiv,
    check_gemm,
    check_grouped_wgrad,
    check_offsets,
    expert_offsets,
    tile_offsets,
)

__all__ = [
    "INTERPRET",
    "quant_act_1x128",
    "quant_act_128x1",
    "quant_act_128x1_grouped",
    "quant_weight_128x128",
    "dequant_act_1x128",
    "dequant_weight_128x128",
    "fp8_gemm",
    "fp8_grouped_gemm",
    "fp8_grouped_wgrad",
    "tune_bucket",
    "bf16_gemm",
    "bf16_grouped_gemm",
    "bf16_grouped_wgrad",
]

INTERPRET: bool = bool(triton.knobs.runtime.interpret)

_FP8_MAX = tl.constexpr(FP8_MAX)
_AMAX_FLOOR = tl.constexpr(AMAX_FLOOR)
# Smallest normal e4m3 magnitude (2^-6); below it the grid step is the subnormal step 2^-9.
_E4M3_MIN_NORMAL = tl.constexpr(2.0**-6)
# Adding 2^14 puts a value below 2^-6 where float32's step is exactly 2^-9 (2^(14-23)), so the
# add rounds it (to nearest even) onto the e4m3 subnormal grid; subtracting 2^14 is then exact.
_E4M3_SUBNORMAL_SHIFT = tl.constexpr(16384.0)


@triton.jit
def _round_e4m3(v):
    """Round float32 ``v`` (|v| ≤ 448) to the nearest e4m3 value, ties to even, kept in float32."""
    bits = v.to(tl.int32, bitcast=True)
    sign = bits & -2147483648
    mag_bits = bits & 0x7FFFFFFF
    mag = mag_bits.to(tl.float32, bitcast=True)
    # Normal range: keep 3 of float32's 23 mantissa bits, round-half-even on the 20 dropped bits;
    # a carry out of the mantissa correctly bumps the exponent (31.08 -> 32).
    normal = ((mag_bits + 0x7FFFF + ((mag_bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
    subnormal = (mag + _E4M3_SUBNORMAL_SHIFT) - _E4M3_SUBNORMAL_SHIFT
    r = tl.where(mag >= _E4M3_MIN_NORMAL, normal, subnormal)
    # Re-attach the sign bit so that -0.0 and tiny negatives give e4m3's negative zero as torch does.
    r = (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    # The bit trick could turn a NaN into a finite value: pass NaN through untouched.
    return tl.where(v != v, v, r)


@triton.jit
def _amax(ax, axis: tl.constexpr):
    """``max(ax)`` along ``axis`` that is NaN if any element is (``tl.max`` skips NaNs)."""
    has_nan = tl.max((ax != ax).to(tl.int32), axis=axis)
    return tl.where(has_nan > 0, float("nan"), tl.max(ax, axis=axis))


@triton.jit
def _round_bf16(v):
    """Round float32 ``v`` to the nearest bfloat16 value, ties to even, kept in float32."""
    bits = v.to(tl.int32, bitcast=True)
    sign = bits & -2147483648
    mag_bits = bits & 0x7FFFFFFF
    r = ((mag_bits + 0x7FFF + ((mag_bits >> 16) & 1)) & -65536) | sign
    # The bit trick could carry a NaN payload into the sign bit: pass NaN through untouched.
    return tl.where(v != v, v, r.to(tl.float32, bitcast=True))


@triton.jit
def _quant_kernel(
    x_ptr, q_ptr, qbits_ptr, s_ptr, tiles_ptr, R, C,
    stride_xr, stride_xc, stride_qr, stride_qc, stride_sr, stride_sc,
    SCALE_R: tl.constexpr, SCALE_C: tl.constexpr, GROUPED: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # One program quantizes a [BLOCK_R, BLOCK_C] tile of x[R, C]; one scale covers SCALE_R x SCALE_C
    # elements (1x128, 128x1 or 128x128) and the tile holds whole scale groups along the 128 axes.
    # GROUPED (128x1 only): tile pid_r of the host tile map is (first row, end row, output row) and
    # the output rows past the end row (the padding up to a whole tile) are written as zeros.
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    if GROUPED:
        row0 = tl.load(tiles_ptr + pid_r * 3)
        row_end = tl.load(tiles_ptr + pid_r * 3 + 1)
        out0 = tl.load(tiles_ptr + pid_r * 3 + 2)
    else:
        row0 = pid_r * BLOCK_R
        row_end = R
        out0 = pid_r * BLOCK_R
    offs_r = row0 + tl.arange(0, BLOCK_R)
    offs_out = out0 + tl.arange(0, BLOCK_R)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_r = offs_r < row_end
    mask_c = offs_c < C
    mask = mask_r[:, None] & mask_c[None, :]
    x_ptrs = x_ptr + offs_r[:, None].to(tl.int64) * stride_xr + offs_c[None, :].to(tl.int64) * stride_xc
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    ax = tl.abs(x)
    if SCALE_R > 1 and SCALE_C > 1:
        amax = tl.maximum(_amax(_amax(ax, 1), 0), _AMAX_FLOOR, propagate_nan=tl.PropagateNan.ALL)
        scale = tl.math.div_rn(amax, _FP8_MAX)
        v = tl.math.div_rn(x, tl.zeros_like(x) + scale)
        tl.store(s_ptr + pid_r * stride_sr + pid_c * stride_sc, scale)
    elif SCALE_C > 1:
        amax = tl.maximum(_amax(ax, 1), _AMAX_FLOOR, propagate_nan=tl.PropagateNan.ALL)
        scale = tl.math.div_rn(amax, tl.zeros_like(amax) + _FP8_MAX)
        v = tl.math.div_rn(x, tl.zeros_like(x) + scale[:, None])
        tl.store(s_ptr + offs_r.to(tl.int64) * stride_sr + pid_c * stride_sc, scale, mask=mask_r)
    else:
        amax = tl.maximum(_amax(ax, 0), _AMAX_FLOOR, propagate_nan=tl.PropagateNan.ALL)
        scale = tl.math.div_rn(amax, tl.zeros_like(amax) + _FP8_MAX)
        v = tl.math.div_rn(x, tl.zeros_like(x) + scale[None, :])
        tl.store(s_ptr + (out0 // SCALE_R) * stride_sr + offs_c.to(tl.int64) * stride_sc, scale, mask=mask_c)
    # Clamp before the cast: saturation of out-of-range values differs between casts.
    q = _round_e4m3(tl.clamp(v, -_FP8_MAX, _FP8_MAX, propagate_nan=tl.PropagateNan.ALL))
    q_ptrs = q_ptr + offs_out[:, None].to(tl.int64) * stride_qr + offs_c[None, :].to(tl.int64) * stride_qc
    # Grouped: the whole output tile, padding included (masked loads made it zero).
    store_mask = (offs_out[:, None] >= 0) & mask_c[None, :] if GROUPED else mask
    tl.store(q_ptrs, q.to(q_ptr.dtype.element_ty), mask=store_mask)
    # NaNs get e4m3's NaN bits (0x7F, sign kept) through a byte view of q: the float8 cast of a
    # NaN is not to be trusted (the interpreter's gives a number). Almost always fully masked.
    is_nan = q != q
    nan_bits = tl.where(q.to(tl.int32, bitcast=True) < 0, 0xFF, 0x7F).to(tl.uint8)
    qbits_ptrs = qbits_ptr + offs_out[:, None].to(tl.int64) * stride_qr + offs_c[None, :].to(tl.int64) * stride_qc
    tl.store(qbits_ptrs, nan_bits, mask=store_mask & is_nan)


@triton.jit
def _dequant_kernel(
    q_ptr, s_ptr, y_ptr, R, C,
    stride_qr, stride_qc, stride_sr, stride_sc, stride_yr, stride_yc,
    SCALE_R: tl.constexpr, SCALE_C: tl.constexpr, OUT_BF16: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_r[:, None] < R) & (offs_c[None, :] < C)
    q = tl.load(
        q_ptr + offs_r[:, None].to(tl.int64) * stride_qr + offs_c[None, :].to(tl.int64) * stride_qc,
        mask=mask,
        other=0.0,
    ).to(tl.float32)
    s_ptrs = s_ptr + (offs_r // SCALE_R)[:, None] * stride_sr + (offs_c // SCALE_C)[None, :] * stride_sc
    y = q * tl.load(s_ptrs, mask=mask, other=0.0)
    if OUT_BF16:
        y = _round_bf16(y)
    y_ptrs = y_ptr + offs_r[:, None].to(tl.int64) * stride_yr + offs_c[None, :].to(tl.int64) * stride_yc
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemm_kernel(
    a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, tiles_ptr, M, N, K,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_ce, stride_cm, stride_cn,
    stride_asm, stride_ask, stride_bse, stride_bsn, stride_bsk, TUNE_M, TUNE_K,
    FP8: tl.constexpr, B_SCALE_ROWS: tl.constexpr, GROUPED: tl.constexpr, GROUPED_K: tl.constexpr,
    UPCAST: tl.constexpr, OUT_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # c[m, n] = sum_k a[m, k] * b[e, n, k]; dense: e = 0 and tiles of M; grouped: tile pid_m of
    # the host tile map gives (expert, first row, end row) so no tile mixes two experts.
    # GROUPED_K (the MoE weight gradient): c[e] = a[:, ks_e] · b[:, ks_e]ᵀ with e = program_id(2)
    # and tiles_ptr holding the K-block offsets of the experts. TUNE_M / TUNE_K only key autotuning.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    kb0 = 0
    kb1 = tl.cdiv(K, BLOCK_K)
    c_base = c_ptr
    if GROUPED:
        expert = tl.load(tiles_ptr + pid_m * 3)
        row0 = tl.load(tiles_ptr + pid_m * 3 + 1)
        row_end = tl.load(tiles_ptr + pid_m * 3 + 2)
    else:
        expert = 0
        row0 = pid_m * BLOCK_M
        row_end = M
    if GROUPED_K:
        e = tl.program_id(2)
        kb0 = tl.load(tiles_ptr + e).to(tl.int32)
        kb1 = tl.load(tiles_ptr + e + 1).to(tl.int32)
        c_base = c_ptr + e.to(tl.int64) * stride_ce
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < row_end
    mask_n = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + (kb0 * BLOCK_K + offs_k)[None, :] * stride_ak
    # b is read as a [BLOCK_K, BLOCK_N] tile of b[e]ᵀ: K-major, as FP8 tensor cores want it.
    b_ptrs = (b_ptr + expert * stride_be + offs_n[None, :].to(tl.int64) * stride_bn
              + (kb0 * BLOCK_K + offs_k)[:, None] * stride_bk)
    as_ptrs = as_ptr + offs_m.to(tl.int64) * stride_asm
    bs_ptrs = bs_ptr + expert * stride_bse + (offs_n // B_SCALE_ROWS).to(tl.int64) * stride_bsn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(kb0, kb1):
        mask_k = offs_k < K - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if FP8:
            a_s = tl.load(as_ptrs + kb * stride_ask, mask=mask_m, other=0.0)
            b_s = tl.load(bs_ptrs + kb * stride_bsk, mask=mask_n, other=0.0)
            if UPCAST:
                part = tl.dot(a, b)
            else:
                # Hopper's FP8 MMA accumulates in ~14-bit precision: at most one 128-wide K block
                # accumulates there before the float32 promotion below (V3's recipe).
                part = tl.dot(a, b, max_num_imprecise_acc=BLOCK_K)
            acc += part * a_s[:, None] * b_s[None, :]
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if OUT_BF16:
        acc = _round_bf16(acc)
    c_ptrs = c_base + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# GPU launch configurations are starting points chosen by reasoning about Hopper (tile sizes
# that fill a warpgroup, 3-4 pipeline stages within 228 KB of shared memory); they have not
# been tuned on hardware. The interpreter runs one Python step per program, so it gets large
# tiles to keep the program count (and test time) low.
_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(128, 128, 8, 4), (128, 128, 4, 4), (64, 128, 4, 4), (128, 256, 8, 3), (64, 64, 4, 5)]
]
_gemm_tuned = None if INTERPRET else triton.autotune(configs=_GEMM_CONFIGS, key=["TUNE_M", "N", "TUNE_K"])(_gemm_kernel)
# The grouped tile map is built on the host for one BLOCK_M, so grouped launches use a fixed one;
# 64 rows waste less padding on the small per-expert token counts of MoE layers.
_GROUPED_BLOCK_M = 64
_GROUPED_LAUNCH = {"BLOCK_N": 128, "num_warps": 4, "num_stages": 4}
# The K-grouped weight-gradient GEMM: M and N are weight dims (large), K the experts' tokens.
_WGRAD_LAUNCH = {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 4}
_INTERPRET_TILE = 64


def tune_bucket(n: int) -> int:
    """The autotuning key of a token-count dimension: ``n`` rounded up to a power of two (>= 16),
    so a new count re-uses the config tuned for its bucket instead of tuning again."""
    return max(16, triton.next_power_of_2(n))


def _check_out(out: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, name: str) -> None:
    if tuple(out.shape) != shape or out.dtype != dtype or out.device != device:
        raise ValueError(f"{name} must be {dtype} of shape {shape} on {device}, got {out.dtype} {tuple(out.shape)} on {out.device}")


def _quantize(
    x: torch.Tensor,
    q: torch.Tensor,
    s: torch.Tensor,
    q_strides: tuple[int, int],
    s_strides: tuple[int, int],
    scale_r: int,
    scale_c: int,
    tiles: torch.Tensor | None = None,
) -> None:
    r, c = x.shape
    if scale_c > 1 and scale_r > 1:
        block_r, block_c, warps = BLOCK, BLOCK, 8
    elif scale_c > 1:
        block_r, block_c, warps = (_INTERPRET_TILE if INTERPRET else 32), BLOCK, 4
    else:
        block_r, block_c, warps = BLOCK, (BLOCK if INTERPRET else 32), 4
    grid = (cdiv(r, block_r) if tiles is None else tiles.shape[0], cdiv(c, block_c))
    _quant_kernel[grid](
        x, q, q.view(torch.uint8), s, x if tiles is None else tiles, r, c, x.stride(0), x.stride(1), *q_strides, *s_strides,
        SCALE_R=scale_r, SCALE_C=scale_c, GROUPED=tiles is not None,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps,
    )  # fmt: skip


def _quant_outputs(
    out: tuple[torch.Tensor, torch.Tensor] | None, q_shape: tuple[int, int], s_shape: tuple[int, int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    if out is None:
        return (
            torch.empty(q_shape, dtype=FP8_DTYPE, device=device),
            torch.empty(s_shape, dtype=torch.float32, device=device),
        )
    q, s = out
    _check_out(q, q_shape, FP8_DTYPE, device, "out[0] (fp8 values)")
    _check_out(s, s_shape, torch.float32, device, "out[1] (scales)")
    if not (q.is_contiguous() and s.is_contiguous()):
        raise ValueError("out buffers must be contiguous")
    return q, s


def _check_2d(x: torch.Tensor, name: str) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}")


def quant_act_1x128(
    x: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x[M, K]`` (float32/bf16/fp16) -> ``(q[M, K] e4m3, s[M, ceil(K/128)] float32)``."""
    _check_2d(x, "x")
    m, k = x.shape
    q, s = _quant_outputs(out, (m, k), (m, cdiv(k, BLOCK)), x.device)
    if x.numel():
        _quantize(x, q, s, q.stride(), s.stride(), 1, BLOCK)
    return q, s


def quant_act_128x1(
    x: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x[M, K]`` -> ``(q_t[K, M] e4m3, s_t[K, ceil(M/128)])``: per channel and 128 tokens, transposed."""
    _check_2d(x, "x")
    m, k = x.shape
    q_t, s_t = _quant_outputs(out, (k, m), (k, cdiv(m, BLOCK)), x.device)
    if x.numel():
        # The kernel walks x's (token, channel) tiles and writes each into the transposed outputs.
        _quantize(x, q_t, s_t, (q_t.stride(1), q_t.stride(0)), (s_t.stride(1), s_t.stride(0)), BLOCK, 1)
    return q_t, s_t


def quant_act_128x1_grouped(
    x: torch.Tensor, offsets: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``x[T, K]``, experts' rows at ``offsets`` -> ``(q_t[K, Tp], s_t[K, Tp/128], tile_offsets)``, one launch.

    Each expert's tokens quantized 128x1 and padded with zeros to whole 128-token tiles
    (layout: :func:`kernels.layout.tile_offsets`).
    """
    _check_2d(x, "x")
    t, k = x.shape
    offsets = check_offsets(offsets, t)
    tiles_at = tile_offsets(offsets)
    q_t = torch.empty(k, tiles_at[-1], dtype=FP8_DTYPE, device=x.device)
    s_t = torch.empty(k, tiles_at[-1] // BLOCK, dtype=torch.float32, device=x.device)
    tiles = [(row, hi, col + row - lo)
             for lo, hi, col in zip(offsets, offsets[1:], tiles_at) for row in range(lo, hi, BLOCK)]
    if tiles and k:
        tile_map = torch.tensor(tiles, dtype=torch.int64).to(x.device)
        _quantize(x, q_t, s_t, (q_t.stride(1), q_t.stride(0)), (s_t.stride(1), s_t.stride(0)), BLOCK, 1, tile_map)
    return q_t, s_t, tiles_at


def quant_weight_128x128(
    w: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``w[N, K]`` -> ``(q[N, K] e4m3, s[ceil(N/128), ceil(K/128)] float32)``."""
    _check_2d(w, "w")
    n, k = w.shape
    q, s = _quant_outputs(out, (n, k), (cdiv(n, BLOCK), cdiv(k, BLOCK)), w.device)
    if w.numel():
        _quantize(w, q, s, q.stride(), s.stride(), BLOCK, BLOCK)
    return q, s


def _dequant(
    q: torch.Tensor, s: torch.Tensor, scale_r: int, out_dtype: torch.dtype, out: torch.Tensor | None
) -> torch.Tensor:
    _check_2d(q, "q")
    r, c = q.shape
    want = (cdiv(r, scale_r), cdiv(c, BLOCK))
    if tuple(s.shape) != want:
        raise ValueError(f"scale must have shape {want} for q of shape {(r, c)}, got {tuple(s.shape)}")
    if out_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"out_dtype must be torch.float32 or torch.bfloat16, got {out_dtype}")
    if out is None:
        out = torch.empty(r, c, dtype=out_dtype, device=q.device)
    _check_out(out, (r, c), out_dtype, q.device, "out")
    if q.numel():
        block_r, block_c = (_INTERPRET_TILE, BLOCK) if INTERPRET else (32, BLOCK)
        _dequant_kernel[(cdiv(r, block_r), cdiv(c, block_c))](
            q, s, out, r, c, q.stride(0), q.stride(1), s.stride(0), s.stride(1), out.stride(0), out.stride(1),
            SCALE_R=scale_r, SCALE_C=BLOCK, OUT_BF16=out_dtype == torch.bfloat16,
            BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4,
        )  # fmt: skip
    return out


def dequant_act_1x128(
    q: torch.Tensor, s: torch.Tensor, out_dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``q[M, K]`` e4m3 with ``s[M, ceil(K/128)]`` -> ``x[M, K]`` in ``out_dtype``."""
    return _dequant(q, s, 1, out_dtype, out)


def dequant_weight_128x128(
    q: torch.Tensor, s: torch.Tensor, out_dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``q[N, K]`` e4m3 with ``s[ceil(N/128), ceil(K/128)]`` -> ``w[N, K]`` in ``out_dtype``."""
    return _dequant(q, s, BLOCK, out_dtype, out)


def _gemm_out(
    a: torch.Tensor, n: int, out_dtype: torch.dtype, out: torch.Tensor | None
) -> torch.Tensor:
    if out is None:
        return torch.empty(a.shape[0], n, dtype=out_dtype, device=a.device)
    _check_out(out, (a.shape[0], n), out_dtype, a.device, "out")
    return out


def _tile_map(offsets: Sequence[int], block_m: int, device: torch.device) -> torch.Tensor:
    """``[tiles, 3]`` int64 rows (expert, first row, end row): each expert's rows cut into BLOCK_M tiles."""
    tiles = [
        (e, row, hi)
        for e, (lo, hi) in enumerate(zip(offsets, offsets[1:]))
        for row in range(lo, hi, block_m)
    ]
    return torch.tensor(tiles, dtype=torch.int64).reshape(-1, 3).to(device)


def _launch_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    a_s: torch.Tensor | None,
    b_s: torch.Tensor | None,
    offsets: Sequence[int] | None,
    k_offsets: Sequence[int] | None = None,
) -> None:
    """Run ``c = a · bᵀ`` (dense: ``b[N, K]``; grouped: ``b[E, N, K]`` with ``offsets``;
    K-grouped: ``c[E, M, N]``, expert e reducing over K range ``k_offsets[e]:k_offsets[e+1]``)."""
    fp8 = a_s is not None
    grouped = offsets is not None
    grouped_k = k_offsets is not None
    b3 = b if grouped else b.unsqueeze(0)
    n, k = b3.shape[1], b3.shape[2]
    m = a.shape[0]
    if fp8:
        bs3 = b_s if grouped else b_s.unsqueeze(0)
        scale_args = (a_s.stride(0), a_s.stride(1), bs3.stride(0), bs3.stride(1), bs3.stride(2))
        b_rows = b_scale_rows(bs3, n)
        block_k = BLOCK  # one K block per scale column: the promotion granularity
    else:
        # BF16 has no scales: pass a's data as the unused scale pointers.
        a_s = bs3 = a
        scale_args = (0, 0, 0, 0, 0)
        b_rows = 1
        block_k = BLOCK if INTERPRET else 64
    if grouped:
        block_m = _INTERPRET_TILE if INTERPRET else _GROUPED_BLOCK_M
        tiles = _tile_map(offsets, block_m, a.device)
        if tiles.shape[0] == 0:
            return
    elif grouped_k:
        tiles = torch.tensor([o // block_k for o in k_offsets], dtype=torch.int64).to(a.device)
    else:
        tiles = a
    c3 = c if grouped_k else c.unsqueeze(0)
    args = (
        a, b3, c, a_s, bs3, tiles, m, n, k,
        a.stride(0), a.stride(1), b3.stride(0), b3.stride(1), b3.stride(2), c3.stride(0), c3.stride(1), c3.stride(2),
        *scale_args, tune_bucket(m), tune_bucket(k),
    )  # fmt: skip
    flags = dict(
        FP8=fp8, B_SCALE_ROWS=b_rows, GROUPED=grouped, GROUPED_K=grouped_k, UPCAST=INTERPRET,
        OUT_BF16=c.dtype == torch.bfloat16, BLOCK_K=block_k,
    )  # fmt: skip
    num_experts = len(k_offsets) - 1 if grouped_k else 1
    if INTERPRET:
        n_m = tiles.shape[0] if grouped else cdiv(m, _INTERPRET_TILE)
        _gemm_kernel[(n_m, cdiv(n, _INTERPRET_TILE), num_experts)](
            *args, **flags, BLOCK_M=_INTERPRET_TILE, BLOCK_N=_INTERPRET_TILE
        )
    elif grouped:
        launch = _GROUPED_LAUNCH
        _gemm_kernel[(tiles.shape[0], cdiv(n, launch["BLOCK_N"]))](*args, **flags, BLOCK_M=block_m, **launch)
    elif grouped_k:
        launch = _WGRAD_LAUNCH
        grid = (cdiv(m, launch["BLOCK_M"]), cdiv(n, launch["BLOCK_N"]), num_experts)
        _gemm_kernel[grid](*args, **flags, **launch)
    else:
        grid = lambda meta: (cdiv(m, meta["BLOCK_M"]), cdiv(n, meta["BLOCK_N"]))  # noqa: E731
        _gemm_tuned[grid](*args, **flags)


def fp8_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``a[M, K] · b[N, K]ᵀ -> [M, N]`` from E4M3 operands, float32 accumulation promoted per 128 K.

    ``a_scale[M, Kb]`` (1x128); ``b_scale[ceil(N/128), Kb]`` (128x128) or ``[N, Kb]`` (1x128).
    """
    check_gemm(a, a_scale, b, b_scale, out_dtype, grouped=False)
    c = _gemm_out(a, b.shape[0], out_dtype, out)
    if c.numel():
        _launch_gemm(a, b, c, a_scale, b_scale, None)
    return c


def fp8_grouped_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    offsets: Sequence[int],
    out_dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows ``offsets[e]:offsets[e+1]`` of ``a[T, K]`` times ``b[e]ᵀ`` (``b[E, N, K]``) -> ``[T, N]``, one launch."""
    check_gemm(a, a_scale, b, b_scale, out_dtype, grouped=True)
    offsets = expert_offsets(offsets, b.shape[0], a.shape[0])
    c = _gemm_out(a, b.shape[1], out_dtype, out)
    if c.numel():
        _launch_gemm(a, b, c, a_scale, b_scale, offsets)
    return c


def fp8_grouped_wgrad(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    k_offsets: Sequence[int],
    out_dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """K-grouped ``out[e] = a[:, ks_e] · b[:, ks_e]ᵀ -> [E, M, N]``, all experts in one launch.

    The MoE weight gradient from the grouped 128x1 copies (:func:`quant_act_128x1_grouped`):
    ``a[M, Tp]``, ``b[N, Tp]``, scales ``[M, Tp/128]``, ``[N, Tp/128]``; ``k_offsets`` multiples of 128.
    """
    check_grouped_wgrad(a, a_scale, b, b_scale, k_offsets, out_dtype)
    shape = (len(k_offsets) - 1, a.shape[0], b.shape[0])
    if out is None:
        out = torch.empty(shape, dtype=out_dtype, device=a.device)
    _check_out(out, shape, out_dtype, a.device, "out")
    if out.numel():
        # Experts without tokens reduce over nothing: their programs store zeros.
        _launch_gemm(a, b, out, a_scale, b_scale, None, list(k_offsets))
    return out


def bf16_gemm(
    a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``a[M, K] · b[N, K]ᵀ -> [M, N]``; inputs must be bfloat16, float32 accumulation."""
    check_gemm(a, None, b, None, out_dtype, grouped=False)
    _check_bf16(a, b)
    c = _gemm_out(a, b.shape[0], out_dtype, out)
    if c.numel():
        _launch_gemm(a, b, c, None, None, None)
    return c


def bf16_grouped_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    offsets: Sequence[int],
    out_dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Grouped ``a[T, K] · b[E, N, K]ᵀ -> [T, N]`` in BF16, one launch (layout as :func:`fp8_grouped_gemm`)."""
    check_gemm(a, None, b, None, out_dtype, grouped=True)
    _check_bf16(a, b)
    offsets = expert_offsets(offsets, b.shape[0], a.shape[0])
    c = _gemm_out(a, b.shape[1], out_dtype, out)
    if c.numel():
        _launch_gemm(a, b, c, None, None, offsets)
    return c


def bf16_grouped_wgrad(
    a: torch.Tensor,
    b: torch.Tensor,
    k_offsets: Sequence[int],
    out_dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """K-grouped ``out[e] = a[:, ks_e] · b[:, ks_e]ᵀ -> [E, M, N]`` in BF16, all experts in one launch.

    The BF16 MoE weight gradient: ``a[M, Tp]`` and ``b[N, Tp]`` bfloat16 (any strides: a
    transposed view of token-major rows is fine), experts' tokens at ``k_offsets`` (multiples of 128,
    zero padding between, :func:`kernels.layout.tile_offsets`).
    """
    check_grouped_wgrad(a, None, b, None, k_offsets, out_dtype)
    _check_bf16(a, b)
    shape = (len(k_offsets) - 1, a.shape[0], b.shape[0])
    if out is None:
        out = torch.empty(shape, dtype=out_dtype, device=a.device)
    _check_out(out, shape, out_dtype, a.device, "out")
    if out.numel():
        _launch_gemm(a, b, out, None, None, None, list(k_offsets))
    return out


def _check_bf16(a: torch.Tensor, b: torch.Tensor) -> None:
    # Unlike the reference these do not round for the caller: a GPU kernel should not hide a copy.
    if a.dtype != torch.bfloat16 or b.dtype != torch.bfloat16:
        raise ValueError(f"a and b must be torch.bfloat16 (cast with .bfloat16()), got {a.dtype} and {b.dtype}")
