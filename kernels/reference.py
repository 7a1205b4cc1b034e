"""Pure-torch reference of every kernel: the tests' oracle and the CPU path of the "fp8" backend.

Same names, arguments and results as :mod:`kernels.triton_ops` (less the ``out=`` buffers), in
plain torch: float32 math, torch's own ``float8_e4m3fn`` cast (round to nearest even; values are
clamped to ±448 first so saturation never depends on the cast). The FP8 GEMM dequantizes and
multiplies one 128-wide K block at a time, scaling each block's float32 partial product before
adding it to the float32 accumulator, which is the promotion scheme of the Triton kernel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

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
    "quant_act_1x128",
    "quant_act_128x1",
    "quant_act_128x1_grouped",
    "quant_weight_128x128",
    "dequant_act_1x128",
    "dequant_weight_128x128",
    "fp8_gemm",
    "fp8_grouped_gemm",
    "fp8_grouped_wgrad",
    "bf16_gemm",
    "bf16_grouped_gemm",
]


def _to_fp8(scaled: torch.Tensor) -> torch.Tensor:
    return scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _scale(amax: torch.Tensor) -> torch.Tensor:
    return amax.clamp(min=AMAX_FLOOR) / FP8_MAX


def quant_act_1x128(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x[M, K]`` -> ``(q[M, K] e4m3, s[M, ceil(K/128)] float32)``, one scale per token and 128 channels."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [tokens, channels], got shape {tuple(x.shape)}")
    m, k = x.shape
    kb = cdiv(k, BLOCK)
    # Zero padding to whole tiles leaves every tile's amax unchanged.
    tiles = F.pad(x.float(), (0, kb * BLOCK - k)).reshape(m, kb, BLOCK)
    s = _scale(tiles.abs().amax(dim=-1))
    q = _to_fp8(tiles / s[..., None]).reshape(m, kb * BLOCK)[:, :k].contiguous()
    return q, s


def quant_act_128x1(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x[M, K]`` -> ``(q_t[K, M] e4m3, s_t[K, ceil(M/128)])``: one scale per channel and 128 tokens.

    Returned transposed (the 1x128 quantization of ``xᵀ``) so that the tokens, the reduction axis
    of the weight-gradient GEMM, are contiguous.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [tokens, channels], got shape {tuple(x.shape)}")
    return quant_act_1x128(x.t())


def quant_act_128x1_grouped(
    x: torch.Tensor, offsets: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``x[T, K]`` with experts' rows at ``offsets`` -> ``(q_t[K, Tp], s_t[K, Tp/128], tile_offsets)``:
    :func:`quant_act_128x1` of each expert's rows, each padded with zero columns to whole tiles."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [tokens, channels], got shape {tuple(x.shape)}")
    t, k = x.shape
    offsets = check_offsets(offsets, t)
    tiles = tile_offsets(offsets)
    q = torch.zeros(k, tiles[-1], dtype=FP8_DTYPE, device=x.device)
    s = torch.zeros(k, tiles[-1] // BLOCK, dtype=torch.float32, device=x.device)
    for lo, hi, col in zip(offsets, offsets[1:], tiles):
        if hi > lo:
            qe, se = quant_act_128x1(x[lo:hi])
            q[:, col : col + hi - lo] = qe
            s[:, col // BLOCK : col // BLOCK + se.shape[1]] = se
    return q, s, tiles


def quant_weight_128x128(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w[N, K]`` -> ``(q[N, K] e4m3, s[ceil(N/128), ceil(K/128)] float32)``, one scale per 128x128 block."""
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D [out, in], got shape {tuple(w.shape)}")
    n, k = w.shape
    nb, kb = cdiv(n, BLOCK), cdiv(k, BLOCK)
    blocks = F.pad(w.float(), (0, kb * BLOCK - k, 0, nb * BLOCK - n)).reshape(nb, BLOCK, kb, BLOCK)
    s = _scale(blocks.abs().amax(dim=(1, 3)))
    q = _to_fp8(blocks / s[:, None, :, None]).reshape(nb * BLOCK, kb * BLOCK)[:n, :k].contiguous()
    return q, s


def _expand(s: torch.Tensor, rows: int, cols: int, row_block: int) -> torch.Tensor:
    """Per-element scale ``[rows, cols]`` from ``s[ceil(rows/row_block), ceil(cols/128)]``."""
    return s.repeat_interleave(row_block, dim=0)[:rows].repeat_interleave(BLOCK, dim=1)[:, :cols]


def dequant_act_1x128(q: torch.Tensor, s: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q[M, K]`` e4m3 with ``s[M, ceil(K/128)]`` -> ``x[M, K]`` in ``out_dtype``."""
    return (q.float() * _expand(s, *q.shape, 1)).to(out_dtype)


def dequant_weight_128x128(
    q: torch.Tensor, s: torch.Tensor, out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``q[N, K]`` e4m3 with ``s[ceil(N/128), ceil(K/128)]`` -> ``w[N, K]`` in ``out_dtype``."""
    return (q.float() * _expand(s, *q.shape, BLOCK)).to(out_dtype)


def _fp8_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor) -> torch.Tensor:
    n, k = b.shape
    b_scale = b_s.repeat_interleave(b_scale_rows(b_s, n), dim=0)[:n]  # [N, Kb]
    # Every K block is a whole 128 wide (zero padded): the same block product then gives the same
    # bits whether its tail is cut at K or padded (the grouped weight-grad layout pads).
    pad = cdiv(k, BLOCK) * BLOCK - k
    af, bf = F.pad(a.float(), (0, pad)), F.pad(b.float(), (0, pad))
    out = torch.zeros(a.shape[0], n, dtype=torch.float32, device=a.device)
    for kb in range(cdiv(k, BLOCK)):
        ks = slice(kb * BLOCK, (kb + 1) * BLOCK)
        out += (af[:, ks] @ bf[:, ks].t()) * a_s[:, kb, None] * b_scale[None, :, kb]
    return out


def fp8_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``a[M, K] · b[N, K]ᵀ -> [M, N]`` from E4M3 operands.

    ``a_scale[M, Kb]`` is 1x128; ``b_scale`` is ``[ceil(N/128), Kb]`` (128x128 weight blocks) or
    ``[N, Kb]`` (1x128, used by the weight gradient).
    """
    check_gemm(a, a_scale, b, b_scale, out_dtype, grouped=False)
    return _fp8_gemm(a, a_scale, b, b_scale).to(out_dtype)


def fp8_grouped_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    offsets: Sequence[int],
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Rows ``offsets[e]:offsets[e+1]`` of ``a[T, K]`` times ``b[e]ᵀ`` for each expert -> ``[T, N]``.

    ``b[E, N, K]`` with ``b_scale[E, ceil(N/128), Kb]`` (or ``[E, N, Kb]``); ``offsets`` has E+1
    host ints from 0 to T.
    """
    check_gemm(a, a_scale, b, b_scale, out_dtype, grouped=True)
    offsets = expert_offsets(offsets, b.shape[0], a.shape[0])
    out = torch.empty(a.shape[0], b.shape[1], dtype=out_dtype, device=a.device)
    for e, (lo, hi) in enumerate(zip(offsets, offsets[1:])):
        out[lo:hi] = _fp8_gemm(a[lo:hi], a_scale[lo:hi], b[e], b_scale[e]).to(out_dtype)
    return out


def fp8_grouped_wgrad(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    k_offsets: Sequence[int],
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """K-grouped ``out[e] = a[:, ks_e] · b[:, ks_e]ᵀ -> [E, M, N]`` with ``ks_e = k_offsets[e]:k_offsets[e+1]``.

    The MoE weight gradient ``dW[e] = g_eᵀ x_e``: ``a[M, Tp]`` and ``b[N, Tp]`` are 128x1 copies in
    the grouped layout (:func:`quant_act_128x1_grouped`), scales ``[M, Tp/128]`` and
    ``[N, Tp/128]``; ``k_offsets`` (E+1 host ints) are multiples of 128.
    """
    check_grouped_wgrad(a, a_scale, b, b_scale, k_offsets, out_dtype)
    out = torch.zeros(len(k_offsets) - 1, a.shape[0], b.shape[0], dtype=out_dtype, device=a.device)
    for e, (lo, hi) in enumerate(zip(k_offsets, k_offsets[1:])):
        if hi > lo:
            sl = slice(lo // BLOCK, hi // BLOCK)
            out[e] = _fp8_gemm(a[:, lo:hi], a_scale[:, sl], b[:, lo:hi], b_scale[:, sl]).to(out_dtype)
    return out


def bf16_gemm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``a[M, K] · b[N, K]ᵀ -> [M, N]`` with inputs rounded to bfloat16 and float32 accumulation."""
    check_gemm(a, None, b, None, out_dtype, grouped=False)
    return (a.bfloat16().float() @ b.bfloat16().float().t()).to(out_dtype)


def bf16_grouped_gemm(
    a: torch.Tensor, b: torch.Tensor, offsets: Sequence[int], out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Grouped ``a[T, K] · b[E, N, K]ᵀ -> [T, N]`` in BF16 (see :func:`fp8_grouped_gemm` for the layout)."""
    check_gemm(a, None, b, None, out_dtype, grouped=True)
    offsets = expert_offsets(offsets, b.shape[0], a.shape[0])
    out = torch.empty(a.shape[0], b.shape[1], dtype=out_dtype, device=a.device)
    for e, (lo, hi) in enumerate(zip(offsets, offsets[1:])):
        out[lo:hi] = (a[lo:hi].bfloat16().float() @ b[e].bfloat16().float().t()).to(out_dtype)
    return out
