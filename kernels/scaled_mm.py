"""cuBLASLt's blockwise FP8 GEMM (``torch.nn.functional.scaled_mm`` with ``BlockWise1x128`` /
``BlockWise128x128``) as an alternative to the Triton FP8 GEMM, chosen per shape by measurement.

That recipe is DeepSeek-V3's (1x128 activations, 128x128 weights) and needs cuBLASLt >= 12.9 on
sm_90. Torch versions differ in whether ``F.scaled_mm`` exists, so :func:`available` probes: the
function, the device, and one product checked against the reference emulation. Nothing is
assumed. Scale layouts differ from ours (:mod:`kernels.layout`): 1x128 scales must be
outer-dim-major (``[M, Kb]`` with strides ``(1, M)``), 128x128 scales ``[Nb, Kb]`` are padded to
``Kb`` rounded up to 4 and passed transposed (``[L4, Nb]``, strides ``(1, L4)``); scales are
decode factors (``x ≈ q · s``) as ours are.

:class:`BlockwiseOps` is the ``"fp8"`` backend's op set on such a device: the quantizers and
grouped GEMMs are the Triton ones; ``fp8_gemm`` times both GEMMs the first time it sees a
(token bucket, N, K) and uses the faster from then on (the per-shape choice, kept per instance).
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch
import torch.nn.functional as F

from kernels import reference
from kernels.layout import BLOCK, b_scale_rows, cdiv, check_gemm
from kernels.testing import rel_error

__all__ = ["available", "unavailable_reason", "scaled_mm_scales", "fp8_gemm", "supports", "BlockwiseOps"]


def supports(m: int, n: int, k: int) -> bool:
    """Shapes cuBLASLt's blockwise kernels take: K a multiple of 128, N of 16 (M free)."""
    return m > 0 and k % BLOCK == 0 and n % 16 == 0 and n > 0


def scaled_mm_scales(a_scale: torch.Tensor, b_scale: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Our scales -> ``(scale_a, scale_b, recipe_b)`` in ``F.scaled_mm``'s layouts (module docstring).

    ``a_scale[M, Kb]`` 1x128; ``b_scale`` ``[Nb, Kb]`` (128x128 weight blocks) or ``[N, Kb]`` (1x128).
    """
    scale_a = a_scale.t().contiguous().t()
    if b_scale_rows(b_scale, n) == 1:
        return scale_a, b_scale.t().contiguous().t(), "BlockWise1x128"
    kb = b_scale.shape[1]
    l4 = cdiv(kb, 4) * 4
    padded = F.pad(b_scale, (0, l4 - kb)).contiguous()  # [Nb, L4]
    return scale_a, padded.t(), "BlockWise128x128"


def fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
             out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``a[M, K] · b[N, K]ᵀ`` through ``F.scaled_mm`` blockwise (same arguments as the reference's)."""
    check_gemm(a, a_scale, b, b_scale, out_dtype, grouped=False)
    scale_a, scale_b, recipe_b = scaled_mm_scales(a_scale, b_scale, b.shape[0])
    st = F.ScalingType
    return F.scaled_mm(a, b.t(), scale_a, st.BlockWise1x128, scale_b, getattr(st, recipe_b), output_dtype=out_dtype)


@functools.lru_cache(maxsize=None)
def unavailable_reason(device: str) -> str | None:
    """Why ``F.scaled_mm`` blockwise cannot serve as the FP8 GEMM on ``device``; None when it can.

    Probed once per device: the function and recipe names exist in this torch, the device is an
    sm_90 CUDA GPU, and one product of each weight-scale recipe runs and matches the reference
    emulation on the same quantized operands. The reason (the error cuBLASLt raised, or the measured
    mismatch) goes into the backend description and the device check, so "absent" is explained.
    """
    if not (hasattr(F, "scaled_mm") and hasattr(F, "ScalingType")):
        return f"torch {torch.__version__} has no F.scaled_mm / F.ScalingType"
    dev = torch.device(device)
    if dev.type != "cuda" or torch.version.hip is not None:
        return f"device {device} is not a CUDA GPU"
    capability = torch.cuda.get_device_capability(dev)
    if capability[0] != 9:
        return f"device {device} has compute capability {capability}; the blockwise recipes need sm_90"
    g = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(256, 512, device=dev, generator=g)
    b = torch.randn(384, 512, device=dev, generator=g)
    aq, a_s = reference.quant_act_1x128(a)
    for recipe, (bq, b_s) in (("128x128", reference.quant_weight_128x128(b)), ("1x128", reference.quant_act_1x128(b))):
        # A torch / cuBLASLt that cannot run the recipe (a library too old for blockwise scales, or a
        # scale layout it rejects) raises one of these; its message becomes the reason returned, and
        # the caller uses the Triton GEMM instead.
        try:
            got = fp8_gemm(aq, a_s, bq, b_s)
        except (RuntimeError, NotImplementedError, TypeError, ValueError) as exc:
            return f"F.scaled_mm with 1x128 x {recipe} scales failed: {type(exc).__name__}: {exc}"
        # Same quantized operands: only the float32 accumulation order may differ.
        err = rel_error(got, reference.fp8_gemm(aq, a_s, bq, b_s))
        if err > 1e-5:
            return f"F.scaled_mm with 1x128 x {recipe} scales differs from the reference: rel error {err:.2e} > 1e-5"
    return None


def available(device: torch.device | str) -> bool:
    """True where ``F.scaled_mm`` blockwise runs on ``device`` and matches the reference (probed once)."""
    return unavailable_reason(str(torch.device(device))) is None


class BlockwiseOps:
    """The FP8 op set on a device where :func:`available`: Triton everywhere, ``fp8_gemm`` per shape
    the faster of Triton and cuBLASLt blockwise (measured once per (token bucket, N, K, scales))."""

    __name__ = "kernels.scaled_mm"

    def __init__(self, triton_ops: ModuleType):
        self._triton = triton_ops
        self.choices: dict[tuple, str] = {}

    def __getattr__(self, name: str):
        return getattr(self._triton, name)

    def fp8_gemm(self, a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                 out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        m, (n, k) = a.shape[0], b.shape
        if not supports(m, n, k):
            return self._triton.fp8_gemm(a, a_scale, b, b_scale, out_dtype)
        key = (self._triton.tune_bucket(m), n, k, b_scale.shape[0], out_dtype)
        choice = self.choices.get(key)
        if choice is None:
            choice = self.choices[key] = self._measure(a, a_scale, b, b_scale, out_dtype)
        if choice == "scaled_mm":
            return fp8_gemm(a, a_scale, b, b_scale, out_dtype)
        return self._triton.fp8_gemm(a, a_scale, b, b_scale, out_dtype)

    def _measure(self, a, a_scale, b, b_scale, out_dtype) -> str:
        import triton.testing

        times = {}
        for name, fn in (("triton", self._triton.fp8_gemm), ("scaled_mm", fp8_gemm)):
            times[name] = triton.testing.do_bench(lambda: fn(a, a_scale, b, b_scale, out_dtype), warmup=5, rep=20,
                                                  return_mode="median")
        return min(times, key=times.get)
