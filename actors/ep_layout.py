"""Expert-parallel job layout: pp x ep ranks on emulated nodes, communicators, expert placement and
the executor each pipeline rank runs its chunks with (composition only; the rules live in
:mod:`topology` and :mod:`actors.ep_stage`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from mpi4py import MPI

from actors.ep_stage import EPExecutor
from actors.ep_wire import node_wires
from actors.model import ModelConfig
from runtime.grid import Communicators, build_communicators
from topology import Layout, emulated_cluster, rebalance

__all__ = ["EPJob", "expert_parallel_job"]


@dataclass(slots=True)
class EPJob:
    """What a rank of a pp x ep job needs besides the schedule."""

    comms: Communicators
    """World, pipeline (``comms.pp``: the StageActor's), ep (the exchanges') ... communicators."""
    layout: Layout
    executor: Callable
    """``executor(chunks, engine)`` for :class:`~actors.pipeline.StageActor`."""
    placement: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    """Global MoE layer -> (phy2log, log2phy, logcnt) over an EP group."""

    def describe(self) -> list[str]:
        """The layout and the placement, for the start of a run's output."""
        lay = self.layout
        lines = [f"layout: pp={lay.pp} x ep={lay.ep} on {lay.cluster.num_nodes} emulated nodes of "
                 f"{lay.cluster.nodes[0].num_devices} ranks; EP groups span "
                 f"{lay.ep_group(0).num_nodes} nodes"]
        for ranks in lay.groups("ep"):
            g = lay.ep_group(ranks[0])
            lines.append(f"  stage {lay.place(ranks[0]).pp}: ranks {list(g.ranks)} on nodes {list(g.node_ids)}, "
                         f"rail peers {[sorted(lay.rail_peers(r).values()) for r in g.ranks]}")
        layer, (phy2log, _, logcnt) = next(iter(self.placement.items()))
        spr = phy2log.shape[0] // lay.ep
        lines.append(f"placement (layer {layer}, same for every MoE layer at start): "
                     + ", ".join(f"ep {e}: experts {phy2log[e * spr:(e + 1) * spr].tolist()}" for e in range(lay.ep))
                     + f"; replicas per expert {logcnt.tolist()}")
        return lines


def expert_parallel_job(world: MPI.Comm, *, pp: int, ep: int, nodes: int, model: ModelConfig, microbatches: int,
                        num_replicas: int = 0, precisions: Sequence[str] | None = None,
                        speeds: Sequence[float] | None = None, trace: bool = False) -> EPJob:
    """Split ``world`` (pp x ep ranks) as ``topology.Layout`` over ``pp * nodes`` emulated nodes of
    ``ep / nodes`` ranks (each stage's EP group spans ``nodes`` of them) and place every MoE layer's
    experts over an EP group with ``topology.rebalance`` (uniform load; ``num_replicas`` slots, 0:
    one per expert). ``precisions``: every world rank's GEMM precision (default: all
    ``model.precision``), from which each EP exchange's wire format is decided; the ranks of one
    emulated node must share one (ValueError otherwise, on every rank alike). ``speeds``: every world
    rank's relative speed at the precision it runs (default: all equal); each EP group's placement
    then gives a device load in proportion to its speed (``rebalance(device_speed=)``; equal speeds
    give exactly the placement without them). ``trace``: the executor logs every EP exchange as a span."""
    layout = Layout(cluster=emulated_cluster(pp * nodes, ep // nodes), pp=pp, ep=ep)
    comms = build_communicators(world, layout)
    experts = model.num_routed_experts
    moe_layers = list(range(model.num_dense_layers, model.num_layers))
    group = layout.ep_group(world.Get_rank())
    if speeds is not None and len(speeds) != world.Get_size():
        raise ValueError(f"speeds: {len(speeds)} entries for {world.Get_size()} ranks")
    group_speed = None
    if speeds is not None:
        # one placement for every group (DualPipe's mirror copies sum expert gradients slot by slot), so
        # every group must weigh its ep ranks alike; a placement depends on the speeds' ratios only
        mixes = {tuple(float(speeds[r]) / max(float(speeds[x]) for x in ranks) for r in ranks)
                 for ranks in layout.groups("ep")}
        if len(mixes) > 1:
            raise ValueError(f"speeds: EP groups differ in their devices' relative speeds ({sorted(mixes)}); give "
                             f"every pipeline rank's group the same mix of device kinds, in the same ep order")
        group_speed = torch.tensor([float(speeds[r]) for r in group.ranks])
    phy2log, log2phy, logcnt = rebalance(torch.ones(len(moe_layers), experts), num_replicas or experts,
                                         model.num_groups, nodes, ep, device_speed=group_speed)
    placement = {layer: (phy2log[i], log2phy[i], logcnt[i]) for i, layer in enumerate(moe_layers)}
    precisions = list(precisions) if precisions is not None else [model.precision] * world.Get_size()
    if len(precisions) != world.Get_size():
        raise ValueError(f"precisions: {len(precisions)} entries for {world.Get_size()} ranks")
    for ranks in layout.groups("ep"):  # every group, so that every rank reaches the same verdict
        g = layout.ep_group(ranks[0])
        node_wires([precisions[r] for r in g.ranks], g.node_of, hidden=model.hidden, top_k=model.top_k)
    group_precisions = [precisions[r] for r in group.ranks]

    def executor(chunks, engine) -> EPExecutor:
        return EPExecutor(chunks, comm=comms.ep, group=group, placement=placement, engine=engine,
                          microbatches=microbatches, precisions=group_precisions, trace=trace)

    return EPJob(comms=comms, layout=layout, executor=executor, placement=placement)
