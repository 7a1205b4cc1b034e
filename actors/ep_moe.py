"""Expert-parallel MoE layer on one ep rank: data-parallel gate and shared expert, 1/ep of the routed
experts, two-hop dispatch / combine between autograd segments.

Every ep rank of a stage routes its *own* tokens (gate, balancing-bias selection, shared expert
and the sequence-balance loss run on them, as in V3) and holds the routed-expert slots the
topology placement gives it (``phy2log``: slot ``p`` on ep rank ``p // slots_per_rank``; an
expert with several replicas has several slots). A token's replica is picked by
:func:`topology.choose_replicas` on the routing rank.

A microbatch passes through three autograd *segments* with detached leaves between them, and the
communication runs *between* segments, never inside ``autograd.Function.backward``:

====================  =====================================================================
gate (source)         ``x -> h, w, shared(h), aux``; ``h`` and ``w`` leave detached
dispatch              hop 1: once per (token, node) to the rail peer; hop 2: once per (token,
                      holder) inside the node; rows carry ``h``, the gate weights ``w`` and the slots
experts (holder)      leaves ``xr, wr -> out``: per row the sum over its slots here of
                      ``w * expert(x)`` (gate weights applied on the expert side, so a node can sum)
combine               hop 2 reversed (forwarder sums its node's rows per token), hop 1 reversed
                      (the source sums its nodes' rows per token)
after combine         leaves ``routed, shared -> y = routed + shared``
====================  =====================================================================

The backward runs the same path reversed: ``dy`` takes the dispatch route (combine's backward is a
dispatch-shaped exchange), the experts' backward gives ``dxr`` and the gate-weight gradient
``dwr`` on the expert side, both travel the combine route summed per node (dispatch's backward is a
combine-shaped exchange), and the gate segment's backward gets ``dh``, ``dw``, ``d shared``.

Communication steps are generators yielding :class:`~runtime.exchange.ExchangeOp` s: an executor
may compute while an op is in flight and resumes the generator once it waited for it
(:func:`run_comm` runs one to the end). Tokens are never dropped.

Wire precision (:mod:`actors.ep_wire`): the precision of the ranks computing the experts decides,
per node of the group: FP8 holders get E4M3 tokens with their 1x128 scales, quantized by the
source and fed to the expert GEMM as received (``grouped_linear(x_fp8=)``); combine and both
backward exchanges travel in BF16 to and from FP8 and BF16 holders; fp32 ranks exchange float32
(the exactness tests). Ranks of one EP group may differ in precision (an FP8 node and a BF16 node):
every rank is given every ep rank's precision, so both sides of each exchange agree on the format.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Generator, Sequence

import torch
import torch.nn.functional as F

from actors import ep_route
from actors.ep_wire import Wire, node_wires
from actors.model import MoE
from kernels import grouped_linear
from runtime.exchange import Exchange, ExchangeOp
from topology.layout import EPGroup
from topology.placement import choose_replicas

__all__ = ["EPMoE", "MicroBatch", "run_comm"]

Comm = Generator[ExchangeOp, None, None]

_TOKEN_FIELDS = ("hidden", "scale")
"""Fields counted as token bytes in :attr:`EPMoE.traffic` (the rest is ``_meta``)."""


def run_comm(steps: Comm) -> None:
    """Run a communication generator to its end, waiting for each op it posts."""
    for op in steps:
        op.wait()


class MicroBatch:
    """What one microbatch keeps between the segments of one EP MoE layer on one rank."""

    __slots__ = ("mb", "shape", "x", "h", "w", "shared", "aux", "phys", "to_node", "fwd_rows", "fan", "hold_rows",
                 "xr", "x_fp8", "wr", "local", "out", "routed", "shared_leaf", "y", "grad_routed", "grad_out", "grad_h",
                 "grad_w", "grad_shared")

    def __init__(self, mb: int):
        self.mb = mb
        for name in self.__slots__[1:]:
            setattr(self, name, None)


class EPMoE(torch.nn.Module):
    """One MoE layer's expert-parallel part on ep rank ``me`` of ``group``.

    moe: the layer as built on every rank (same seed): its gate, bias, load counter and shared
        expert are used as they are (replicated); its routed experts are copied for this rank's slots
        (:class:`actors.ep_stage.EPChunk` then removes the full ones and registers this module as
        ``moe.ep``, so the slots are the chunk's parameters ``layers.L.ffn.ep.w13`` / ``.w2``).
    phy2log / log2phy / logcnt: the layer's placement over the group (``topology.rebalance``'s
        ``[num_replicas]``, ``[experts, max_replicas]``, ``[experts]``).
    exchange / backward_exchange: where the forward's and the backward's exchanges go (separate
        streams, so that a forward and a backward may post theirs in any interleaving; default: one).
    precisions: every ep rank's GEMM precision ``[ep]`` (default: all this rank's ``moe.c.precision``);
        this rank's entry must be its own, and one node's ranks must share one.
    """

    def __init__(self, moe: MoE, *, group: EPGroup, me: int, phy2log: torch.Tensor, log2phy: torch.Tensor,
                 logcnt: torch.Tensor, exchange: Exchange, layer: int, backward_exchange: Exchange | None = None,
                 precisions: Sequence[str] | None = None):
        super().__init__()
        c = moe.c
        precisions = list(precisions) if precisions is not None else [c.precision] * group.size
        if len(precisions) != group.size or precisions[me] != c.precision:
            raise ValueError(f"precisions={precisions}: need one per ep rank ({group.size}) with this rank's "
                             f"({me}) equal to its model.precision={c.precision!r}")
        num_replicas = phy2log.shape[0]
        if num_replicas % group.size:
            raise ValueError(f"placement has {num_replicas} slots: must be a multiple of ep={group.size}")
        self._moe = (moe,)  # not a submodule: this module is registered under the MoE (moe.ep)
        self.group, self.me, self.exchange, self.layer = group, me, exchange, layer
        self.backward_exchange = backward_exchange or exchange
        self.spr = num_replicas // group.size
        self.register_buffer("phy2log", phy2log.clone(), persistent=False)
        self.register_buffer("log2phy", log2phy.clone(), persistent=False)
        self.register_buffer("logcnt", logcnt.clone(), persistent=False)
        self.slot_experts = phy2log[me * self.spr:(me + 1) * self.spr].clone()
        """``[slots_per_rank]`` the logical expert in each local slot."""
        self.w13 = torch.nn.Parameter(moe.w13.detach()[self.slot_experts].clone())
        self.w2 = torch.nn.Parameter(moe.w2.detach()[self.slot_experts].clone())
        self.wires = node_wires(precisions, group.node_of, hidden=c.hidden, top_k=c.top_k)
        """Per node of the group (in ``group.node_ids`` order): the format of rows to and from its experts."""
        self.wire: Wire = self.wires[group.node_of[me]]
        """This rank's node's format: what it receives as forwarder and holder, and sends back."""
        self.traffic: Counter[str] = Counter()
        """Bytes sent by this rank per phase (dispatch, combine, combine-bwd, dispatch-bwd) and link
        (inter: hop 1, intra: hop 2): ``dispatch_inter`` counts token rows (FP8: values and scales),
        ``dispatch_inter_meta`` what rides along (gate weights, slot ids; the gate-weight gradient
        in dispatch-bwd)."""
        self.hop1_from = ep_route.hop1_sources(group, me)
        self.node = ep_route.node_ranks(group, me)
        self.rail = [group.rail[me][k] for k in range(group.num_nodes)]
        """Hop 1's peers: this rank's rail peer on every node of the group (itself on its own), in node order."""

    @property
    def moe(self) -> MoE:
        """The layer this rank routes for (gate, bias, load, shared expert)."""
        return self._moe[0]

    def experts_parameters(self) -> list[torch.nn.Parameter]:
        """This rank's routed-expert slots (gradients summed only over replicas of an expert)."""
        return [self.w13, self.w2]

    # ------------------------------------------------------------------ segments
    def gate(self, mb: MicroBatch, x: torch.Tensor) -> None:
        """Segment 1 (source): x ``[batch, seq, hidden]`` -> routing, balance loss (the shared expert,
        also segment 1, runs in :meth:`dispatch` while hop 1 travels)."""
        m, c = self.moe, self.moe.c
        b, s, hidden = x.shape
        mb.shape, mb.x = x.shape, x
        h = x.reshape(b * s, hidden)
        idx, w, scores = m.route(h)
        if m.training:
            m.load += torch.bincount(idx.reshape(-1), minlength=c.num_routed_experts).to(m.load.dtype)
        mb.h, mb.w = h, w
        aux = x.new_zeros(())
        if c.seq_aux_alpha > 0 and m.training:  # V3 eq. 17-20 per sequence, as MoE.forward
            onehot = torch.zeros(b * s, c.num_routed_experts).scatter_(1, idx, 1.0).view(b, s, -1)
            f = onehot.sum(1) * (c.num_routed_experts / (c.top_k * s))
            p = (scores / scores.sum(-1, keepdim=True)).view(b, s, -1).mean(1)
            aux = c.seq_aux_alpha * (f * p).sum(-1).mean()
        mb.aux = aux
        mb.phys = choose_replicas(idx, self.phy2log, self.log2phy, self.logcnt, num_groups=c.num_groups,
                                  num_nodes=self.group.num_nodes, num_devices=self.group.size)

    def experts(self, mb: MicroBatch) -> None:
        """Segment 2 (holder): received rows -> ``out [rows, hidden]`` (gate weights applied here)."""
        c = self.moe.c
        xr, wr, local = mb.xr, mb.wr, mb.local
        rows, k = local.shape
        flat = local.reshape(-1)
        valid = flat >= 0
        order = torch.argsort(torch.where(valid, flat, self.spr), stable=True)[:int(valid.sum())]
        counts = torch.bincount(flat[valid], minlength=self.spr)
        xs = xr.repeat_interleave(k, dim=0)[order]  # grouped by local slot
        x_fp8 = None if mb.x_fp8 is None else tuple(t.repeat_interleave(k, dim=0)[order] for t in mb.x_fp8)
        a, g = grouped_linear(xs, self.w13, counts, backend=c.precision, x_fp8=x_fp8).chunk(2, dim=-1)
        ys = grouped_linear(F.silu(a) * g, self.w2, counts, backend=c.precision)
        slots = torch.zeros(rows * k, c.hidden, dtype=ys.dtype).index_copy(0, order, ys).view(rows, k, c.hidden)
        mb.out = (slots * wr[..., None]).sum(1)  # fixed order over k, as MoE.forward

    def finish(self, mb: MicroBatch) -> torch.Tensor:
        """Segment 3 (source): ``y = routed + shared`` ``[batch, seq, hidden]`` from detached leaves."""
        y = mb.routed if mb.shared is None else mb.routed + mb.shared_leaf
        mb.y = y.view(mb.shape)
        return mb.y

    def finish_backward(self, mb: MicroBatch, grad_y: torch.Tensor) -> None:
        leaves = [mb.routed] + ([mb.shared_leaf] if mb.shared is not None else [])
        grads = torch.autograd.grad(mb.y, leaves, grad_y)
        mb.grad_routed = grads[0].contiguous()
        mb.grad_shared = grads[1] if mb.shared is not None else None

    def experts_backward(self, mb: MicroBatch) -> None:
        """Expert-side backward: the slots' weight gradients accumulate here; dxr and dwr (the
        gate-weight gradient) are left for :meth:`dispatch_backward`."""
        torch.autograd.backward(mb.out, mb.grad_out)
        mb.grad_h, mb.grad_w = mb.xr.grad, mb.wr.grad
        mb.out = mb.xr = mb.x_fp8 = mb.wr = mb.grad_out = None

    def gate_backward(self, mb: MicroBatch, grad_aux: torch.Tensor | None = None,
                      residual: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Segment 1's backward from dh (the experts' input gradient), dw, d shared and d aux (None:
        the balance loss is not trained) into the gate and shared-expert parameters and on into
        ``x``'s graph; ``residual``: another root of the same segment and its gradient (the block's
        residual stream), so the segment's graph is walked once."""
        outs, grads = [mb.h, mb.w], [mb.grad_h, mb.grad_w]
        if mb.shared is not None:
            outs.append(mb.shared)
            grads.append(mb.grad_shared)
        if grad_aux is not None and mb.aux.requires_grad:
            outs.append(mb.aux)
            grads.append(grad_aux)
        if residual is not None and residual[0].requires_grad:
            outs.append(residual[0])
            grads.append(residual[1])
        torch.autograd.backward(outs, grads)
        mb.h = mb.w = mb.shared = mb.aux = mb.grad_h = mb.grad_w = mb.grad_shared = None

    # ------------------------------------------------------------------ communication
    def dispatch(self, mb: MicroBatch) -> Comm:
        """Send this rank's tokens to their experts' ranks (counts first), each node's in its wire
        format; leaves ``xr`` (float32), ``x_fp8`` (the received FP8 tiles, or None) and ``wr`` on holders."""
        h, w = mb.h.detach(), mb.w.detach()
        mb.to_node = ep_route.source_rows(mb.phys, self.group, self.me, self.spr)
        per_node = [(*wire.encode_tokens(h[idx]), w[idx], mb.phys[idx]) for wire, idx in zip(self.wires, mb.to_node)]
        rows = yield from self._spread(mb, per_node, lambda wire: wire.dispatch_fields(), "dispatch", counted=True,
                                       meanwhile=lambda: self._shared_expert(mb))
        xr, mb.x_fp8 = self.wire.decode_tokens(rows[:-2])
        mb.xr = xr.requires_grad_()
        mb.wr = rows[-2].requires_grad_()
        mb.local = ep_route.local_slots(rows[-1], self.me, self.spr)

    def combine(self, mb: MicroBatch) -> Comm:
        """Bring the experts' outputs back, summed per node then per token; leaves ``routed`` on the source."""
        (routed,) = yield from self._gather(mb, (mb.out.detach(),), lambda wire: wire.row_fields(), "combine")
        mb.routed = routed.requires_grad_()
        if mb.shared is not None:
            mb.shared_leaf = mb.shared.detach().requires_grad_()

    def combine_backward(self, mb: MicroBatch) -> Comm:
        """dy of the routed output to every holder of the token (the dispatch route)."""
        per_node = [(mb.grad_routed[idx].to(wire.row_dtype),) for wire, idx in zip(self.wires, mb.to_node)]
        (grad_out,) = yield from self._spread(mb, per_node, lambda wire: wire.row_fields(), "combine-bwd",
                                              counted=False)
        mb.grad_out = grad_out.float()

    def dispatch_backward(self, mb: MicroBatch) -> Comm:
        """dxr and the gate-weight gradient back to the source, summed per node (the combine route)."""
        mb.grad_h, mb.grad_w = yield from self._gather(mb, (mb.grad_h, mb.grad_w), lambda wire: wire.grad_in_fields(),
                                                       "dispatch-bwd")

    def _shared_expert(self, mb: MicroBatch) -> None:
        """The shared expert on this rank's own rows (segment 1's graph): it needs none of the
        exchanged rows, so it computes while dispatch hop 1 travels (V3 overlaps it so too)."""
        m = self.moe
        mb.shared = m.shared(mb.h) if m.shared is not None else None

    def _spread(self, mb: MicroBatch, per_node: list[tuple], fields_of, phase: str, *, counted: bool,
                meanwhile: Callable[[], None] | None = None):
        """Hop 1 then hop 2 of a dispatch-shaped exchange. per_node: per node of the group, this rank's
        token rows in that node's format (``fields_of(wire)``); returns this rank's rows as holder,
        in its own node's format."""
        sends = {peer: tuple(t.contiguous() for t in tensors) for peer, tensors in zip(self.rail, per_node)}
        mine = fields_of(self.wire)
        to_nodes = {peer: fields_of(wire) for peer, wire in zip(self.rail, self.wires)}
        op = yield from self._hop(mb, phase, 1, sends, self.hop1_from, mine, to_nodes,
                                  None if counted else mb.fwd_rows, meanwhile=meanwhile)
        if counted:
            mb.fwd_rows = {s: op.received[s][0].shape[0] for s in self.hop1_from}
        fwd = [torch.cat([op.received[s][i] for s in self.hop1_from]) for i in range(len(mine))]
        if counted:
            mb.fan = ep_route.fan_out(fwd[-1], self.node, self.spr)
        sends = {j: tuple(t[idx].contiguous() for t in fwd) for j, idx in zip(self.node, mb.fan)}
        op = yield from self._hop(mb, phase, 2, sends, self.node, mine, mine, None if counted else mb.hold_rows)
        if counted:
            mb.hold_rows = {f: op.received[f][0].shape[0] for f in self.node}
        return tuple(torch.cat([op.received[f][i] for f in self.node]) for i in range(len(mine)))

    def _gather(self, mb: MicroBatch, tensors: tuple, fields_of, phase: str):
        """Hop 2 reversed (summed per node here) then hop 1 reversed (summed per token at the source) of a
        combine-shaped exchange; tensors are float rows on this holder, sent in its node's format; sums
        accumulate in float32. Returns float32 ``[tokens, ...]`` per field on the source."""
        mine = fields_of(self.wire)
        tensors = tuple(t.to(f.dtype) for t, f in zip(tensors, mine))
        parts = zip(*(t.split([mb.hold_rows[f] for f in self.node]) for t in tensors))  # per forwarder
        sends = {f: tuple(p.contiguous() for p in part) for f, part in zip(self.node, parts)}
        op = yield from self._hop(mb, phase, 2, sends, self.node, mine, mine,
                                  {j: len(idx) for j, idx in zip(self.node, mb.fan)})
        total = sum(mb.fwd_rows.values())
        acc = [torch.zeros((total, *f.row_shape), dtype=torch.float32) for f in mine]
        for j, idx in zip(self.node, mb.fan):  # holders in ascending order: a fixed summation order
            for a, part in zip(acc, op.received[j]):
                a.index_add_(0, idx, part.float())
        sizes = [mb.fwd_rows[s] for s in self.hop1_from]
        parts = list(zip(*(a.to(f.dtype).split(sizes) for a, f in zip(acc, mine))))  # the node's sums leave rounded
        sends = {s: tuple(p.contiguous() for p in part) for s, part in zip(self.hop1_from, parts)}
        from_nodes = {peer: fields_of(wire) for peer, wire in zip(self.rail, self.wires)}
        op = yield from self._hop(mb, phase, 1, sends, self.rail, from_nodes, mine,
                                  {p: len(idx) for p, idx in zip(self.rail, mb.to_node)})
        tokens = mb.phys.shape[0]
        out = [torch.zeros((tokens, *f.row_shape), dtype=torch.float32) for f in mine]
        for p, idx in zip(self.rail, mb.to_node):  # nodes in group order
            for o, part in zip(out, op.received[p]):
                o.index_add_(0, idx, part.float())
        return tuple(out)

    def _hop(self, mb: MicroBatch, phase: str, hop: int, sends: dict, peers: list[int], fields, send_fields,
             recv_rows: dict | None, meanwhile: Callable[[], None] | None = None):
        """One exchange of ``phase`` (hop 1: between nodes, hop 2: inside the node): post it, run
        ``meanwhile`` (compute that needs none of its rows), yield it to the executor and count its
        bytes once it is done; returns the finished op."""
        link = "inter" if hop == 1 else "intra"
        op = self._exchange_for(phase).start(sends, peers, fields, send_fields=send_fields, recv_rows=recv_rows,
                                             layer=self.layer, mb=mb.mb, phase=f"{phase} hop{hop}",
                                             link=f"{link}-node")
        if meanwhile is not None:
            meanwhile()
        yield op
        self._count(op, phase, link)
        return op

    def _exchange_for(self, phase: str) -> Exchange:
        return self.backward_exchange if phase.endswith("-bwd") else self.exchange

    def _count(self, op: ExchangeOp, phase: str, link: str) -> None:
        for peer, per_field in op.sent_bytes.items():
            for f, nbytes in zip(op.send_fields_of(peer), per_field):
                self.traffic[f"{phase}_{link}" if f.name in _TOKEN_FIELDS else f"{phase}_{link}_meta"] += nbytes
