"""FP8 block-scaling layout: constants and argument checks shared by the reference and Triton ops.

Layouts (all row-major, ``Kb = ceil(K / 128)``):

- 1x128 activations: ``x[M, K]`` -> ``q[M, K]`` E4M3 and ``s[M, Kb]`` float32, one scale per token
  and 128 channels.
- 128x1 activations (weight-grad operand): ``x[M, K]`` -> ``q_t[K, M]`` and ``s_t[K, Mb]``: the
  1x128 quantization of ``xᵀ``, i.e. one scale per channel and 128 tokens, written transposed so
  the token axis (the weight-grad reduction axis) is the contiguous one.
- 128x128 weights: ``w[N, K]`` -> ``q[N, K]`` and ``s[Nb, Kb]``.
- Grouped 128x1 (MoE weight-grad operand): ``x[T, K]`` with experts' rows at ``offsets`` ->
  ``q_t[K, Tp]``, ``s_t[K, Tp/128]`` where expert e's tokens start at column ``tile_offsets[e]``,
  a multiple of 128, and the columns up to the next expert are zero: no 128-token tile
  straddles two experts, so one K-grouped GEMM computes every expert's weight gradient.

``x ≈ q * s`` with ``s = max(amax, AMAX_FLOOR) / FP8_MAX`` per tile, computed online from the tile.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "FP8_DTYPE",
    "FP8_MAX",
    "BLOCK",
    "AMAX_FLOOR",
    "cdiv",
    "b_scale_rows",
    "check_gemm",
    "check_grouped_wgrad",
    "check_offsets",
    "expert_offsets",
    "tile_offsets",
]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK = 128
# Floor for an all-zero tile's amax: gives a finite, nonzero scale (no 0/0). 1e-4 (an inference
# clamp) would flatten small gradients, so training uses a far smaller floor.
AMAX_FLOOR = 1e-12

_OUT_DTYPES = (torch.float32, torch.bfloat16)


def cdiv(a: int, b: int) -> int:
    """Ceiling division ``⌈a / b⌉`` for non-negative ints."""
    return -(-a // b)


def b_scale_rows(b_scale: torch.Tensor, rows: int, *, name: str = "b_scale") -> int:
    """How many rows of the right-hand operand one scale row covers: 128 (128x128 blocks) or 1 (1x128).

    ``b_scale`` is ``[..., ceil(rows/128), Kb]`` for a block-scaled weight or ``[..., rows, Kb]`` for
    a 1x128-scaled operand (the weight-grad case). With ``rows == 1`` both read the same.
    """
    n = b_scale.shape[-2]
    if n == cdiv(rows, BLOCK):
        return BLOCK
    if n == rows:
        return 1
    raise ValueError(
        f"{name} has {n} rows; expected ceil({rows}/128)={cdiv(rows, BLOCK)} (128x128 blocks) "
        f"or {rows} (1x128 tiles) for an operand with {rows} rows"
    )


def check_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor | None,
    b: torch.Tensor,
    b_scale: torch.Tensor | None,
    out_dtype: torch.dtype,
    *,
    grouped: bool,
) -> None:
    """Validate ``a[M, K] · b[(E,) N, K]ᵀ`` operands; scales are None for the BF16 GEMMs."""
    if a.dim() != 2:
        raise ValueError(f"a must be 2-D [tokens, K], got shape {tuple(a.shape)}")
    if b.dim() != (3 if grouped else 2):
        want = "[experts, N, K]" if grouped else "[N, K]"
        raise ValueError(f"b must be {want}, got shape {tuple(b.shape)}")
    if a.shape[1] != b.shape[-1]:
        raise ValueError(f"a and b disagree on K: a {tuple(a.shape)}, b {tuple(b.shape)}")
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"out_dtype must be torch.float32 or torch.bfloat16, got {out_dtype}")
    if a_scale is None or b_scale is None:
        return
    if a.dtype != FP8_DTYPE or b.dtype != FP8_DTYPE:
        raise ValueError(f"a and b must be {FP8_DTYPE} (quantize first), got {a.dtype} and {b.dtype}")
    kb = cdiv(a.shape[1], BLOCK)
    if tuple(a_scale.shape) != (a.shape[0], kb):
        raise ValueError(
            f"a_scale must be [tokens, ceil(K/128)] = {(a.shape[0], kb)} (1x128 tiles), "
            f"got {tuple(a_scale.shape)}"
        )
    if b_scale.dim() != b.dim() or b_scale.shape[-1] != kb:
        raise ValueError(
            f"b_scale must be [{'E, ' if grouped else ''}rows, ceil(K/128)={kb}], got {tuple(b_scale.shape)}"
        )
    if grouped and b_scale.shape[0] != b.shape[0]:
        raise ValueError(f"b_scale has {b_scale.shape[0]} experts, b has {b.shape[0]}")
    b_scale_rows(b_scale, b.shape[-2])


def check_grouped_wgrad(
    a: torch.Tensor,
    a_scale: torch.Tensor | None,
    b: torch.Tensor,
    b_scale: torch.Tensor | None,
    k_offsets: Sequence[int],
    out_dtype: torch.dtype,
) -> None:
    """Validate the K-grouped weight-gradient GEMM's operands (``a[M, Tp]``, ``b[N, Tp]``, 1x128
    scales; None for BF16)."""
    check_gemm(a, a_scale, b, b_scale, out_dtype, grouped=False)
    if b_scale is not None and b_scale.shape[0] != b.shape[0]:
        raise ValueError(f"b_scale must be [N, Tp/128] = {(b.shape[0], a_scale.shape[1])} (1x128 tiles along tokens), "
                         f"got {tuple(b_scale.shape)}")
    offs = list(k_offsets)
    if (len(offs) < 2 or offs[0] != 0 or offs[-1] != a.shape[1]
            or any(o % BLOCK for o in offs) or any(y < x for x, y in zip(offs, offs[1:]))):
        raise ValueError(f"k_offsets must rise from 0 to {a.shape[1]} in multiples of {BLOCK} "
                         f"(kernels.layout.tile_offsets), got {offs}")


def check_offsets(offsets: Sequence[int], tokens: int) -> list[int]:
    """``offsets`` as host ints after checking they rise from 0 to ``tokens`` (rows of ``x[tokens, K]``):
    expert e's rows are ``offsets[e]:offsets[e+1]``."""
    offs = [int(o) for o in offsets]
    if len(offs) < 2 or offs[0] != 0 or offs[-1] != tokens or any(y < x for x, y in zip(offs, offs[1:])):
        raise ValueError(f"offsets must run from 0 to the {tokens} rows of x without decreasing, got {offs}")
    return offs


def expert_offsets(counts_or_offsets: torch.Tensor | Sequence[int], experts: int, tokens: int) -> list[int]:
    """Per-expert row offsets ``[0, ..., tokens]`` (length ``experts + 1``) as host ints.

    Accepts per-expert token counts (length ``experts``) or offsets (length ``experts + 1``,
    starting at 0). Tokens of expert ``e`` are rows ``offsets[e]:offsets[e+1]`` (contiguous layout).
    A CUDA tensor is copied to the host (one sync): the kernels' tile map is built there.
    """
    values = [int(v) for v in (counts_or_offsets.tolist() if torch.is_tensor(counts_or_offsets) else counts_or_offsets)]
    if len(values) == experts:
        offsets = [0]
        for c in values:
            if c < 0:
                raise ValueError(f"counts must be >= 0, got {values}")
            offsets.append(offsets[-1] + c)
    elif len(values) == experts + 1:
        offsets = values
        if offsets[0] != 0 or any(b < a for a, b in zip(offsets, offsets[1:])):
            raise ValueError(f"offsets must start at 0 and not decrease, got {values}")
    else:
        raise ValueError(
            f"counts_or_offsets has {len(values)} entries; pass {experts} per-expert counts "
            f"or {experts + 1} offsets for weight[{experts}, out, in]"
        )
    if offsets[-1] != tokens:
        raise ValueError(f"experts' tokens add up to {offsets[-1]} but x has {tokens} rows; they must match")
    return offsets


def tile_offsets(offsets: Sequence[int]) -> list[int]:
    """Expert e's first column in the grouped 128x1 layout: ``offsets`` with every expert's token
    count rounded up to whole 128-token tiles (``[0, 100, 100, 400]`` -> ``[0, 128, 128, 384]``)."""
    out = [0]
    for lo, hi in zip(offsets, offsets[1:]):
        out.append(out[-1] + cdiv(hi - lo, BLOCK) * BLOCK)
    return out
