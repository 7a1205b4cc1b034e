"""Autograd linear layers ``y = x Wᵀ (+ b)`` and MoE expert layers, per precision backend.

Backends (see :mod:`kernels.backend` for which device gets which):

- ``"fp32"``: float32 GEMMs (torch.matmul) — the exact path the pipeline tests compare bit for bit.
- ``"bf16"``: operands rounded to bfloat16, float32 accumulation, products rounded to bfloat16
  (torch's bfloat16 matmul on CUDA; on the CPU a float32 matmul of the rounded operands, see
  ``_bf16_mm``); outputs, weight gradients included, come out in bfloat16
  and are returned as float32 / x's dtype. Saved activations are the bfloat16 copies.
- ``"fp8"``: DeepSeek-V3's recipe. Forward: x quantized 1x128, W 128x128 (E4M3, scale =
  amax / 448 computed online), FP8 GEMM with float32 accumulation promoted per 128-wide K
  block. Input gradient: grad_output quantized 1x128 against the same quantized W (transposed
  blocks). Weight gradient: grad_output and x both quantized 128x1 (per channel, per 128 tokens:
  the reduction axis of ``dW = gᵀ x``), returned in float32. Triton kernels on NVIDIA GPUs with
  FP8 (dense GEMMs: per shape the faster of Triton and cuBLASLt blockwise ``F.scaled_mm`` where
  that is present and correct, :mod:`kernels.scaled_mm`), the torch reference emulation on the
  CPU. What the backward keeps is FP8 (V3 caches FP8 activations): x's 128x1 tiles are made in
  the forward (a 1x128 copy cannot be re-tiled) and grad_output's in B, so a deferred W holds no
  full-precision activation. The weight's FP8 copy and its transpose are made once per optimizer
  step (:mod:`kernels.fp8_weights`). MoE experts: each expert's tokens are padded to whole
  128-token tiles in the 128x1 copies, so all experts' weight gradients are one K-grouped launch.

Master weights stay in their own dtype (float32): every backend returns weight gradients in the
weight's dtype. Outputs and input gradients come back in x's dtype.

The weight gradient is deferred (see :mod:`kernels.wgrad`) while the weight's
:class:`~kernels.wgrad.WeightGradDeferral` captures, on every backend and whichever thread runs
the backward; the closure runs the same kernels on the same tensors, so deferred and immediate
gradients are bit-identical. The bias gradient is not deferred (a cheap reduction, no GEMM).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from types import ModuleType

import torch

from kernels import reference, scaled_mm
from kernels.backend import BACKENDS, fp8_impl
from kernels.fp8_weights import fp8_weight
from kernels.layout import BLOCK, FP8_DTYPE, cdiv, expert_offsets, tile_offsets
from kernels.scaled_mm import BlockwiseOps
from kernels.wgrad import accumulate_grad, deferred, pending_weight_grads

__all__ = ["linear", "grouped_linear", "BACKENDS"]


class _LinearFP32(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        y = torch.matmul(x, weight.t())
        return y + bias if bias is not None else y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = torch.matmul(grad_y, weight) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            x2 = x.reshape(-1, x.shape[-1])
            g2 = grad_y.reshape(-1, grad_y.shape[-1])
            grad_w = _weight_grad(weight, lambda: torch.matmul(g2.t(), x2))
        grad_b = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
        return grad_x, grad_w, grad_b


def _weight_grad(weight: torch.Tensor, compute: Callable[[], torch.Tensor]) -> torch.Tensor | None:
    """Run ``compute`` now and return its result, or defer it into the weight's open capture."""
    pending = pending_weight_grads(weight)
    if pending is not None:
        pending.append(deferred(lambda: accumulate_grad(weight, compute())))
        return None
    return compute().to(weight.dtype)


def _fp8_ops(device: torch.device) -> ModuleType | BlockwiseOps:
    if fp8_impl(device) == "triton":
        # Imported on first use: Triton decides compiled vs interpreted when a kernel module loads.
        from kernels import triton_ops

        return _blockwise_ops(str(device)) if scaled_mm.available(device) else triton_ops
    return reference


@functools.lru_cache(maxsize=None)
def _blockwise_ops(device: str) -> BlockwiseOps:
    """One op set per device, so its per-shape GEMM choices are measured once."""
    from kernels import triton_ops

    return BlockwiseOps(triton_ops)


def _gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The GEMM output dtype for inputs of ``dtype``: bfloat16 stays, anything else gets float32."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def _bf16_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A BF16 GEMM: operands rounded to bfloat16, float32 accumulation, the product rounded to bfloat16.

    On CUDA that is torch's bfloat16 matmul. Elsewhere the same arithmetic runs as a float32 matmul of
    the rounded operands (exact products, float32 sums) rounded once at the end: torch's CPU bfloat16
    matmul was 7.7x slower than float32 on this project's AVX2 CI machines (no AMX), and the BF16 ranks
    of the CPU tests spent most of their time there.
    """
    a, b = a.to(torch.bfloat16), b.to(torch.bfloat16)
    if a.is_cuda:
        return torch.matmul(a, b)
    return torch.matmul(a.float(), b.float()).to(torch.bfloat16)


def _bias_grad(ctx, g2: torch.Tensor) -> torch.Tensor | None:
    if ctx.bias_dtype is None or not ctx.needs_input_grad[2]:
        return None
    return g2.float().sum(0).to(ctx.bias_dtype)


class _LinearBF16(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        xb = x.to(torch.bfloat16)
        ctx.save_for_backward(xb, weight)
        ctx.x_dtype = x.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        y = _bf16_mm(xb, weight.t()).to(x.dtype)
        return y + bias.to(y.dtype) if bias is not None else y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        xb, weight = ctx.saved_tensors
        g2 = grad_y.reshape(-1, grad_y.shape[-1])
        grad_x = _bf16_mm(grad_y, weight).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            x2 = xb.reshape(-1, xb.shape[-1])
            grad_w = _weight_grad(weight, lambda: _bf16_mm(g2.t(), x2))
        grad_b = _bias_grad(ctx, g2)
        return grad_x, grad_w, grad_b


class _LinearFP8(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        ops = _fp8_ops(x.device)
        x2 = x.reshape(-1, x.shape[-1])
        xq, xs = ops.quant_act_1x128(x2)
        w8 = fp8_weight(ops, weight)
        y = ops.fp8_gemm(xq, xs, w8.q, w8.s, _gemm_dtype(x.dtype)).to(x.dtype)
        y = y.reshape(*x.shape[:-1], weight.shape[0])
        ctx.ops, ctx.w8, ctx.x_shape, ctx.x_dtype = ops, w8, x.shape, x.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        if ctx.needs_input_grad[1]:
            # The weight gradient reduces over tokens, so it needs x in 128x1 tiles; made now
            # (x itself is not kept), as V3 caches FP8 activations for the backward.
            ctx.save_for_backward(weight, *ops.quant_act_128x1(x2))
        else:
            ctx.save_for_backward(weight)
        return y + bias.to(y.dtype) if bias is not None else y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        weight, *x_t = ctx.saved_tensors
        ops = ctx.ops
        g2 = grad_y.reshape(-1, grad_y.shape[-1])
        grad_x = None
        if ctx.needs_input_grad[0]:
            gq, gs = ops.quant_act_1x128(g2)
            # dx = g · W: the right operand is Wᵀ[K, N], whose 128x128 blocks are W's transposed.
            wq_t, ws_t = ctx.w8.transposed()
            grad_x = ops.fp8_gemm(gq, gs, wq_t, ws_t, _gemm_dtype(ctx.x_dtype)).to(ctx.x_dtype).reshape(ctx.x_shape)
        grad_w = None
        if ctx.needs_input_grad[1]:
            # grad_output's 128x1 tiles are made in B, so a deferred W holds only FP8 copies.
            gq_t, gs_t = ops.quant_act_128x1(g2)
            xq_t, xs_t = x_t
            grad_w = _weight_grad(weight, lambda: ops.fp8_gemm(gq_t, gs_t, xq_t, xs_t, torch.float32))
        grad_b = _bias_grad(ctx, g2)
        return grad_x, grad_w, grad_b


def _check_backend(backend: str, caller: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"{caller}: backend={backend!r} is not one of {BACKENDS} (kernels.backend_for picks one)")


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, backend: str = "fp32"
) -> torch.Tensor:
    """``x[..., in] @ weight[out, in]ᵀ (+ bias[out]) -> [..., out]`` on the chosen backend.

    Autograd gives the input gradient in x's dtype and weight/bias gradients in the parameters'
    dtype; the weight gradient is deferred inside :func:`kernels.capture_weight_grads`.
    """
    _check_backend(backend, "linear")
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear: weight must be [out, in] with in = x.shape[-1]; got x {tuple(x.shape)}, weight {tuple(weight.shape)}"
        )
    if backend == "fp32":
        return _LinearFP32.apply(x, weight, bias)
    if backend == "bf16":
        return _LinearBF16.apply(x, weight, bias)
    return _LinearFP8.apply(x, weight, bias)


def _token_padded(x: torch.Tensor, offsets: Sequence[int], tiles: Sequence[int]) -> torch.Tensor:
    """``x[T, K]`` -> ``[tiles[-1], K]``: expert e's rows moved to start at ``tiles[e]``, zeros between."""
    index = torch.cat([torch.arange(lo, hi) - lo + t for lo, hi, t in zip(offsets, offsets[1:], tiles)])
    return x.new_zeros(tiles[-1], x.shape[1]).index_copy_(0, index.to(x.device), x)


def _segments(offsets: Sequence[int]) -> list[tuple[int, int, int]]:
    return [(e, lo, hi) for e, (lo, hi) in enumerate(zip(offsets, offsets[1:]))]


def _bf16_grouped_triton(device: torch.device) -> bool:
    """True where the grouped BF16 GEMM runs as one Triton launch (NVIDIA GPUs with BF16 tensor cores)."""
    return device.type == "cuda" and torch.version.hip is None and torch.cuda.get_device_capability(device) >= (8, 0)


class _GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, offsets: tuple[int, ...], backend: str,
                x_fp8: tuple[torch.Tensor, torch.Tensor] | None):
        ctx.offsets, ctx.backend = offsets, backend
        ctx.x_dtype = x.dtype
        e, n, _ = weight.shape
        if backend == "fp8":
            ops = _fp8_ops(x.device)
            xq, xs = ops.quant_act_1x128(x) if x_fp8 is None else x_fp8
            w8 = fp8_weight(ops, weight)
            y = ops.fp8_grouped_gemm(xq, xs, w8.q, w8.s, offsets, _gemm_dtype(x.dtype)).to(x.dtype)
            ctx.ops, ctx.w8 = ops, w8
            if ctx.needs_input_grad[1]:
                # Per expert 128x1 tiles, each expert's tokens padded to whole tiles (no tile
                # straddles two experts): the K-grouped weight-gradient GEMM reads them in one launch.
                xq_t, xs_t, ctx.k_offsets = ops.quant_act_128x1_grouped(x, offsets)
                ctx.save_for_backward(weight, xq_t, xs_t)
            else:
                ctx.save_for_backward(weight)
            return y
        if backend == "bf16":
            xb = x.to(torch.bfloat16)
            wb = weight.to(torch.bfloat16)
            ctx.save_for_backward(xb, weight)
            if _bf16_grouped_triton(x.device):
                from kernels import triton_ops

                return triton_ops.bf16_grouped_gemm(xb, wb, offsets, torch.bfloat16).to(x.dtype)
            y = x.new_empty(x.shape[0], n)
            for i, lo, hi in _segments(offsets):
                y[lo:hi] = _bf16_mm(xb[lo:hi], wb[i].t())
            return y
        ctx.save_for_backward(x, weight)
        y = x.new_empty(x.shape[0], n)
        for i, lo, hi in _segments(offsets):
            y[lo:hi] = torch.matmul(x[lo:hi], weight[i].t())
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        offsets, backend = ctx.offsets, ctx.backend
        segs = _segments(offsets)
        grad_x = grad_w = None
        if backend == "fp8":
            weight, *x_t = ctx.saved_tensors
            ops = ctx.ops
            if ctx.needs_input_grad[0]:
                gq, gs = ops.quant_act_1x128(grad_y)
                wq_t, ws_t = ctx.w8.transposed()
                dx = ops.fp8_grouped_gemm(gq, gs, wq_t, ws_t, offsets, _gemm_dtype(ctx.x_dtype))
                grad_x = dx.to(ctx.x_dtype)
            if ctx.needs_input_grad[1]:
                gq_t, gs_t, _ = ops.quant_act_128x1_grouped(grad_y, offsets)
                xq_t, xs_t = x_t
                k_offsets = ctx.k_offsets

                def wgrad() -> torch.Tensor:
                    # All experts' dW[e] = g_eᵀ x_e in one launch, grouped along the token (K) axis.
                    return ops.fp8_grouped_wgrad(gq_t, gs_t, xq_t, xs_t, k_offsets, torch.float32)

        else:
            x, weight = ctx.saved_tensors
            mm = _bf16_mm if backend == "bf16" else torch.matmul
            if ctx.needs_input_grad[0]:
                grad_x = torch.empty(grad_y.shape[0], weight.shape[2], dtype=ctx.x_dtype, device=grad_y.device)
                for i, lo, hi in segs:
                    grad_x[lo:hi] = mm(grad_y[lo:hi], weight[i])

            if backend == "bf16" and ctx.needs_input_grad[1] and _bf16_grouped_triton(grad_y.device):
                from kernels import triton_ops

                # One K-grouped launch for all experts, on token-padded copies (tokens are the K axis).
                tiles = tile_offsets(offsets)
                gp = _token_padded(grad_y.to(torch.bfloat16), offsets, tiles)
                xp = _token_padded(x, offsets, tiles)

                def wgrad() -> torch.Tensor:
                    return triton_ops.bf16_grouped_wgrad(gp.t(), xp.t(), tiles, torch.bfloat16)

            else:

                def wgrad() -> torch.Tensor:
                    dw = torch.zeros_like(weight)
                    for i, lo, hi in segs:
                        if hi > lo:
                            dw[i] = mm(grad_y[lo:hi].t(), x[lo:hi])
                    return dw

        if ctx.needs_input_grad[1]:
            grad_w = _weight_grad(weight, wgrad)
        return grad_x, grad_w, None, None, None


def grouped_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    counts_or_offsets: torch.Tensor | Sequence[int],
    *,
    backend: str = "fp32",
    x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """MoE experts: ``x[tokens, in]`` -> ``[tokens, out]``, rows of expert e times ``weight[e][out, in]ᵀ``.

    Contiguous layout: expert e's tokens are rows ``offsets[e]:offsets[e+1]``; pass per-expert
    counts ``[E]`` or offsets ``[E+1]`` (a tensor or ints; read on the host). Same autograd and
    deferral rules as :func:`linear`; no bias (MoE experts have none).

    x_fp8: backend ``"fp8"`` only: x already quantized 1x128 (``q[tokens, in]`` E4M3,
    ``s[tokens, ceil(in/128)]`` float32, e.g. received from the dispatch), fed to the GEMM as given
    instead of quantizing ``x``; ``x`` must then be its dequantization
    (:func:`kernels.wire.dequantize_tokens`): the input gradient is taken with respect to it and
    the weight gradient's 128x1 tiles are made from it (a 1x128 copy cannot be re-tiled).
    """
    _check_backend(backend, "grouped_linear")
    if x.dim() != 2 or weight.dim() != 3 or x.shape[1] != weight.shape[2]:
        raise ValueError(
            "grouped_linear: x must be [tokens, in] and weight [experts, out, in] with matching in; "
            f"got x {tuple(x.shape)}, weight {tuple(weight.shape)}"
        )
    if x_fp8 is not None:
        _check_prequantized(x, x_fp8, backend)
    offsets = tuple(expert_offsets(counts_or_offsets, weight.shape[0], x.shape[0]))
    return _GroupedLinear.apply(x, weight, offsets, backend, x_fp8)


def _check_prequantized(x: torch.Tensor, x_fp8: tuple[torch.Tensor, torch.Tensor], backend: str) -> None:
    if backend != "fp8":
        raise ValueError(f"grouped_linear: x_fp8 (pre-quantized input) needs backend='fp8', got {backend!r}: "
                         f"pass x alone on the {backend} backend")
    q, s = x_fp8
    want_s = (x.shape[0], cdiv(x.shape[1], BLOCK))
    if q.dtype != FP8_DTYPE or tuple(q.shape) != tuple(x.shape) or s.dtype != torch.float32 or tuple(s.shape) != want_s:
        raise ValueError(f"grouped_linear: x_fp8 must be (q {FP8_DTYPE} {tuple(x.shape)}, s float32 {want_s}) "
                         f"1x128 tiles of x; got (q {q.dtype} {tuple(q.shape)}, s {s.dtype} {tuple(s.shape)})")
