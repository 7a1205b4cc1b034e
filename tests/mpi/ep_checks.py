"""Expert-parallel MoE layer checks under real mpiexec (float32, CPU), against a single-process
:class:`actors.model.MoE` on the concatenated tokens of every ep rank.

Run: python -m launch.local -n 4 tests.mpi.ep_checks LOG_DIR cases
     python -m launch.local -n 2 tests.mpi.ep_checks LOG_DIR raise

``cases`` (4 ranks): every case builds the same MoE on every rank, places its experts with
``topology.rebalance`` over an EP group spanning 2 emulated nodes, runs one microbatch forward and
backward through :class:`actors.ep_moe.EPMoE` (each rank its own tokens) and checks

* output and input gradient of each rank's tokens, and the gate / shared-expert / routed-expert
  gradients (summed over the ep ranks, expert slots summed over replicas) against the reference:
  calc_diff < 1e-13 and rel_error <= 1e-6 (bit-identity is reported, not required);
* expert loads summed over the ranks equal the reference's exactly;
* inter-node bytes of each exchange = (token, distinct remote node) pairs x token bytes, counted by
  brute force over the gathered slots and by ``topology.plan_dispatch``; intra-node bytes equal the
  plan's; with one node per token (topk_groups 1) every token crosses at most once;
* with redundant replicas, every replica of a replicated expert receives tokens.

Cases ``ep4``, ``ep4-replicas``, ``ep4-maxnodes1`` use all 4 ranks (2 nodes x 2); ``ep2`` runs on
ranks {0,1} and {2,3} as two independent EP groups of 2 nodes x 1. Rank 0 appends one JSON line
per case to ``LOG_DIR/ep-results.jsonl``; a failed check aborts the job.

Wire precision (same launch, hidden 256 so a token has two 1x128 scale tiles), on the pairs:

* ``wire-fp8`` (ranks {0,1}, both fp8): output, input gradient and expert-weight gradients
  bit-identical to a single-process reference that quantizes the tokens 1x128, runs the reference
  FP8 grouped GEMM on those tiles and rounds what combine sends to BF16 (each holder's row sum,
  then each node's sum), and in the backward rounds dy to BF16 on its way to the holders and each
  holder's input gradient (then each node's sum) on its way back; the gate gradient (summed over
  the ranks in another order) within calc_diff 1e-12. Catches tokens quantized with other scales
  or tiles, re-rounded or unrounded combine / gradient rows, and a per-node sum rounded too often;
* ``wire-mixed`` (rank 2 fp8, rank 3 bf16, one EP group): every field each rank received has the
  dtype its peer's precision implies (dispatch: the receiver's format -- E4M3 + float32 scales on
  the fp8 rank, BF16 on the bf16 one; combine and both backward exchanges: BF16), received token
  bytes equal sent token bytes, and the dispatch bytes equal (token, remote node) pairs x
  ``token_bytes(hidden, that node's precision)`` (fp8: hidden x 1 + ceil(hidden/128) x 4);
  output and gradients within calc_diff < 5e-3 of the float32 single-process MoE (FP8 E4M3 has 3
  mantissa bits: the single-process FP8 MoE alone is ~2e-3 from float32 here, reported);
* ``wire-fp8-ep4`` (all 4 ranks, 2 nodes x 2, all fp8): as ``wire-fp8``, with hop 2 and the
  forwarder's per-node sum of BF16 rows in the path (catches a forwarder that re-rounds each
  holder's row or forwards FP8 tiles in another layout); output and input gradient bit-identical,
  expert gradients within calc_diff 1e-12 (a holder's rows arrive in hop-2 order, not the
  reference's token order, so the weight-gradient GEMM sums them in another order);
* ``wire-mismatch`` (ranks {2,3}): a count announcing another format than the receiver expects,
  and a payload of another byte count than the receiver's buffer (rows known in advance), each
  raise ``WireMismatch`` on the receiver instead of being reinterpreted.

``raise`` (2 ranks): rank 1 raises right after posting its dispatch; the actor's failure report
must list the pending exchange (layer, mb, phase, communicator, peers not heard from).
"""

from __future__ import annotations

import json
import sys

import torch
from mpi4py import MPI

import dataclasses

import torch.nn.functional as F

from actors.ep_moe import EPMoE, MicroBatch, run_comm
from actors.model import ModelConfig, MoE
from kernels import dequantize_tokens, grouped_linear, quantize_tokens
from kernels.testing import calc_diff, rel_error
from runtime import log
from runtime.actor import Actor
from runtime.exchange import Exchange, Field, WireMismatch
from runtime.progress import Progress
from topology import Layout, emulated_cluster, plan_dispatch, rebalance, token_bytes

world = MPI.COMM_WORLD
LOG_DIR, MODE = sys.argv[1], sys.argv[2]
SEED, BATCH, SEQ = 11, 4, 8
DIFF_TOL, REL_TOL = 1e-13, 1e-6


def _config(topk_groups: int) -> ModelConfig:
    return ModelConfig.tiny(num_routed_experts=8, num_groups=2, topk_groups=topk_groups, top_k=2, hidden=16,
                            moe_hidden=8, num_layers=2, num_dense_layers=0, init_std=0.3)


def _moe(c: ModelConfig) -> MoE:
    m = MoE(c, torch.Generator().manual_seed(SEED))
    m.bias.copy_(torch.randn(c.num_routed_experts, generator=torch.Generator().manual_seed(SEED + 1)) * 0.01)
    return m.train()


def _build(comm: MPI.Comm, c: ModelConfig, nodes: int, per_node: int, num_replicas: int, tokens: torch.Tensor):
    layout = Layout(cluster=emulated_cluster(nodes, per_node), pp=1, ep=nodes * per_node)
    me = comm.Get_rank()
    group = layout.ep_group(me)
    # placed for the load this batch routes (as EPLB places for observed loads): the hot experts get replicas
    idx = _moe(c).route(tokens.reshape(-1, c.hidden))[0]
    load = torch.bincount(idx.reshape(-1), minlength=c.num_routed_experts)[None].double()
    phy2log, log2phy, logcnt = rebalance(load, num_replicas, c.num_groups, group.num_nodes, group.size)
    engine = Progress(timeout_s=60)
    ex = Exchange(comm, engine, name="ep-moe", comm_name=f"ep{group.size}")
    ep = EPMoE(_moe(c), group=group, me=me, phy2log=phy2log[0], log2phy=log2phy[0], logcnt=logcnt[0], exchange=ex,
               layer=0)
    return ep, group


def _inputs(c: ModelConfig, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED * 100 + r)
    return torch.randn(BATCH, SEQ, c.hidden, generator=g), torch.randn(BATCH, SEQ, c.hidden, generator=g)


def _allsum(comm: MPI.Comm, t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous().clone()
    comm.Allreduce(MPI.IN_PLACE, t.numpy(), op=MPI.SUM)
    return t


def _cmp(name: str, got: torch.Tensor, ref: torch.Tensor, out: dict) -> None:
    d = 0.0 if not (got.any() or ref.any()) else calc_diff(got, ref)
    rel = rel_error(got, ref) if ref.any() else float(got.abs().max())
    same = bool(torch.equal(got, ref))
    out[name] = {"calc_diff": d, "rel": rel, "bit_identical": same}
    if not (d < DIFF_TOL and rel <= REL_TOL):
        raise AssertionError(f"{name}: calc_diff {d:.3g}, rel {rel:.3g} vs the single-process MoE")


def run_case(comm: MPI.Comm, name: str, *, nodes: int, per_node: int, topk_groups: int, num_replicas: int) -> dict:
    c = _config(topk_groups)
    ep_size, me = comm.Get_size(), comm.Get_rank()
    xs, gs = zip(*(_inputs(c, r) for r in range(ep_size)))
    ep, group = _build(comm, c, nodes, per_node, num_replicas, torch.cat(xs))
    x = xs[me].clone().requires_grad_()

    mb = MicroBatch(0)
    ep.gate(mb, x)
    run_comm(ep.dispatch(mb))
    local = mb.local.clone()
    ep.experts(mb)
    run_comm(ep.combine(mb))
    y = ep.finish(mb)
    ep.finish_backward(mb, gs[me])
    run_comm(ep.combine_backward(mb))
    ep.experts_backward(mb)
    run_comm(ep.dispatch_backward(mb))
    ep.gate_backward(mb, grad_aux=torch.tensor(1.0 / ep_size))
    phys = mb.phys

    ref = _moe(c)
    xr = torch.cat(xs).requires_grad_()
    yr, aux = ref(xr)
    ((yr * torch.cat(gs)).sum() + aux).backward()

    res: dict = {"case": name, "ep": ep_size, "nodes": nodes, "num_replicas": num_replicas}
    rows = slice(me * BATCH, (me + 1) * BATCH)
    _cmp("output", y.detach(), yr.detach()[rows], res)
    _cmp("input_grad", x.grad, xr.grad[rows], res)
    _cmp("gate_grad", _allsum(comm, ep.moe.gate.grad), ref.gate.grad, res)
    for pname in ("w13", "w2"):
        _cmp(f"shared_{pname}_grad", _allsum(comm, getattr(ep.moe.shared, pname).grad),
             getattr(ref.shared, pname).grad, res)
        full = torch.zeros_like(getattr(ref, pname))
        full.index_add_(0, ep.slot_experts, getattr(ep, pname).grad)  # replicas of one expert summed
        _cmp(f"expert_{pname}_grad", _allsum(comm, full), getattr(ref, pname).grad, res)
    if not torch.equal(_allsum(comm, ep.moe.load), ref.load):
        raise AssertionError("expert loads summed over the routing ranks differ from the reference's")

    # traffic: brute force over every source's tokens, and the topology plan
    all_phys = comm.allgather(phys)
    spr = num_replicas // ep_size
    pairs = sum(len({group.node_of[int(p) // spr] for p in row} - {group.node_of[src]})
                for src, ph in enumerate(all_phys) for row in ph.tolist())
    tb = token_bytes(c.hidden, "fp32")
    plan = plan_dispatch(all_phys, group, slots_per_rank=spr, dispatch_token_bytes=tb, combine_token_bytes=tb)
    traffic = {k: comm.allreduce(v) for k, v in sorted(ep.traffic.items())}
    for phase in ("dispatch", "combine", "combine-bwd", "dispatch-bwd"):
        if traffic.get(f"{phase}_inter", 0) != pairs * tb:
            raise AssertionError(f"{phase}: {traffic.get(f'{phase}_inter', 0)} inter-node bytes; expected "
                                 f"{pairs} (token, remote node) pairs x {tb} B")
        if traffic.get(f"{phase}_intra", 0) != plan.link_bytes()["dispatch_intra"]:
            raise AssertionError(f"{phase}: {traffic.get(f'{phase}_intra', 0)} intra-node bytes; the plan says "
                                 f"{plan.link_bytes()['dispatch_intra']}")
    if plan.link_bytes()["dispatch_inter"] != pairs * tb:
        raise AssertionError("topology.plan_dispatch disagrees with the brute-force pair count")
    nodes_per_token = plan.nodes_per_token()
    if int(nodes_per_token.max()) > topk_groups:
        raise AssertionError(f"a token reached {int(nodes_per_token.max())} nodes; routing allows {topk_groups}")
    res.update(inter_pairs=pairs, token_bytes=tb, traffic=traffic, max_nodes_per_token=int(nodes_per_token.max()))

    # every replica serves tokens: pairs per global slot
    slot_pairs = torch.zeros(num_replicas, dtype=torch.int64)
    valid = local[local >= 0]
    slot_pairs[me * spr:(me + 1) * spr] = torch.bincount(valid, minlength=spr)
    slot_pairs = _allsum(comm, slot_pairs)
    counts = torch.bincount(ep.phy2log, minlength=c.num_routed_experts)
    replicated = counts[ep.phy2log] > 1
    res["replicated_slots"] = int(replicated.sum())
    res["replicated_slot_pairs"] = slot_pairs[replicated].tolist()
    if replicated.any() and not (slot_pairs[replicated] > 0).all():
        raise AssertionError(f"a replica received no tokens: pairs per replicated slot "
                             f"{slot_pairs[replicated].tolist()}")
    ep.exchange.close()
    return res


WIRE_HIDDEN = 256
FP8_GRAD_TOL, MIXED_TOL = 1e-12, 5e-3
_FIELD_DTYPE = {"fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16}


def _run_logged(steps, ops: list) -> None:
    """run_comm, keeping every finished op (its received fields are checked afterwards)."""
    for op in steps:
        op.wait()
        ops.append(op)


def _layer_pass(ep: EPMoE, x: torch.Tensor, grad_y: torch.Tensor, ops: list) -> tuple[torch.Tensor, MicroBatch]:
    mb = MicroBatch(0)
    ep.gate(mb, x)
    _run_logged(ep.dispatch(mb), ops)
    ep.experts(mb)
    _run_logged(ep.combine(mb), ops)
    y = ep.finish(mb)
    ep.finish_backward(mb, grad_y)
    _run_logged(ep.combine_backward(mb), ops)
    ep.experts_backward(mb)
    _run_logged(ep.dispatch_backward(mb), ops)
    ep.gate_backward(mb, grad_aux=torch.tensor(1.0 / ep.group.size))  # the ranks' balance losses: their mean
    return y.detach(), mb


class _BF16Both(torch.autograd.Function):
    """A row on the BF16 wire: rounded going out (combine), its gradient rounded coming in (combine-bwd)."""

    @staticmethod
    def forward(ctx, x):
        return x.bfloat16().float()

    @staticmethod
    def backward(ctx, g):
        return g.bfloat16().float()


class _BF16Grad(torch.autograd.Function):
    """A token whose gradient goes back on the BF16 wire (dispatch-bwd); the forward is the identity."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g.bfloat16().float()


class _OnFP8Wire(torch.autograd.Function):
    """Tokens as an FP8 holder sees them: ``dequantize(quantize_1x128(h))``; gradient straight through."""

    @staticmethod
    def forward(ctx, h):
        return dequantize_tokens(*quantize_tokens(h))

    @staticmethod
    def backward(ctx, g):
        return g


def _fp8_wire_reference(moe: MoE, x: torch.Tensor, holder: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """The MoE layer in one process on all tokens ``x [batch, seq, hidden]`` with the FP8 wire's
    roundings written out: tokens quantized 1x128 (the FP8 grouped GEMM reads those tiles), each
    holder's row sum rounded to BF16, summed per node (holders ascending) in float32 and rounded to
    BF16, summed over nodes in group order; backward: dy rounded to BF16 on its way to the holders,
    each holder's input gradient rounded to BF16, summed per node and rounded again; gate-weight
    gradients float32. ``holder [tokens, top_k]``: the ep rank computing each slot. Returns (y, aux)."""
    c = moe.c
    b, s_, hidden = x.shape
    h = x.reshape(b * s_, hidden)
    idx, w, scores = moe.route(h)
    moe.load += torch.bincount(idx.reshape(-1), minlength=c.num_routed_experts).to(moe.load.dtype)
    wire = _OnFP8Wire.apply(h)
    routed = torch.zeros_like(h)
    for k in range(group.num_nodes):
        node_in = _BF16Grad.apply(wire)
        node_sum = torch.zeros_like(h)
        for j in (j for j in range(group.size) if group.node_of[j] == k):
            mine = holder == j
            flat = torch.where(mine, idx, c.num_routed_experts).reshape(-1)
            order = torch.argsort(flat, stable=True)[:int(mine.sum())]
            counts = torch.bincount(idx[mine], minlength=c.num_routed_experts)
            xs = _BF16Grad.apply(node_in).repeat_interleave(c.top_k, dim=0)[order]
            x_fp8 = tuple(t.repeat_interleave(c.top_k, dim=0)[order] for t in quantize_tokens(h.detach()))
            a, g = grouped_linear(xs, moe.w13, counts, backend="fp8", x_fp8=x_fp8).chunk(2, dim=-1)
            ys = grouped_linear(F.silu(a) * g, moe.w2, counts, backend="fp8")
            slots = torch.zeros(h.shape[0] * c.top_k, hidden).index_copy(0, order, ys).view(-1, c.top_k, hidden)
            node_sum = node_sum + _BF16Both.apply((slots * w[..., None]).sum(1))
        routed = routed + _BF16Both.apply(node_sum)
    y = routed + moe.shared(h)
    onehot = torch.zeros(b * s_, c.num_routed_experts).scatter_(1, idx, 1.0).view(b, s_, -1)
    f = onehot.sum(1) * (c.num_routed_experts / (c.top_k * s_))
    p = (scores / scores.sum(-1, keepdim=True)).view(b, s_, -1).mean(1)
    return y.view(b, s_, hidden), c.seq_aux_alpha * (f * p).sum(-1).mean()


def _check_wire_bytes(comm: MPI.Comm, name: str, precisions: list[str], ep: EPMoE, all_phys: list, spr: int,
                      token_in: int, token_out: int, res: dict) -> None:
    """ep 2: the dispatch token bytes this rank received equal what its peer sent (and counted in its
    traffic), and equal (peer token, this rank) pairs x the token bytes of this rank's precision."""
    me = comm.Get_rank()
    peer = 1 - me
    peer_sent, peer_counted = comm.sendrecv((token_out, ep.traffic["dispatch_inter"]), dest=peer, source=peer)
    pairs_in = sum(any(int(p) // spr == me for p in row) for row in all_phys[peer].tolist())
    want_in = pairs_in * token_bytes(WIRE_HIDDEN, precisions[me])
    res["dispatch_token_bytes_in"] = token_in
    res["dispatch_pairs_in"] = pairs_in
    res["token_bytes"] = token_bytes(WIRE_HIDDEN, precisions[me])
    if not token_in == peer_sent == peer_counted == want_in:
        raise AssertionError(f"{name} rank {me}: dispatch token bytes received {token_in}, sent by the peer "
                             f"{peer_sent} (its traffic count {peer_counted}), expected {pairs_in} pairs x "
                             f"{res['token_bytes']} = {want_in}")


def run_wire_case(comm: MPI.Comm, name: str, precisions: list[str]) -> dict:
    """One MoE layer over 2 emulated nodes (ep 2: one rank each; ep 4: two, so hop 2 and the
    forwarder's per-node sum run too) with the given per-rank precisions: see the module docstring."""
    me, size = comm.Get_rank(), comm.Get_size()
    base = dataclasses.replace(_config(2), hidden=WIRE_HIDDEN)
    c = dataclasses.replace(base, precision=precisions[me])
    xs, gs = zip(*(_inputs(base, r) for r in range(size)))
    layout = Layout(cluster=emulated_cluster(2, size // 2), pp=1, ep=size)
    group = layout.ep_group(me)
    phy2log, log2phy, logcnt = rebalance(torch.ones(1, c.num_routed_experts), c.num_routed_experts, c.num_groups, 2,
                                         size)
    ex = Exchange(comm, Progress(timeout_s=60), name="ep-wire", comm_name=f"ep{size}")
    ep = EPMoE(_moe(c), group=group, me=me, phy2log=phy2log[0], log2phy=log2phy[0], logcnt=logcnt[0], exchange=ex,
               layer=0, precisions=precisions)
    x = xs[me].clone().requires_grad_()
    ops: list = []
    y, mb = _layer_pass(ep, x, gs[me], ops)
    res: dict = {"case": name, "precisions": precisions}

    # what arrived from each peer, per phase and hop, against what the precisions imply
    token_in = token_out = 0
    seen = {}
    for op, peer in ((op, p) for op in ops for p in sorted(op.received) if p != me):
        phase = op.labels["phase"]
        got = [(f.name, t.dtype) for f, t in zip(op.fields_of(peer), op.received[peer])]
        seen[phase] = [f"{n}:{str(d).removeprefix('torch.')}" for n, d in got]
        if phase.startswith("dispatch hop"):  # rows for this node's experts: this rank's format
            want = [("hidden", _FIELD_DTYPE[precisions[me]])] + ([("scale", torch.float32)]
                                                                  if precisions[me] == "fp8" else [])
            want += [("weight", torch.float32), ("slot", torch.int64)]
            if phase == "dispatch hop1":
                token_in += sum(t.nbytes for (n, _), t in zip(got, op.received[peer]) if n in ("hidden", "scale"))
        elif phase.startswith("combine hop"):  # the peer's experts' outputs: BF16 from fp8 and bf16 holders
            want = [("hidden", torch.bfloat16)]
        elif phase.startswith("combine-bwd"):  # dy for this node's experts
            want = [("hidden", torch.bfloat16)]
        else:  # dispatch-bwd: dx from the peer's experts, the gate-weight gradient in float32
            want = [("hidden", torch.bfloat16), ("weight", torch.float32)]
        if got != want:
            raise AssertionError(f"{name} rank {me} {phase}: received {got} from a {precisions[peer]} peer; "
                                 f"expected {want}")
        if phase == "dispatch hop1":
            token_out += sum(b for f, b in zip(op.send_fields_of(peer), op.sent_bytes[peer])
                             if f.name in ("hidden", "scale"))
    res["received_fields"] = seen
    res["traffic"] = dict(ep.traffic)
    all_phys = comm.allgather(mb.phys)
    spr = c.num_routed_experts // size
    if size == 2:
        _check_wire_bytes(comm, name, precisions, ep, all_phys, spr, token_in, token_out, res)

    # outputs and gradients
    fp32 = _moe(base)
    xr = torch.cat(xs).requires_grad_()
    yr, aux = fp32(xr)
    ((yr * torch.cat(gs)).sum() + aux).backward()
    if set(precisions) == {"fp8"}:
        ref = _moe(c)
        holder = torch.cat(all_phys) // spr
        xq = torch.cat(xs).requires_grad_()
        yq, auxq = _fp8_wire_reference(ref, xq, holder, group)
        ((yq * torch.cat(gs)).sum() + auxq).backward()
        want_y, want_dx = yq.detach()[me * BATCH:(me + 1) * BATCH], xq.grad[me * BATCH:(me + 1) * BATCH]
        exact = {"output": (y, want_y), "input_grad": (x.grad, want_dx),
                 "gate_grad": (_allsum(comm, ep.moe.gate.grad), ref.gate.grad)}
        exact.update({f"expert_{p}_grad": (getattr(ep, p).grad, getattr(ref, p).grad[ep.slot_experts])
                      for p in ("w13", "w2")})
        for key, (got, want) in exact.items():
            res[f"{key}_bit_identical"] = bool(torch.equal(got, want))
        if not res["output_bit_identical"]:
            raise AssertionError(f"{name}: output differs from the FP8-wire reference: calc_diff "
                                 f"{calc_diff(y, want_y):.3g}, max abs {float((y - want_y).abs().max()):.3g}")
        grads = exact
        tol = FP8_GRAD_TOL
    else:
        grads = {"output": (y, yr.detach()[me * BATCH:(me + 1) * BATCH]),
                 "input_grad": (x.grad, xr.grad[me * BATCH:(me + 1) * BATCH])}
        grads.update({f"expert_{p}_grad": (getattr(ep, p).grad, getattr(fp32, p).grad[ep.slot_experts])
                      for p in ("w13", "w2")})
        tol = MIXED_TOL
        with torch.no_grad():  # what FP8 alone costs against float32, for scale (reported, not checked)
            y8 = _moe(dataclasses.replace(base, precision="fp8"))(torch.cat(xs))[0][me * BATCH:(me + 1) * BATCH]
        res["single_process_fp8_output_calc_diff"] = calc_diff(y8, grads["output"][1])
    for key, (got, want) in grads.items():
        res[f"{key}_calc_diff"] = calc_diff(got, want)
        if not res[f"{key}_calc_diff"] < tol:
            raise AssertionError(f"{name} rank {me}: {key} calc_diff {res[f'{key}_calc_diff']:.3g} >= {tol}")
    ex.close()
    return res


def run_mismatch_case(comm: MPI.Comm) -> dict:
    """Rank 0 of ``comm`` sends rows in a format rank 1 does not expect, once with a counts round and
    once with the rows known in advance; rank 1 must raise WireMismatch both times."""
    me = comm.Get_rank()
    ex = Exchange(comm, Progress(timeout_s=30), name="ep-mismatch", comm_name="ep2")
    fp8 = (Field("hidden", (WIRE_HIDDEN,), torch.float8_e4m3fn), Field("scale", (2,), torch.float32))
    bf16 = (Field("hidden", (WIRE_HIDDEN,), torch.bfloat16),)
    caught = []
    for recv_rows in (None, {0: 1}):
        if me == 0:
            rows = (torch.zeros(1, WIRE_HIDDEN, dtype=torch.float8_e4m3fn), torch.ones(1, 2))
            ex.start({1: rows}, [], bf16, send_fields=fp8, recv_rows=recv_rows and {}).wait()
        else:
            try:
                ex.start({}, [0], bf16, recv_rows=recv_rows).wait()
            except WireMismatch as exc:
                caught.append(str(exc))
        comm.Barrier()
    if me == 1 and len(caught) != 2:
        raise AssertionError(f"wire-mismatch: {len(caught)} of 2 mismatches raised: {caught}")
    return {"case": "wire-mismatch", "messages": caught}


class _RaiseInDispatch(Actor):
    role = "ep-moe"

    def main(self) -> None:
        c = _config(2)
        layout = Layout(cluster=emulated_cluster(2, 1), pp=1, ep=2)
        group = layout.ep_group(self.rank)
        phy2log, log2phy, logcnt = rebalance(torch.ones(1, 8), 8, c.num_groups, 2, 2)
        ex = Exchange(self.comm, self.transport.engine, name="ep-moe", comm_name="ep2")
        ep = EPMoE(_moe(c), group=group, me=self.rank, phy2log=phy2log[0], log2phy=log2phy[0], logcnt=logcnt[0],
                   exchange=ex, layer=3)
        mb = MicroBatch(5)
        ep.gate(mb, _inputs(c, self.rank)[0])
        steps = ep.dispatch(mb)
        op = next(steps)  # hop 1 posted
        if self.rank == 1:
            raise ValueError("boom inside dispatch on rank 1")
        op.wait()
        for op in steps:
            op.wait()
        ep.experts(mb)
        run_comm(ep.combine(mb))  # waits for rank 1, which never answers


def main() -> None:
    log.configure(run_id=f"ep-{MODE}", rank=world.Get_rank(), role="ep-moe", log_dir=LOG_DIR)
    if MODE == "raise":
        _RaiseInDispatch().run()
        return
    if world.Get_size() != 4:
        raise SystemExit("ep_checks cases: run on 4 ranks")
    results = [run_case(world, "ep4", nodes=2, per_node=2, topk_groups=2, num_replicas=8),
               run_case(world, "ep4-replicas", nodes=2, per_node=2, topk_groups=2, num_replicas=12),
               run_case(world, "ep4-maxnodes1", nodes=2, per_node=2, topk_groups=1, num_replicas=8)]
    wire4 = world.gather(run_wire_case(world, "wire-fp8-ep4", ["fp8"] * 4))
    pair = world.Split(world.Get_rank() // 2, world.Get_rank())
    ep2 = run_case(pair, "ep2", nodes=2, per_node=1, topk_groups=2, num_replicas=8)
    wire = (run_wire_case(pair, "wire-fp8", ["fp8", "fp8"]) if world.Get_rank() < 2
            else run_wire_case(pair, "wire-mixed", ["fp8", "bf16"]))
    mismatch = run_mismatch_case(pair) if world.Get_rank() >= 2 else None
    pair.Free()
    ep2_all, wire_all, mismatch_all = world.gather(ep2), world.gather(wire), world.gather(mismatch)
    if world.Get_rank() == 0:
        with open(f"{LOG_DIR}/ep-results.jsonl", "a") as fh:
            for r in results + [dict(ep2_all[0], group_ranks=[0, 1]), dict(ep2_all[2], group_ranks=[2, 3])]:
                fh.write(json.dumps(r) + "\n")
        with open(f"{LOG_DIR}/ep-wire-results.jsonl", "a") as fh:
            for r, w in [*enumerate(wire_all), *enumerate(wire4)]:
                fh.write(json.dumps(dict(w, rank=r)) + "\n")
            fh.write(json.dumps(mismatch_all[3]) + "\n")
    print(f"rank {world.Get_rank()}: all ep checks ok", flush=True)


if __name__ == "__main__":
    main()
