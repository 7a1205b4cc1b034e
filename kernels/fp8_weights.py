"""FP8 copies of the weights, made once per optimizer step instead of once per microbatch.

A weight changes only at the optimizer step, but every microbatch's forward (and its input
gradient, which needs the transposed copy) used to quantize it again: with M microbatches per
step that is M-fold redundant work on the 128x128 quantizer and the transpose. Here the
quantized copy lives on the parameter itself (an attribute, so no module-level state) together
with the parameter's autograd version counter; any in-place update bumps that counter and the
next use re-quantizes.

Optimizers that write parameters without telling autograd (torch's ``fused=True`` AdamW, writes
through ``.data``) must call ``torch.autograd.graph.increment_version`` on them afterwards, as
:class:`actors.optim.AdamW` does, or the stale copy would be used.
"""

from __future__ import annotations

from types import ModuleType

import torch

from kernels.layout import BLOCK

__all__ = ["FP8Weight", "fp8_weight"]

# The attribute on a weight tensor that holds its FP8Weight.
_CACHE = "_heteropipe_fp8_weight"


class FP8Weight:
    """A weight's 128x128 FP8 copy (``q[..., N, K]``, ``s[..., ceil(N/128), ceil(K/128)]``) and,
    made on first use, its transpose (``q_t[..., K, N]``, ``s_t[..., Kb, Nb]``) for the input
    gradient; valid for one version of the weight."""

    __slots__ = ("key", "q", "s", "_transposed")

    def __init__(self, key: tuple, q: torch.Tensor, s: torch.Tensor):
        self.key, self.q, self.s = key, q, s
        self._transposed: tuple[torch.Tensor, torch.Tensor] | None = None

    def transposed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(q_t, s_t)``: the blocks of Wᵀ are W's blocks transposed, so no second quantization."""
        if self._transposed is None:
            # Two autograd threads may race here; both compute the same tensors, either is kept.
            self._transposed = (self.q.transpose(-1, -2).contiguous(), self.s.transpose(-1, -2).contiguous())
        return self._transposed


def _quantize(ops: ModuleType, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if w.dim() == 2:
        return ops.quant_weight_128x128(w)
    e, n, k = w.shape
    if n % BLOCK == 0:
        # Experts stacked along N: with N a multiple of 128 no block straddles two experts.
        q, s = ops.quant_weight_128x128(w.reshape(e * n, k))
        return q.reshape(e, n, k), s.reshape(e, n // BLOCK, -1)
    pairs = [ops.quant_weight_128x128(w[i]) for i in range(e)]
    return torch.stack([q for q, _ in pairs]), torch.stack([s for _, s in pairs])


def fp8_weight(ops: ModuleType, weight: torch.Tensor) -> FP8Weight:
    """The FP8 copy of ``weight`` (``[N, K]``, or ``[E, N, K]`` experts quantized per expert),
    from the cache on the tensor when its version, storage and implementation still match."""
    # data_ptr: a parameter moved with module.to() keeps its version counter but not its storage.
    key = (weight._version, weight.data_ptr(), weight.device, ops.__name__)
    cached = getattr(weight, _CACHE, None)
    if cached is not None and cached.key == key:
        return cached
    q, s = _quantize(ops, weight.detach())
    entry = FP8Weight(key, q, s)
    if weight.is_leaf:  # parameters; a weight computed per call would only pin memory
        setattr(weight, _CACHE, entry)
    return entry
