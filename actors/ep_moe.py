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
(:func:`run_comm` runs one to the end). Tokens are never dropped. The wire is float32 (the
precision of the fp32 path the exactness tests run).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Generator

import torch
import torch.nn.functional as F

from actors import ep_route
from actors.model import MoE
from kernels import grouped_linear
from runtime.exchange import Exchange, ExchangeOp, Field
from topology.layout import EPGroup
from topology.placement import choose_replicas

__all__ = ["EPMoE", "MicroBatch", "run_comm"]

Comm = Generator[ExchangeOp, None, None]


def run_comm(steps: Comm) -> None:
    """Run a communication generator to its end, waiting for each op it posts."""
    for op in steps:
        op.wait()


class MicroBatch:
    """What one microbatch keeps between the segments of one EP MoE layer on one rank."""

    __slots__ = ("mb", "shape", "x", "h", "w", "shared", "aux", "phys", "to_node", "fwd_rows", "fan", "hold_rows",
                 "xr", "wr", "local", "out", "routed", "shared_leaf", "y", "grad_routed", "grad_out", "grad_h",
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
    """

    def __init__(self, moe: MoE, *, group: EPGroup, me: int, phy2log: torch.Tensor, log2phy: torch.Tensor,
                 logcnt: torch.Tensor, exchange: Exchange, layer: int, backward_exchange: Exchange | None = None):
        super().__init__()
        c = moe.c
        if c.precision != "fp32":
            raise ValueError(f"model.precision={c.precision!r}: expert parallelism sends float32 rows only; "
                             f"use precision fp32")
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
        hidden, k = c.hidden, c.top_k
        self.fields_dispatch = (Field("hidden", (hidden,), torch.float32), Field("weight", (k,), torch.float32),
                                Field("slot", (k,), torch.int64))
        self.fields_grad_in = (Field("hidden", (hidden,), torch.float32), Field("weight", (k,), torch.float32))
        self.fields_row = (Field("hidden", (hidden,), torch.float32),)
        self.traffic: Counter[str] = Counter()
        """Bytes sent by this rank per phase (dispatch, combine, combine-bwd, dispatch-bwd) and link
        (inter: hop 1, intra: hop 2): ``dispatch_inter`` counts token rows, ``dispatch_inter_meta``
        what rides along (gate weights, slot ids; the gate-weight gradient in dispatch-bwd)."""
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
        """Segment 1 (source): x ``[batch, seq, hidden]`` -> routing, shared expert, balance loss."""
        m, c = self.moe, self.moe.c
        b, s, hidden = x.shape
        mb.shape, mb.x = x.shape, x
        h = x.reshape(b * s, hidden)
        idx, w, scores = m.route(h)
        if m.training:
            m.load += torch.bincount(idx.reshape(-1), minlength=c.num_routed_experts).to(m.load.dtype)
        mb.h, mb.w = h, w
        mb.shared = m.shared(h) if m.shared is not None else None
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
        a, g = grouped_linear(xs, self.w13, counts, backend=c.precision).chunk(2, dim=-1)
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
        mb.out = mb.xr = mb.wr = mb.grad_out = None

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
        """Send this rank's tokens to their experts' ranks (counts first); leaves ``xr, wr`` on holders."""
        h, w = mb.h.detach(), mb.w.detach()
        mb.to_node = ep_route.source_rows(mb.phys, self.group, self.me, self.spr)
        rows = yield from self._spread(mb, (h, w, mb.phys), self.fields_dispatch, "dispatch", counted=True)
        xr, wr, slots = rows
        mb.xr = xr.requires_grad_()
        mb.wr = wr.requires_grad_()
        mb.local = ep_route.local_slots(slots, self.me, self.spr)

    def combine(self, mb: MicroBatch) -> Comm:
        """Bring the experts' outputs back, summed per node then per token; leaves ``routed`` on the source."""
        (routed,) = yield from self._gather(mb, (mb.out.detach(),), self.fields_row, "combine")
        mb.routed = routed.requires_grad_()
        if mb.shared is not None:
            mb.shared_leaf = mb.shared.detach().requires_grad_()

    def combine_backward(self, mb: MicroBatch) -> Comm:
        """dy of the routed output to every holder of the token (the dispatch route)."""
        (mb.grad_out,) = yield from self._spread(mb, (mb.grad_routed,), self.fields_row, "combine-bwd",
                                                 counted=False)

    def dispatch_backward(self, mb: MicroBatch) -> Comm:
        """dxr and the gate-weight gradient back to the source, summed per node (the combine route)."""
        mb.grad_h, mb.grad_w = yield from self._gather(mb, (mb.grad_h, mb.grad_w), self.fields_grad_in,
                                                       "dispatch-bwd")

    def _spread(self, mb: MicroBatch, tensors: tuple, fields: tuple, phase: str, *, counted: bool):
        sends = {peer: tuple(t[idx].contiguous() for t in tensors) for peer, idx in zip(self.rail, mb.to_node)}
        op = yield from self._hop(mb, phase, 1, sends, self.hop1_from, fields, None if counted else mb.fwd_rows)
        if counted:
            mb.fwd_rows = {s: op.received[s][0].shape[0] for s in self.hop1_from}
        fwd = [torch.cat([op.received[s][i] for s in self.hop1_from]) for i in range(len(fields))]
        if counted:
            mb.fan = ep_route.fan_out(fwd[2], self.node, self.spr)
        sends = {j: tuple(t[idx].contiguous() for t in fwd) for j, idx in zip(self.node, mb.fan)}
        op = yield from self._hop(mb, phase, 2, sends, self.node, fields, None if counted else mb.hold_rows)
        if counted:
            mb.hold_rows = {f: op.received[f][0].shape[0] for f in self.node}
        return tuple(torch.cat([op.received[f][i] for f in self.node]) for i in range(len(fields)))

    def _gather(self, mb: MicroBatch, tensors: tuple, fields: tuple, phase: str):
        parts = zip(*(t.split([mb.hold_rows[f] for f in self.node]) for t in tensors))  # per forwarder
        sends = {f: tuple(p.contiguous() for p in part) for f, part in zip(self.node, parts)}
        op = yield from self._hop(mb, phase, 2, sends, self.node, fields,
                                  {j: len(idx) for j, idx in zip(self.node, mb.fan)})
        total = sum(mb.fwd_rows.values())
        acc = [torch.zeros((total, *f.row_shape), dtype=f.dtype) for f in fields]
        for j, idx in zip(self.node, mb.fan):  # holders in ascending order: a fixed summation order
            for a, part in zip(acc, op.received[j]):
                a.index_add_(0, idx, part)
        sizes = [mb.fwd_rows[s] for s in self.hop1_from]
        parts = list(zip(*(a.split(sizes) for a in acc)))
        sends = {s: tuple(p.contiguous() for p in part) for s, part in zip(self.hop1_from, parts)}
        op = yield from self._hop(mb, phase, 1, sends, self.rail, fields,
                                  {p: len(idx) for p, idx in zip(self.rail, mb.to_node)})
        tokens = mb.phys.shape[0]
        out = [torch.zeros((tokens, *f.row_shape), dtype=f.dtype) for f in fields]
        for p, idx in zip(self.rail, mb.to_node):  # nodes in group order
            for o, part in zip(out, op.received[p]):
                o.index_add_(0, idx, part)
        return tuple(out)

    def _hop(self, mb: MicroBatch, phase: str, hop: int, sends: dict, peers: list[int], fields: tuple,
             recv_rows: dict | None):
        """One exchange of ``phase`` (hop 1: between nodes, hop 2: inside the node): post it, yield it to
        the executor and count its bytes once it is done; returns the finished op."""
        op = self._exchange_for(phase).start(sends, peers, fields, recv_rows=recv_rows, layer=self.layer, mb=mb.mb,
                                             phase=f"{phase} hop{hop}")
        yield op
        self._count(op, phase, "inter" if hop == 1 else "intra")
        return op

    def _exchange_for(self, phase: str) -> Exchange:
        return self.backward_exchange if phase.endswith("-bwd") else self.exchange

    def _count(self, op: ExchangeOp, phase: str, link: str) -> None:
        for per_field in op.sent_bytes.values():
            self.traffic[f"{phase}_{link}"] += per_field[0]
            if len(per_field) > 1:
                self.traffic[f"{phase}_{link}_meta"] += sum(per_field[1:])
