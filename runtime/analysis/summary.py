"""Summaries: the figures of one schedule over measured steps (:func:`summarize`, what
``bench.pipeline`` tabulates) and the full report of one run (:func:`report`, what
``launch.analyze`` prints): per rank and overall step time, compute, communication and how much of
it was hidden under compute, idle split into waiting for input / pipeline drain / executor
overhead, measured bubble next to the simulator's, tokens/s, peak memory, the slowest rank and
stage, bubble time attributed to schedule actions, and traffic by link class; with expert
parallelism, the EP exchanges by phase and link class and the expert-load balance
(:mod:`runtime.analysis.exchanges`).

Definitions of the figures: :mod:`runtime.analysis.steps` (idle split),
:mod:`runtime.analysis.messages` (communication, hidden, traffic),
:mod:`runtime.analysis.predict` (simulator costs), :mod:`runtime.analysis.attribution`.
Per rank in :func:`report`: ``comm_ms`` = in-flight time of the messages the rank received,
``hidden_pct`` = the part of it the rank did not spend waiting; compute / idle figures are medians
over the steps, communication figures means.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from runtime.analysis.attribution import attribute_waits, pipeline_enders, waited_on
from runtime.analysis.exchanges import ep_step_figures, exchange_table
from runtime.analysis.load import LogError, RunLog
from runtime.analysis.messages import Message, fb_overlap, hop_latency, host_link_class, match_messages, plan, traffic
from runtime.analysis.predict import (compute_means, costs_from_means, predicted_waits, stage_means,
                                      stage_scale_from, unexpected_waits)
from runtime.analysis.steps import NS_PER_MS, StepLog, select_steps, split_steps, step_figures
from runtime.schedules import Schedule, SimResult, build, simulate

__all__ = ["summarize", "report", "Replica", "replica"]


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def summarize(runs: list[tuple[Schedule, list[StepLog]]], *, wait_threshold_ms: float | None = None) -> dict:
    """All figures of one schedule from its measured steps (several runs of the same schedule).

    Returns step times, idle accounting (median over steps, per rank), mean compute times,
    the per-hop latency, the simulator's figures for the measured costs, the FB overlap and the
    unexpected waits. Needs at least one step.
    """
    return _summarize(runs, wait_threshold_ms)[0]


def _summarize(runs: list[tuple[Schedule, list[StepLog]]],
               wait_threshold_ms: float | None) -> tuple[dict, list[Message], SimResult]:
    schedule = runs[0][0]
    p = plan(schedule)
    steps = [st for _, sts in runs for st in sts]
    if not steps:
        raise ValueError(f"{schedule.name}: no measured steps to summarize")
    figs = [step_figures(st) for st in steps]
    msgs, missing = [], 0
    for st in steps:
        got, miss = match_messages(st, p)
        msgs += got
        missing += miss
    means = compute_means(steps, p)
    comm_ms, comm_n = hop_latency(msgs)
    per_stage = stage_means(steps)
    costs = costs_from_means(means, comm_ms, stage_scale_from(per_stage, schedule.num_stages))
    sim = simulate(schedule, costs)
    ranks = sorted(figs[0].idle_ms)
    step_ms = _median([f.wall_ms for f in figs])
    idle = {r: _median([f.idle_ms[r] for f in figs]) for r in ranks}
    med = lambda attr: {r: _median([getattr(f, attr)[r] for f in figs]) for r in ranks}  # noqa: E731
    wait, drain, over, over_f0, busy = (med(a) for a in ("wait_ms", "drain_ms", "overhead_ms", "overhead_f0_ms",
                                                         "busy_ms"))
    bubble = max(idle.values())
    no_over = max(_median([f.idle_ms[r] - f.overhead_ms[r] for f in figs]) for r in ranks)
    sim_bubble = sim.bubble
    threshold = wait_threshold_ms if wait_threshold_ms is not None else max(1.0, 0.05 * costs.f)
    return {
        "schedule": schedule.name,
        "pp": schedule.pp,
        "stages": schedule.num_stages,
        "microbatches": schedule.microbatches,
        "steps_measured": len(steps),
        "step_ms": [f.wall_ms for f in figs],
        "median_step_ms": step_ms,
        "median_makespan_ms": _median([f.makespan_ms for f in figs]),
        "median_tail_ms": _median([f.tail_ms for f in figs]),
        "busy_ms": busy,
        "idle_ms": idle,
        "wait_ms": wait,
        "drain_ms": drain,
        "overhead_ms": over,
        "overhead_f0_ms": over_f0,
        "bubble_ms": bubble,
        "bubble_fraction": bubble / step_ms,
        "bubble_without_overhead_ms": no_over,
        "means": means,
        "stage_means_ms": per_stage,
        "stage_scale": list(costs.stage_scale),
        "comm_per_hop_ms": comm_ms,
        "comm_samples": comm_n,
        "messages_unmatched": missing,
        "costs_ms": {"f": costs.f, "b": costs.b, "w": costs.w, "fb": costs.fb, "comm": costs.comm},
        "sim": {"makespan_ms": sim.makespan, "busy_ms": dict(enumerate(sim.busy)),
                "idle_ms": dict(enumerate(sim.idle)), "bubble_ms": sim_bubble,
                "bubble_fraction": sim_bubble / step_ms},
        "bubble_diff_pct_of_step": 100.0 * (bubble - sim_bubble) / step_ms,
        "bubble_without_overhead_diff_pct_of_step": 100.0 * (no_over - sim_bubble) / step_ms,
        "fb_overlap": fb_overlap(msgs, hop_ms=comm_ms) if p.pairs else None,
        "all_overlap": fb_overlap(msgs, fb_only=False, hop_ms=comm_ms),
        "unexpected_waits": unexpected_waits(steps, sim, threshold_ms=threshold, messages=msgs),
        "unexpected_wait_threshold_ms": threshold,
    }, msgs, sim


@dataclass(frozen=True, slots=True)
class Replica:
    """One pipeline replica of a run: its ranks' records keyed by pipeline rank."""

    schedule: Schedule
    ep: int
    """Expert-parallel ranks per pipeline stage (1: the world ranks are the pipeline ranks)."""
    ep_index: int
    world: dict[int, int]
    """Pipeline rank -> world rank."""
    records: dict[int, list[dict]]
    hosts: dict[int, str]


def replica(log: RunLog, ep_index: int = 0) -> Replica:
    """The pipeline ranks of EP index ``ep_index``: with ``ep`` expert-parallel ranks per stage,
    launch.train puts pipeline rank ``p``'s EP rank ``e`` on world rank ``p * ep + e``, and the
    pipeline's messages name peers by pipeline rank. Each EP index is a full pipeline replica; the
    analysis looks at one at a time (its EP exchanges run inside F and B: they count as compute)."""
    cfg = log.config
    try:
        schedule = build(cfg["schedule"], cfg["pp"], cfg["microbatches"])
    except (KeyError, ValueError) as exc:
        raise LogError(f"{log.run_dir}: rank 0's config record does not name a schedule this version builds: "
                       f"{exc}") from None
    ep = int(cfg.get("ep") or 1)
    if not 0 <= ep_index < ep:
        raise LogError(f"{log.run_dir}: EP index {ep_index} does not exist: the run has ep={ep} (pick 0..{ep - 1})")
    world = {p: p * ep + ep_index for p in range(schedule.pp)}
    missing = sorted(w for w in world.values() if w not in log.spans)
    if missing:
        raise LogError(f"{log.run_dir}: no logs of world ranks {missing} (pp={schedule.pp}, ep={ep})")
    return Replica(schedule=schedule, ep=ep, ep_index=ep_index, world=world,
                   records={p: log.spans[w] for p, w in world.items()},
                   hosts={p: log.hosts.get(w) for p, w in world.items()})


def report(log: RunLog, *, first: int | None = None, stop: int | None = None, ep_index: int = 0,
           link_class: Callable[[int, int], str] | None = None) -> dict:
    """Every figure of one run over its steps ``first:stop`` (module docstring); JSON-ready.

    Ranks are pipeline ranks of the replica :func:`replica` picks (the world ranks when ep = 1).
    ``link_class(src, dst)`` names the link between two of them (default: intra-/inter-node from
    the logged hosts). Raises :class:`LogError` if no complete step falls in the range.
    """
    rep = replica(log, ep_index)
    schedule = rep.schedule
    cfg = log.config
    every = split_steps(rep.records)
    steps = select_steps(every, first, stop)
    if not steps:
        have = f"{every[0].step}..{every[-1].step}" if every else "none"
        raise LogError(f"{log.run_dir}: no step every rank completed in --steps "
                       f"{'' if first is None else first}:{'' if stop is None else stop} (complete steps: {have})")
    s, msgs, sim = _summarize([(schedule, steps)], None)
    n = len(steps)
    ranks = sorted(rep.records)
    comm, exposed = defaultdict(int), defaultdict(int)
    for m in msgs:
        comm[m.dst] += m.comm_ns
        exposed[m.dst] += m.exposed_ns
    per_rank = {}
    for r in ranks:
        mem = [st.ranks[r].step_span.get("peak_mem_bytes") for st in steps]
        mem = [v for v in mem if v is not None]
        per_rank[r] = {
            "world_rank": rep.world[r],
            "host": rep.hosts.get(r),
            "clock_offset_ms": log.clocks.get(rep.world[r], {}).get("offset_ns", 0) / NS_PER_MS,
            "clock_rtt_us": log.clocks.get(rep.world[r], {}).get("rtt_ns", 0) / 1e3,
            "step_ms": _median([(st.ranks[r].step_span["t1"] - st.ranks[r].step_span["t0"]) / NS_PER_MS
                                for st in steps]),
            "compute_ms": s["busy_ms"][r],
            "comm_ms": comm[r] / n / NS_PER_MS,
            "comm_exposed_ms": exposed[r] / n / NS_PER_MS,
            "hidden_pct": 100.0 * (comm[r] - exposed[r]) / comm[r] if comm[r] else None,
            "idle_ms": s["idle_ms"][r],
            "wait_ms": s["wait_ms"][r],
            "drain_ms": s["drain_ms"][r],
            "overhead_ms": s["overhead_ms"][r],
            "peak_mem_bytes": max(mem) if mem else None,
        }
    total_comm, total_exp = sum(comm.values()), sum(exposed.values())
    stage_ms: dict[int, float] = defaultdict(float)
    for st in steps:
        for rs in st.ranks.values():
            for c in rs.compute:
                stage_ms[c["stage"]] += (c["t1"] - c["t0"]) / NS_PER_MS / n
    slow_rank = max(ranks, key=lambda r: per_rank[r]["compute_ms"])
    slow_stage = max(stage_ms, key=stage_ms.get) if stage_ms else None
    causes = attribute_waits(msgs, n, predicted_waits(sim))
    window = (min(st.start for st in steps), max(st.end for st in steps))
    losses = [p for p in log.progress if steps[0].step <= p.get("step", -1) <= steps[-1].step]
    tokens = cfg.get("tokens_per_step")
    return {
        "run": str(log.run_dir),
        "schedule": schedule.name, "pp": schedule.pp, "stages": schedule.num_stages,
        "microbatches": schedule.microbatches,
        "ep": rep.ep, "ep_index": rep.ep_index,
        "steps": [st.step for st in steps],
        "steps_logged": len(every),
        "problems": log.problems,
        "step_ms": s["median_step_ms"],
        "makespan_ms": s["median_makespan_ms"],
        "tail_ms": s["median_tail_ms"],
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / (s["median_step_ms"] / 1e3) if tokens else None,
        "loss": {"first": losses[0]["loss"], "last": losses[-1]["loss"]} if losses else None,
        "ranks": per_rank,
        "overall": {
            "compute_ms": sum(per_rank[r]["compute_ms"] for r in ranks),
            "comm_ms": total_comm / n / NS_PER_MS,
            "hidden_pct": 100.0 * (total_comm - total_exp) / total_comm if total_comm else None,
            **{k: sum(per_rank[r][k] for r in ranks) for k in ("idle_ms", "wait_ms", "drain_ms", "overhead_ms")},
        },
        "bubble": {"measured_ms": s["bubble_ms"], "measured_fraction": s["bubble_fraction"],
                   "without_overhead_ms": s["bubble_without_overhead_ms"],
                   "sim_ms": s["sim"]["bubble_ms"], "sim_fraction": s["sim"]["bubble_fraction"],
                   "diff_pct_of_step": s["bubble_diff_pct_of_step"],
                   "without_overhead_diff_pct_of_step": s["bubble_without_overhead_diff_pct_of_step"],
                   "sim_makespan_ms": s["sim"]["makespan_ms"], "costs_ms": s["costs_ms"],
                   "stage_scale": s["stage_scale"]},
        "means_ms": {k: v["mean_ms"] for k, v in s["means"].items()},
        "comm_per_hop_ms": s["comm_per_hop_ms"],
        "fb_overlap": s["fb_overlap"],
        "slowest_rank": {"rank": slow_rank, "compute_ms": per_rank[slow_rank]["compute_ms"]},
        "slowest_stage": None if slow_stage is None else {"stage": slow_stage, "compute_ms": stage_ms[slow_stage]},
        "stage_compute_ms": dict(sorted(stage_ms.items())),
        "waits": [{"rank": c.rank, "action": c.action, "on_rank": c.on_rank, "on_action": c.on_action,
                   "wait_ms": c.wait_ms, "producer_ms": c.producer_ms, "in_flight_ms": c.in_flight_ms,
                   "after_ms": c.after_ms, "predicted_ms": c.predicted_ms} for c in causes],
        "waited_on": waited_on(causes),
        "pipeline_end": pipeline_enders(steps),
        "traffic": traffic(rep.records, link_class or host_link_class(rep.hosts), window),
        "messages_unmatched": s["messages_unmatched"],
        # expert parallelism: every world rank's exchanges, by each rank's own step boundaries
        "ep_exchanges": exchange_table(log.spans, {st.step for st in steps}) if rep.ep > 1 else None,
        "ep_steps": ep_step_figures(log.ep_steps, {st.step for st in steps}, rep.ep) if rep.ep > 1 else None,
    }
