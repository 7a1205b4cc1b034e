"""Show a cluster's rank layout, expert placement and predicted dispatch/combine traffic:
``python -m launch.topology --nodes 8 --devices-per-node 8 --experts 256 --top-k 8 --max-nodes 4``.

The only place that reads argv for :mod:`topology`; everything there is pure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from launch.cluster import add_cluster_arguments, cluster_from_args
from topology import (TOKEN_DTYPES, HopCost, Layout, TrafficPrediction, expected_nodes_per_token, imbalance,
                      predict_traffic, rebalance)

__all__ = ["main"]

_DESCRIPTION = """\
Describe a cluster once (--cluster FILE, --hostfile FILE, or --nodes N --devices-per-node G) and
print what follows from it:

  1. the rank layout: pp stages x dp ranks, expert-parallel groups of --ep ranks inside each stage,
     spanning nodes; rank -> node, local index, pipeline rank, ep group/rank, rail, device kind
     (summarised above 16 ranks);
  2. the expert placement of EP group 0 (topology.rebalance; --replicas slots, --groups groups,
     the load from --load or uniform) with its balance: max/mean device load per layer;
  3. the predicted dispatch and combine of one microbatch (--tokens per device, hidden --hidden,
     FP8 out / BF16 back as in DeepSeek-V3) over EP group 0, WITHOUT node limiting and WITH it
     (each token reaches at most --max-nodes groups): average nodes per token (sampled, and the
     closed form for balanced random routing when groups = nodes; redundant replicas can only
     lower the sampled figure: a token may find two experts' replicas on one node it reaches),
     bytes over each link class (inter-node, e.g. IB, and intra-node, e.g. NVLink) and the time
     of the busiest device (bytes / bandwidth + messages x latency; links from the cluster).

Routing is balanced random (independent uniform scores per token and expert); with --load the
placement follows the load but routing stays uniform. MB = 10^6 bytes.

cluster TOML format: see topology/cluster.py (sections [intra], [inter], [device_speed], [[nodes]]).
"""

_EPILOG = """\
examples:
  python -m launch.topology --nodes 8 --devices-per-node 8 --experts 256 --top-k 8 --max-nodes 4
  python -m launch.topology --nodes 256 --devices-per-node 8 --pp 16 --ep 64 --experts 256 --top-k 8 --max-nodes 4
  python -m launch.topology --cluster cluster.toml --experts 256 --top-k 8 --max-nodes 4 --load loads.npy --json
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.topology", description=_DESCRIPTION, epilog=_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cluster_arguments(p)
    lay = p.add_argument_group("layout")
    lay.add_argument("--pp", type=int, default=1, help="pipeline stages (default 1)")
    lay.add_argument("--ep", type=int, help="ranks per expert-parallel group; divides the ranks per stage "
                                            "(default: all ranks of a stage)")
    moe = p.add_argument_group("experts and routing")
    moe.add_argument("--experts", type=int, default=256, help="routed experts per MoE layer (default 256)")
    moe.add_argument("--top-k", type=int, default=8, help="experts per token (default 8)")
    moe.add_argument("--max-nodes", type=int, default=4,
                     help="M: groups (= nodes when --groups equals the EP group's node count) a token may reach "
                          "(default 4)")
    moe.add_argument("--groups", type=int,
                     help="expert groups of node-limited routing (default: the nodes of an EP group)")
    moe.add_argument("--replicas", type=int, help="physical expert slots per EP group (default --experts: no "
                                                  "redundant experts); a multiple of --ep")
    moe.add_argument("--load", type=Path, help="numpy .npy of [layers, experts] expert loads for the placement "
                                               "(default: one layer of equal loads)")
    tr = p.add_argument_group("traffic")
    tr.add_argument("--hidden", type=int, default=7168, help="model width (default 7168, V3)")
    tr.add_argument("--moe-hidden", type=int, default=2048,
                    help="routed-expert inner width, for the expert GEMM time next to the traffic (default 2048)")
    tr.add_argument("--tokens", type=int, default=4096, help="tokens per device per microbatch (default 4096)")
    tr.add_argument("--dispatch-dtype", choices=TOKEN_DTYPES, default="fp8",
                    help="wire format out (default fp8: 1 B per value + a float32 scale per 128)")
    tr.add_argument("--combine-dtype", choices=TOKEN_DTYPES, default="bf16", help="wire format back (default bf16)")
    tr.add_argument("--seed", type=int, default=0, help="seed of the sampled routing (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text report")
    return p


def _load(ns: argparse.Namespace) -> torch.Tensor:
    if ns.load is None:
        return torch.ones(1, ns.experts)
    try:
        load = np.load(ns.load, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"--load {str(ns.load)!r}: cannot read a .npy array ({e})") from None
    if load.ndim != 2 or load.shape[1] != ns.experts:
        raise ValueError(f"--load: shape {load.shape}; expected [layers, {ns.experts}] (one row per layer, "
                         f"one column per expert, as --experts says)")
    return torch.from_numpy(load.astype(np.float64))


def _layout_lines(layout: Layout) -> list[str]:
    c = layout.cluster
    kinds = sorted({n.kind for n in c.nodes})
    lines = [f"cluster: {c.num_nodes} nodes, {c.num_devices} devices ({', '.join(kinds)}); "
             f"inter-node {c.inter.name} {c.inter.bandwidth_gbs:g} GB/s {c.inter.latency_us:g} us, "
             f"intra-node {c.intra.name} {c.intra.bandwidth_gbs:g} GB/s {c.intra.latency_us:g} us per device",
             f"layout: pp {layout.pp} x dp {layout.dp} = {layout.num_ranks} ranks; {layout.num_ep_groups} EP group(s) "
             f"of {layout.ep} per stage"]
    if layout.num_ranks < c.num_devices:
        lines.append(f"  ({c.num_devices - layout.num_ranks} devices unused)")
    if layout.num_ranks <= 16:
        lines.append("  rank  node         local  pp  dp  ep-group  ep  rail  kind")
        for p in layout.places:
            lines.append(f"  {p.rank:>4}  {c.nodes[p.node].name:<12} {p.local:>5}  {p.pp:>2}  {p.dp:>2}  "
                         f"{p.ep_group:>8}  {p.ep:>2}  {p.rail:>4}  {p.kind}")
        return lines
    for s in range(layout.pp):
        parts = []
        for g in range(layout.num_ep_groups):
            grp = layout.ep_group(s * layout.dp + g * layout.ep)
            parts.append(f"EP group {g}: ranks {grp.ranks[0]}-{grp.ranks[-1]} on nodes "
                         f"{c.nodes[grp.node_ids[0]].name}..{c.nodes[grp.node_ids[-1]].name} ({grp.num_nodes})")
        if s < 2 or s == layout.pp - 1:
            lines.append(f"  stage {s}: " + "; ".join(parts))
        elif s == 2:
            lines.append("  ...")
    p0 = layout.place(0)
    lines.append(f"  rank 0: node {c.nodes[p0.node].name}, local {p0.local}; rail peers "
                 + ", ".join(f"{c.nodes[n].name}:{r}" for n, r in layout.rail_peers(0).items()))
    return lines


def _traffic_rows(t: TrafficPrediction, label: str) -> list[str]:
    rows = []
    for name, hops in (("dispatch", t.dispatch), ("combine", t.combine)):
        for h in hops:
            rows.append(f"  {label:<16} {name:<8} {h.link:<7} {h.total_bytes / 1e6:>11.1f} "
                        f"{h.max_device_bytes / 1e6:>10.2f} {h.max_device_messages:>5} {h.seconds * 1e3:>8.3f}")
    return rows


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    try:
        cluster = cluster_from_args(ns)
        layout = Layout(cluster=cluster, pp=ns.pp, ep=ns.ep or Layout(cluster=cluster, pp=ns.pp).dp)
        group = layout.ep_group(0)
        num_groups = ns.groups or group.num_nodes
        replicas = ns.replicas or ns.experts
        for name, v in (("--experts", ns.experts), ("--top-k", ns.top_k), ("--max-nodes", ns.max_nodes),
                        ("--tokens", ns.tokens), ("--moe-hidden", ns.moe_hidden), ("--groups", num_groups)):
            if v < 1:
                raise ValueError(f"{name}={v}: must be a positive integer")
        if ns.max_nodes > num_groups:
            raise ValueError(f"--max-nodes={ns.max_nodes}: at most --groups={num_groups}")
        load = _load(ns)
        speed = torch.tensor([cluster.speed(group.node_ids[k]) for k in group.node_of], dtype=torch.float64)
        phy2log, log2phy, logcnt = rebalance(load, replicas, num_groups, group.num_nodes, group.size,
                                             device_speed=speed)
        balance = imbalance(load, phy2log, group.size, speed)
        kw = dict(phy2log=phy2log[0], log2phy=log2phy[0], logcnt=logcnt[0], num_groups=num_groups, top_k=ns.top_k,
                  tokens_per_rank=ns.tokens, hidden=ns.hidden, moe_hidden=ns.moe_hidden,
                  dispatch_dtype=ns.dispatch_dtype, combine_dtype=ns.combine_dtype, seed=ns.seed)
        free = predict_traffic(cluster, group, topk_groups=num_groups, **kw)
        limited = predict_traffic(cluster, group, topk_groups=ns.max_nodes, **kw)
    except ValueError as e:
        print(f"launch.topology: error: {e}", file=sys.stderr)
        return 2
    closed = expected_nodes_per_token(ns.experts, num_groups, ns.top_k) if num_groups == group.num_nodes else None

    if ns.json:
        def hop(h: HopCost) -> dict:
            return {"link": h.link, "total_bytes": h.total_bytes, "max_device_bytes": h.max_device_bytes,
                    "max_device_messages": h.max_device_messages, "seconds": h.seconds}

        def pred(t: TrafficPrediction) -> dict:
            return {"max_groups": t.topk_groups, "mean_nodes_per_token": t.mean_nodes_per_token,
                    "max_nodes_per_token": t.max_nodes_per_token, "link_bytes": t.link_bytes,
                    "dispatch": {"inter": hop(t.dispatch[0]), "intra": hop(t.dispatch[1])},
                    "combine": {"inter": hop(t.combine[0]), "intra": hop(t.combine[1])},
                    "expert_seconds": t.expert_seconds}
        print(json.dumps({
            "cluster": {"nodes": [{"name": n.name, "devices": n.num_devices, "kind": n.kind} for n in cluster.nodes],
                        "inter": {"name": cluster.inter.name, "bandwidth_gbs": cluster.inter.bandwidth_gbs,
                                  "latency_us": cluster.inter.latency_us},
                        "intra": {"name": cluster.intra.name, "bandwidth_gbs": cluster.intra.bandwidth_gbs,
                                  "latency_us": cluster.intra.latency_us}},
            "layout": {"pp": layout.pp, "dp": layout.dp, "ep": layout.ep, "ranks": [
                {"rank": p.rank, "node": cluster.nodes[p.node].name, "local": p.local, "pp": p.pp, "dp": p.dp,
                 "ep_group": p.ep_group, "ep": p.ep, "rail": p.rail, "kind": p.kind} for p in layout.places]},
            "placement": {"ep_group_ranks": list(group.ranks), "replicas": replicas, "groups": num_groups,
                          "phy2log": phy2log.tolist(), "max_over_mean": balance.tolist()},
            "traffic": {"tokens_per_device": ns.tokens, "hidden": ns.hidden,
                        "closed_form_nodes_per_token": closed, "no_limit": pred(free), "limited": pred(limited)},
        }))
        return 0

    lines = _layout_lines(layout)
    lines += ["", f"placement of EP group 0 ({group.size} ranks on {group.num_nodes} nodes): {ns.experts} experts in "
                  f"{num_groups} groups, {replicas} slots ({replicas // group.size} per device), load "
                  f"{'from ' + str(ns.load) if ns.load else 'uniform'}",
              f"  max/mean device load over {len(balance)} layer(s): mean {balance.mean():.3f}, "
              f"worst {balance.max():.3f}"]
    if group.size <= 16:
        per = replicas // group.size
        for e in range(group.size):
            lines.append(f"  ep {e:>2} (node {cluster.nodes[group.node_ids[group.node_of[e]]].name}): experts "
                         f"{phy2log[0, e * per:(e + 1) * per].tolist()}")
    lines += ["", f"dispatch/combine per microbatch: {ns.tokens} tokens per device x {group.size} devices, hidden "
                  f"{ns.hidden} ({ns.dispatch_dtype} out, {ns.combine_dtype} back), top-{ns.top_k}, balanced random "
                  f"routing (seed {ns.seed})"]
    cf = "" if closed is None else f" (closed form {closed:.4f}" + (")" if replicas == ns.experts else
                                                                   ", an upper bound with redundant replicas)")
    lines.append(f"  nodes per token without node limit: mean {free.mean_nodes_per_token:.4f}{cf}, max "
                 f"{free.max_nodes_per_token}")
    lines.append(f"  nodes per token with M = {ns.max_nodes}:       mean {limited.mean_nodes_per_token:.4f}, max "
                 f"{limited.max_nodes_per_token}")
    lines += ["  routing          phase    link      total MB  busiest MB  msgs  time ms"]
    lines += _traffic_rows(free, "no node limit") + _traffic_rows(limited, f"M = {ns.max_nodes}")
    saved = 1 - limited.dispatch[0].total_bytes / free.dispatch[0].total_bytes if free.dispatch[0].total_bytes else 0.0
    lines.append(f"  node limiting cuts inter-node bytes by {100 * saved:.1f}%; busiest-device time "
                 f"{free.dispatch[0].link} dispatch {free.dispatch[0].seconds * 1e3:.3f} -> "
                 f"{limited.dispatch[0].seconds * 1e3:.3f} ms")
    lines.append(f"  expert GEMMs (forward, slowest device, moe hidden {ns.moe_hidden}): "
                 f"{limited.expert_seconds * 1e3:.3f} ms with M = {ns.max_nodes}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
