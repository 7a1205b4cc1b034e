"""Expert-parallel dispatch + combine: two-hop vs one flat all-to-all, measured and priced.

    python -m launch.local -n 4 bench.moe [--rounds 7] [--tokens 1024] [--hidden 1024] [--out bench/results/moe.json]

4 ranks as 2 emulated nodes of 2 ranks, one EP group of 4. Every rank routes ``--tokens`` tokens
(balanced random scores, DeepSeek-V3's node-limited selection over 2 groups = nodes, top-8 of 32
experts, replicas chosen by the placement's rule) and the same tokens are moved three ways,
alternately, round after round in one run (the median of ``--rounds`` rounds; each measurement
is the slowest rank's time of ``--iters`` dispatch + combine pairs):

* ``two-hop``: :class:`actors.ep_moe.EPMoE`'s dispatch and combine (hop 1 once per (token, node)
  to the rail peer, hop 2 fan-out inside the node, combine summed per node), over
  :mod:`runtime.exchange` (point-to-point, counts first), float32 rows (fp32 expert ranks);
* ``two-hop-fp8``: the same with fp8 expert ranks: FP8 + 1x128 scales dispatch (quantized by the
  sender, included in the time), BF16 combine (:mod:`actors.ep_wire`);
* ``flat-p2p``: one hop, once per (token, destination rank), over the same exchange;
* ``flat-a2av``: the same flat traffic as MPI collectives: ``Alltoall`` of the counts, then one
  ``Ialltoallv`` per field (token rows, gate weights, slot ids; the combine one of token rows).

Identity experts (the holder returns what it received): only communication and the
permutations are timed. The flat variants ship float32 rows (what the fp32 path ships). The
bytes every rank sent in one dispatch + combine of ``two-hop`` and ``two-hop-fp8`` are counted
(``EPMoE.traffic``) and printed side by side: the measured FP8/BF16 wire against float32.

On one host every "link" is shared memory: the inter-node hop is no slower than the intra-node
one, so two-hop's advantage (each token crosses the slow link once per node, not once per
rank) cannot show here; it pays for its second round instead. The table therefore adds the
topology cost model's time for the same token counts at V3's link speeds (IB 50 GB/s, NVLink
160 GB/s per device; the busiest device of each hop), for float32 rows and for V3's wire formats
(FP8 + 1x128 scales dispatch, BF16 combine).

``flat-p2p`` vs ``flat-a2av`` is the measurement behind :mod:`runtime.exchange`'s choice of
point-to-point.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch
from mpi4py import MPI

import dataclasses

from actors.ep_moe import EPMoE, MicroBatch, run_comm
from actors.model import ModelConfig, MoE
from bench.output import write_result
from runtime.exchange import Exchange
from runtime.progress import Progress
from topology import (Layout, choose_replicas, emulated_cluster, hop_cost, plan_dispatch, rebalance, select_experts,
                      token_bytes)

VARIANTS = ("two-hop", "two-hop-fp8", "flat-p2p", "flat-a2av")
EXPERTS, TOP_K, GROUPS = 32, 8, 2


class Flat:
    """One-hop dispatch / combine of the same rows: once per (token, destination rank)."""

    def __init__(self, comm: MPI.Comm, ex: Exchange, phys: torch.Tensor, spr: int, fields: tuple):
        self.comm, self.ex, self.fields = comm, ex, fields
        self.size, self.me = comm.Get_size(), comm.Get_rank()
        rank = phys // spr
        self.rows = [(rank == j).any(1).nonzero().squeeze(1) for j in range(self.size)]

    def p2p(self, tensors: tuple) -> None:
        peers = list(range(self.size))
        op = self.ex.start({j: tuple(t[idx].contiguous() for t in tensors) for j, idx in enumerate(self.rows)},
                           peers, self.fields, phase="flat dispatch")
        got = op.wait()
        back = self.ex.start({j: (got[j][0],) for j in peers}, peers, self.fields[:1],
                             recv_rows={j: len(idx) for j, idx in enumerate(self.rows)}, phase="flat combine")
        got = back.wait()
        y = torch.zeros_like(tensors[0])
        for j, idx in enumerate(self.rows):
            y.index_add_(0, idx, got[j][0])

    def a2av(self, tensors: tuple) -> None:
        comm = self.comm
        counts = np.array([len(idx) for idx in self.rows], dtype=np.int64)
        rcounts = np.empty_like(counts)
        comm.Alltoall(counts, rcounts)
        order = torch.cat(self.rows)
        sends = [t[order].contiguous() for t in tensors]
        recvs = [torch.empty((int(rcounts.sum()), *t.shape[1:]), dtype=t.dtype) for t in tensors]
        reqs = [comm.Ialltoallv(*self._spec(s, r, counts, rcounts)) for s, r in zip(sends, recvs)]
        MPI.Request.Waitall(reqs)
        back = torch.empty_like(sends[0])
        comm.Ialltoallv(*self._spec(recvs[0], back, rcounts, counts)).Wait()
        y = torch.zeros_like(tensors[0])
        y.index_add_(0, order, back)

    @staticmethod
    def _spec(send: torch.Tensor, recv: torch.Tensor, scounts: np.ndarray, rcounts: np.ndarray):
        row_s = send.nbytes // max(send.shape[0], 1) if send.shape[0] else 0
        row_r = recv.nbytes // max(recv.shape[0], 1) if recv.shape[0] else 0
        row = max(row_s, row_r)
        sc, rc = scounts * row, rcounts * row
        sd, rd = np.r_[0, sc.cumsum()[:-1]], np.r_[0, rc.cumsum()[:-1]]
        return ([send.numpy().view(np.uint8), (sc, sd), MPI.BYTE], [recv.numpy().view(np.uint8), (rc, rd), MPI.BYTE])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.local -n 4 bench.moe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median reported)")
    p.add_argument("--iters", type=int, default=3, help="dispatch + combine pairs per measurement")
    p.add_argument("--tokens", type=int, default=1024, help="tokens routed by each rank")
    p.add_argument("--hidden", type=int, default=1024, help="token width (float32 rows)")
    p.add_argument("--out", default="bench/results/moe.json", help="JSON output path (rank 0 writes)")
    ns = p.parse_args(argv)
    comm = MPI.COMM_WORLD
    if comm.Get_size() != 4:
        print("bench.moe: run on 4 ranks (python -m launch.local -n 4 bench.moe)", file=sys.stderr)
        return 2
    me = comm.Get_rank()
    cluster = emulated_cluster(2, 2)
    group = Layout(cluster=cluster, pp=1, ep=4).ep_group(me)
    c = ModelConfig(hidden=ns.hidden, num_heads=4, moe_hidden=8, num_routed_experts=EXPERTS, top_k=TOP_K,
                    num_groups=GROUPS, topk_groups=GROUPS, num_shared_experts=0)
    phy2log, log2phy, logcnt = rebalance(torch.ones(1, EXPERTS), EXPERTS, GROUPS, 2, 4)
    engine = Progress(timeout_s=120)
    ex = Exchange(comm, engine, name="bench-moe")
    placed = dict(group=group, me=me, phy2log=phy2log[0], log2phy=log2phy[0], logcnt=logcnt[0], exchange=ex)
    ep = EPMoE(MoE(c, torch.Generator().manual_seed(0)), layer=0, **placed)
    c8 = dataclasses.replace(c, precision="fp8")
    ep8 = EPMoE(MoE(c8, torch.Generator().manual_seed(0)), layer=1, **placed)
    gen = torch.Generator().manual_seed(100 + me)
    h = torch.randn(ns.tokens, ns.hidden, generator=gen)
    w, idx = select_experts(torch.rand(ns.tokens, EXPERTS, generator=gen), None, num_groups=GROUPS,
                            topk_groups=GROUPS, top_k=TOP_K, route_scale=1.0)
    phys = choose_replicas(idx, phy2log[0], log2phy[0], logcnt[0], num_groups=GROUPS, num_nodes=2, num_devices=4)
    flat = Flat(comm, ex, phys, EXPERTS // 4, ep.wire.dispatch_fields())

    def two_hop(layer: EPMoE) -> None:
        mb = MicroBatch(0)
        mb.h, mb.w, mb.phys = h, w, phys
        run_comm(layer.dispatch(mb))
        mb.out = mb.xr.detach()
        run_comm(layer.combine(mb))

    run = {"two-hop": lambda: two_hop(ep), "two-hop-fp8": lambda: two_hop(ep8),
           "flat-p2p": lambda: flat.p2p((h, w, phys)), "flat-a2av": lambda: flat.a2av((h, w, phys))}
    for f in run.values():  # warm-up: first-touch of buffers, MPI connections
        f()
    wire_bytes = {}  # bytes all ranks sent in one dispatch + combine, per phase and link
    for name, layer in (("fp32", ep), ("fp8", ep8)):
        layer.traffic.clear()
        two_hop(layer)
        wire_bytes[name] = {k: comm.allreduce(v) for k, v in sorted(layer.traffic.items())}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(ns.rounds):
        for v in VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]:  # rotate the order every round
            comm.Barrier()
            t0 = time.perf_counter()
            for _ in range(ns.iters):
                run[v]()
            dt = (time.perf_counter() - t0) / ns.iters
            times[v].append(comm.allreduce(dt, op=MPI.MAX))

    # the cost model for the same token counts
    all_phys = comm.gather(phys)
    if me == 0:
        spr = EXPERTS // 4
        node_of = np.array(group.node_of)
        flat_counts = np.zeros((4, 4), dtype=np.int64)
        for src, ph in enumerate(all_phys):
            dest = (ph // spr).numpy()
            at = np.zeros((ph.shape[0], 4), dtype=bool)
            at[np.arange(ph.shape[0])[:, None], dest] = True
            flat_counts[src] += at.sum(0)
        cross = node_of[:, None] != node_of[None, :]
        model = {}
        for fmt, (dname, cname) in {"fp32": ("fp32", "fp32"), "v3": ("fp8", "bf16")}.items():
            db, cb = token_bytes(ns.hidden, dname), token_bytes(ns.hidden, cname)
            plan = plan_dispatch(all_phys, group, slots_per_rank=spr, dispatch_token_bytes=db, combine_token_bytes=cb)
            two = (hop_cost(plan.hop1, db, cluster.inter).seconds + hop_cost(plan.hop2, db, cluster.intra).seconds
                   + hop_cost(plan.combine_hop2, cb, cluster.intra).seconds
                   + hop_cost(plan.combine_hop1, cb, cluster.inter).seconds)
            one = (max(hop_cost(flat_counts * cross, db, cluster.inter).seconds,
                       hop_cost(flat_counts * ~cross, db, cluster.intra).seconds)
                   + max(hop_cost((flat_counts * cross).T, cb, cluster.inter).seconds,
                         hop_cost((flat_counts * ~cross).T, cb, cluster.intra).seconds))
            model[fmt] = {"two_hop_us": two * 1e6, "flat_us": one * 1e6,
                          "inter_bytes_two_hop": int(plan.hop1.sum() * db),
                          "inter_bytes_flat": int((flat_counts * cross).sum() * db)}
        med = {v: statistics.median(times[v]) for v in VARIANTS}
        print(f"EP dispatch + combine, 4 ranks as 2 emulated nodes x 2 (one host: both hops are shared memory), "
              f"{ns.tokens} tokens/rank, hidden {ns.hidden} fp32, top-{TOP_K} of {EXPERTS}, median of {ns.rounds} "
              f"interleaved rounds")
        print(f"{'variant':<13}{'measured ms':>12}{'vs flat-a2av':>14}")
        for v in VARIANTS:
            print(f"{v:<13}{med[v] * 1e3:>12.3f}{med[v] / med['flat-a2av']:>14.2f}")
        print("cost model at V3 link speeds (IB 50 GB/s, NVLink 160 GB/s per device), same token counts:")
        print(f"{'wire':<18}{'two-hop us':>12}{'flat us':>10}{'ratio':>8}{'inter MB two-hop':>18}{'inter MB flat':>15}")
        for fmt, m in model.items():
            label = "fp32/fp32" if fmt == "fp32" else "fp8 disp/bf16 comb"
            print(f"{label:<18}{m['two_hop_us']:>12.1f}{m['flat_us']:>10.1f}{m['two_hop_us'] / m['flat_us']:>8.2f}"
                  f"{m['inter_bytes_two_hop'] / 1e6:>18.2f}{m['inter_bytes_flat'] / 1e6:>15.2f}")
        print("wire bytes of one dispatch + combine, all ranks (measured, EPMoE.traffic; tokens incl. FP8 scales, "
              "meta = gate weights + slot ids):")
        print(f"{'wire':<18}{'dispatch MB':>13}{'meta MB':>9}{'combine MB':>12}{'total MB':>10}{'vs fp32':>9}")
        totals = {}
        for name, b in wire_bytes.items():
            disp = sum(v for k, v in b.items() if k.startswith("dispatch_") and not k.endswith("_meta"))
            meta = sum(v for k, v in b.items() if k.endswith("_meta"))
            comb = sum(v for k, v in b.items() if k.startswith("combine_"))
            totals[name] = disp + meta + comb
            label = "fp32/fp32" if name == "fp32" else "fp8 disp/bf16 comb"
            print(f"{label:<18}{disp / 1e6:>13.3f}{meta / 1e6:>9.3f}{comb / 1e6:>12.3f}{totals[name] / 1e6:>10.3f}"
                  f"{totals[name] / totals['fp32']:>9.3f}")
        write_result(ns.out, {"args": vars(ns), "times_s": times, "median_s": med, "model": model,
                              "wire_bytes": wire_bytes})
    ex.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
