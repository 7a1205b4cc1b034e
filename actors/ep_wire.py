"""What expert-parallel rows look like on the wire, decided by the precision of the ranks that compute
the experts (pure: no MPI).

Every exchange of a layer carries rows *to* or *from* the ranks holding experts, and their
precision picks the format (both sides of every exchange derive it from the same per-rank table,
so they agree on dtypes and byte counts before anything moves; the exchange refuses a
disagreement, :class:`runtime.exchange.WireMismatch`):

===============  ============================  ==========================================  ========
phase            direction                      fp8 holder                                  fp32
===============  ============================  ==========================================  ========
dispatch         source -> holder               E4M3 + float32 1x128 scales (quantized by   float32
                                                the source, fed to the GEMM as received)
combine          holder -> source               BF16                                        float32
combine-bwd      source -> holder (dy)          BF16                                        float32
dispatch-bwd     holder -> source (dx, dw)      BF16 (dx)                                   float32
===============  ============================  ==========================================  ========

A BF16 holder takes BF16 in all four (its GEMM rounds its input to BF16 anyway, so BF16 dispatch
loses nothing). The backward stays BF16 on FP8 holders, as V3 keeps the gradients' dispatch and
both combines in BF16: the holder multiplies dy by each slot's gate weight before its
down-projection's input-gradient GEMM quantizes it, so an FP8 copy of dy could not be fed to that
GEMM as received, and the gate-weight gradient is a dot product with dy. What rides along stays
as it is: gate weights and their gradient (float32, ``top_k`` per row), slot ids (int64).

Two hops cross one node's ranks, so the ranks of one node of an EP group must share a precision
(a node has one device kind): hop 1 carries the format of the destination node, hop 2 stays
inside it. Sums (a forwarder's per-node sum, the source's per-token sum) accumulate in float32
and are rounded to the wire format only when they leave.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kernels import dequantize_tokens, quantize_tokens
from kernels.layout import BLOCK, FP8_DTYPE, cdiv
from runtime.exchange import Field

__all__ = ["Wire", "node_wires"]

_ROW_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.bfloat16}
"""Holder precision -> dtype of hidden rows in combine and both backward exchanges."""


@dataclass(frozen=True, slots=True)
class Wire:
    """The formats of the rows to and from one node's expert ranks of ``precision``."""

    precision: str
    hidden: int
    top_k: int

    def __post_init__(self) -> None:
        if self.precision not in _ROW_DTYPE:
            raise ValueError(f"precision={self.precision!r}: choose one of {sorted(_ROW_DTYPE)}")

    @property
    def row_dtype(self) -> torch.dtype:
        """dtype of hidden rows in combine, combine-bwd and dispatch-bwd."""
        return _ROW_DTYPE[self.precision]

    def token_fields(self) -> tuple[Field, ...]:
        """A dispatched token: ``hidden`` (and its ``scale`` ``[ceil(hidden/128)]`` on FP8)."""
        if self.precision == "fp8":
            return (Field("hidden", (self.hidden,), FP8_DTYPE),
                    Field("scale", (cdiv(self.hidden, BLOCK),), torch.float32))
        return (Field("hidden", (self.hidden,), self.row_dtype),)

    def dispatch_fields(self) -> tuple[Field, ...]:
        """A dispatched row: the token, its gate weights ``[top_k]`` and physical slots ``[top_k]`` (last)."""
        return (*self.token_fields(), Field("weight", (self.top_k,), torch.float32),
                Field("slot", (self.top_k,), torch.int64))

    def row_fields(self) -> tuple[Field, ...]:
        """A combined row, or dy on its way to the experts (combine-bwd)."""
        return (Field("hidden", (self.hidden,), self.row_dtype),)

    def grad_in_fields(self) -> tuple[Field, ...]:
        """dispatch-bwd: the input gradient and the gate-weight gradient ``[top_k]``."""
        return (Field("hidden", (self.hidden,), self.row_dtype), Field("weight", (self.top_k,), torch.float32))

    def encode_tokens(self, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """h ``[rows, hidden]`` float -> the token fields' tensors (FP8: quantized 1x128 here, by the sender)."""
        if self.precision == "fp8":
            return quantize_tokens(h)
        return (h.to(self.row_dtype).contiguous(),)

    def decode_tokens(self, parts: Sequence[torch.Tensor]
                      ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Received token fields -> (float32 ``[rows, hidden]`` the experts differentiate against, the
        FP8 ``(q, s)`` their GEMM reads as received, or None)."""
        if self.precision == "fp8":
            q, s = parts
            return dequantize_tokens(q, s), (q, s)
        return parts[0].float(), None


def node_wires(precisions: Sequence[str], node_of: Sequence[int], *, hidden: int, top_k: int) -> list[Wire]:
    """One :class:`Wire` per node of an EP group from its ranks' precisions ``[ep]`` and nodes
    ``node_of`` ``[ep]`` (position in the group's node list). Raises ValueError when one node's
    ranks differ in precision."""
    if len(precisions) != len(node_of):
        raise ValueError(f"precisions: {len(precisions)} entries for an EP group of {len(node_of)} ranks")
    per_node: dict[int, set[str]] = {}
    for p, k in zip(precisions, node_of):
        per_node.setdefault(k, set()).add(p)
    for k, ps in per_node.items():
        if len(ps) > 1:
            raise ValueError(f"EP group node {k} has ranks of precisions {sorted(ps)}: the two-hop dispatch sends "
                             f"a node one format, so a node's ranks must share one precision (one device kind "
                             f"per node; set --rank-precision per node)")
    return [Wire(next(iter(per_node[k])), hidden, top_k) for k in range(len(per_node))]
