"""Plan a full-scale training run without the hardware: ``python -m launch.plan --cluster v3-2048.toml``.

The only place that reads argv for :mod:`topology.plan`; the plan itself is pure.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from launch.cluster import add_cluster_arguments, cluster_from_args
from topology.plan import Plan, PlanConfig, plan_step

__all__ = ["main", "format_plan"]

PUBLISHED_HOURS_PER_T = 180e3
"""DeepSeek-V3 report: 2.664M H800 GPU-hours for 14.8T pre-training tokens, about 180K per trillion."""

_DESCRIPTION = """\
Price one optimizer step of DeepSeek-V3 (671B total / 37B active, 61 layers, MLA, 256 experts
top-8) on a described cluster and print: step time, pipeline bubble (simulated with the project's
schedule simulator), expert-parallel communication hidden under compute, MFU, memory per device,
and device-hours per trillion tokens next to the V3 report's 180K H800 GPU-hours -- with every
assumption it made. Nothing runs on a device.

Per-chunk F/B/W times come from FLOPs and each device kind's speed at the precision it trains in
(topology/kinds.py: peaks, relative speeds with sources and the cited efficiency; the cluster
file's [device_speed] overrides a speed); dispatch/combine from the topology
link model; DualPipe overlaps one microbatch's all-to-all with another's compute. The layer split
keeps every device within its kind's memory (topology/kinds.py memory_gb; printed as peak /
capacity) and refuses, naming the fixes, when no split fits.

What if: --pp / --ep / --microbatch-seqs / --global-batch, --no-node-limit, --schedule, or a
cluster file with other kinds (launch/clusters/v3-2048-h800-910c.toml: half the nodes Ascend 910C,
each pipeline rank one kind; v3-2048-h800-910c-mixed-ep.toml: the kinds interleaved node by node, so
every EP group mixes them and the expert placement weighs each device by its speed).
--split flops shows the layer split that ignores device speed (the default weighs it); the
other split's bubble is always printed for comparison.
"""

_EPILOG = """\
examples:
  python -m launch.plan --cluster v3-2048.toml
  python -m launch.plan --cluster v3-2048-h800-910c.toml
  python -m launch.plan --cluster v3-2048-h800-910c-mixed-ep.toml --redundant-experts 64
  python -m launch.plan --cluster v3-2048.toml --no-node-limit
  python -m launch.plan --nodes 256 --devices-per-node 8 --pp 8 --ep 32 --json
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.plan", description=_DESCRIPTION, epilog=_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cluster_arguments(p)
    d = PlanConfig()
    lay = p.add_argument_group("parallelism and batch (defaults: DeepSeek-V3's published setup)")
    lay.add_argument("--pp", type=int, default=d.pp, help=f"pipeline ranks (default {d.pp})")
    lay.add_argument("--ep", type=int, default=d.ep, help=f"expert-parallel group size (default {d.ep})")
    lay.add_argument("--schedule", default=d.schedule, choices=("dualpipe", "dualpipev", "1f1b", "zb1p"),
                     help=f"pipeline schedule (default {d.schedule})")
    lay.add_argument("--max-nodes", type=int, default=d.max_nodes,
                     help=f"node-limited routing: nodes a token may reach (default {d.max_nodes}; 0: no limit)")
    lay.add_argument("--no-node-limit", action="store_true", help="routing reaches any node of the EP group")
    lay.add_argument("--global-batch", type=int, default=d.global_batch,
                     help=f"sequences per step (default {d.global_batch}, V3)")
    lay.add_argument("--seq", type=int, default=d.seq, help=f"tokens per sequence (default {d.seq})")
    lay.add_argument("--microbatch-seqs", type=int, default=d.microbatch_seqs,
                     help=f"sequences per microbatch per data-parallel rank (default {d.microbatch_seqs}: an assumption)")
    lay.add_argument("--split", default=d.split, choices=("speed", "flops"),
                     help="layer split over stages: weighted by device speed (default) or by FLOPs only")
    lay.add_argument("--redundant-experts", type=int, default=d.redundant_experts,
                     help=f"expert slots per EP group beyond one per expert, a multiple of --ep (default "
                          f"{d.redundant_experts}, as V3 trained); with kinds mixed in an EP group they let the "
                          f"speed-aware placement give fast devices more load")
    lay.add_argument("--train-tokens", type=float, default=d.train_tokens,
                     help=f"tokens of the whole run (default {d.train_tokens:g})")
    lay.add_argument("--sample-tokens", type=int, default=d.sample_tokens,
                     help=f"routing sample per device for the link model (default {d.sample_tokens})")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of tables")
    return p


def format_plan(plan: Plan, source: str) -> str:
    """The plan as tables: headline figures, stages, memory, assumptions."""
    c = plan.config
    kinds = sorted(set(plan.pp_kinds))
    hours = plan.device_hours_per_trillion
    lines = [f"plan: {source}: {plan.num_devices} devices ({', '.join(kinds)}), {c.schedule} pp {c.pp} x dp "
             f"{plan.dp}, EP {c.ep}, {'no node limit' if c.max_nodes == 0 else f'max nodes per token {c.max_nodes}'}, "
             f"split {c.split}", ""]
    other = "flops" if c.split == "speed" else "speed"
    rows = [
        ("step time", f"{plan.step_seconds:.2f} s", f"pipeline {plan.pipeline_seconds:.2f} s + ZeRO-1 sync "
                                                     f"{plan.dp_sync_seconds * 1e3:.0f} ms"),
        ("bubble (mean idle / step)", f"{plan.bubble_fraction:.1%}",
         f"largest per-rank idle {plan.bubble_seconds:.2f} s; {other} split: {plan.alt_bubble_fraction:.1%} "
         f"(pipeline {plan.alt_pipeline_seconds:.2f} s)"),
        ("EP communication hidden", f"{plan.comm_hidden:.1%}",
         f"per MoE layer and microbatch: fwd {plan.comm.forward * 1e3:.2f} ms, bwd {plan.comm.backward * 1e3:.2f} ms; "
         f"{plan.comm.mean_nodes_per_token:.2f} nodes per token"),
        ("MFU", f"{plan.mfu:.1%}", f"{plan.model_flops_per_token / 1e9:.1f} GFLOP per token over every device's "
                                   f"dense peak at its precision"),
        ("memory per device (fullest)", f"{plan.memory_gb[plan.memory_worst]:.1f} GB",
         f"{plan.memory_worst} of {plan.memory_capacity_gb[plan.memory_worst]:g} GB: "
         + "; ".join(f"{k} {v:.1f}" for k, v in plan.memory_parts.items())),
        ("tokens per step", f"{plan.tokens_per_step / 1e6:.1f} M", f"{plan.microbatches} microbatches per pipeline"),
        ("device-hours per 1T tokens", f"{hours / 1e3:.0f} K",
         f"DeepSeek-V3 report: 180 K H800 GPU-hours (ratio {hours / PUBLISHED_HOURS_PER_T:.2f})"),
        (f"device-hours for {c.train_tokens / 1e12:g}T tokens", f"{hours * c.train_tokens / 1e12 / 1e6:.3f} M",
         "DeepSeek-V3 report: 2.664 M (pre-training, 14.8T)"),
    ]
    w = max(len(r[0]) for r in rows)
    v = max(len(r[1]) for r in rows)
    lines += [f"  {a:<{w}}  {b:>{v}}   {note}" for a, b, note in rows]
    lines += ["", "stages (layers per stage; pipeline rank kinds):"]
    lines.append("  " + " | ".join(f"s{i}:{len(s)}" for i, s in enumerate(plan.stage_layers)))
    lines.append("  " + " ".join(f"r{r}={k}" for r, k in enumerate(plan.pp_kinds)))
    lines += ["", "memory per device, GB (peak / capacity): " + ", ".join(
        f"{k} {g:.1f}/{plan.memory_capacity_gb[k]:g}" for k, g in plan.memory_gb.items())]
    lines += ["", "assumptions:"] + [f"  - {a}" for a in plan.assumptions]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    try:
        cluster = cluster_from_args(ns)
        config = PlanConfig(pp=ns.pp, ep=ns.ep, schedule=ns.schedule,
                            max_nodes=0 if ns.no_node_limit else ns.max_nodes, global_batch=ns.global_batch,
                            seq=ns.seq, microbatch_seqs=ns.microbatch_seqs, split=ns.split,
                            train_tokens=ns.train_tokens, sample_tokens=ns.sample_tokens,
                            redundant_experts=ns.redundant_experts)
        plan = plan_step(cluster, config)
    except ValueError as e:
        print(f"launch.plan: {e}", file=sys.stderr)
        return 2
    source = ns.cluster or (str(ns.hostfile) if ns.hostfile else f"{ns.nodes} x {ns.devices_per_node} {ns.kind}")
    if ns.json:
        out = asdict(plan)
        out["costs"] = {k: getattr(plan.costs, k) for k in ("f", "b", "w", "fb", "comm", "stage_scale", "rank_scale")}
        out["published_hours_per_trillion"] = PUBLISHED_HOURS_PER_T
        print(json.dumps(out, indent=1))
    else:
        print(format_plan(plan, source))
    return 0


if __name__ == "__main__":
    sys.exit(main())
