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

``raise`` (2 ranks): rank 1 raises right after posting its dispatch; the actor's failure report
must list the pending exchange (layer, mb, phase, communicator, peers not heard from).
"""

from __future__ import annotations

import json
import sys

import torch
from mpi4py import MPI

from actors.ep_moe import EPMoE, MicroBatch, run_comm
from actors.model import ModelConfig, MoE
from kernels.testing import calc_diff, rel_error
from runtime import log
from runtime.actor import Actor
from runtime.exchange import Exchange
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
    pair = world.Split(world.Get_rank() // 2, world.Get_rank())
    ep2 = run_case(pair, "ep2", nodes=2, per_node=1, topk_groups=2, num_replicas=8)
    pair.Free()
    ep2_all = world.gather(ep2)
    if world.Get_rank() == 0:
        with open(f"{LOG_DIR}/ep-results.jsonl", "a") as fh:
            for r in results + [dict(ep2_all[0], group_ranks=[0, 1]), dict(ep2_all[2], group_ranks=[2, 3])]:
                fh.write(json.dumps(r) + "\n")
    print(f"rank {world.Get_rank()}: all ep checks ok", flush=True)


if __name__ == "__main__":
    main()
