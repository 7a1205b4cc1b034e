"""Analyse a training run's logs: ``python -m launch.analyze logs/<run-id>`` (``make analyze``: the newest run).

Prints, per rank and overall: step time, compute, communication and the part of it hidden under
compute, idle split into waiting for input / pipeline drain / executor overhead, the measured
bubble next to the schedule simulator's prediction for the measured F/B/W costs, tokens/s, peak
memory, the slowest rank and stage, bubble time attributed to schedule actions (which F/B waited,
on whom, and whether the producer was late or the message in flight), traffic by message kind
and link class, and with expert parallelism the dispatch / combine exchanges by phase and link
class (in flight, blocked, hidden), bytes per step per link class and the expert-load balance. ``--trace`` writes a Chrome trace-event JSON (open it in ui.perfetto.dev),
``--png`` a timeline picture. Definitions of every figure: ``runtime/analysis/`` and the README
section "Logs and their analysis".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from runtime.analysis import LogError, newest_run, read_run, replica, report, select_steps, split_steps
from runtime.analysis.load import rank_files
from runtime.analysis.messages import plan
from runtime.analysis.timeline import draw_timeline
from runtime.analysis.trace import chrome_trace, write_trace

__all__ = ["main", "parse_steps"]

TIMELINE_STEPS = 2
"""The PNG shows the last this many analysed steps (more would not be readable)."""


def parse_steps(text: str) -> tuple[int | None, int | None]:
    """``A:B`` (steps A..B-1), ``A:``, ``:B`` or ``A`` (just step A) -> (first, stop)."""
    try:
        if ":" not in text:
            k = int(text)
            return k, k + 1
        a, b = text.split(":", 1)
        first, stop = (int(a) if a.strip() else None), (int(b) if b.strip() else None)
    except ValueError:
        raise ValueError(f"--steps {text!r}: expected A:B, A:, :B or A with integer step numbers (e.g. 3:10)") from None
    if first is not None and stop is not None and stop <= first:
        raise ValueError(f"--steps {text!r}: the range is empty (B must exceed A)")
    return first, stop


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.analyze", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("run", help="a run folder (LOG_DIR/<run-id>, holding rank-*.jsonl), or a log folder: its newest run")
    a("--steps", metavar="A:B", help="analyse steps A..B-1 (numbered from 0; A:, :B and A work too). Default: "
                                     "every complete step but the first (warm-up), if there are two or more")
    a("--json", action="store_true", help="print the figures as one JSON object instead of tables")
    a("--trace", nargs="?", const="", metavar="PATH",
      help="write a Chrome trace-event JSON for Perfetto (default PATH: <run>/trace.json); whole run unless "
           "--steps is given")
    a("--png", nargs="?", const="", metavar="PATH",
      help=f"write a timeline PNG of the last {TIMELINE_STEPS} analysed steps (default PATH: <run>/timeline.png)")
    a("--top", type=int, default=8, help="how many waits to list (default 8)")
    a("--ep-index", type=int, default=0, help="with expert parallelism (ep > 1): which EP index's pipeline "
                                              "replica to analyse (default 0; the trace shows every rank)")
    return p


def _ms(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def print_report(r: dict, top: int) -> None:
    """The figures as tables (what ``launch.analyze`` prints without ``--json``)."""
    steps = r["steps"]
    print(f"run {r['run']}: {r['schedule']}, pp {r['pp']} ({r['stages']} stages), {r['microbatches']} microbatches; "
          f"steps {steps[0]}..{steps[-1]} analysed ({len(steps)} of {r['steps_logged']} complete)")
    if r["ep"] > 1:
        world = ", ".join(str(x["world_rank"]) for x in r["ranks"].values())
        print(f"expert parallel: ep {r['ep']} ranks per stage; the pipeline replica of EP index {r['ep_index']} "
              f"(world ranks {world}; --ep-index picks another); its EP exchanges count as compute")
    loss = r["loss"]
    print(f"step {r['step_ms']:.1f} ms (medians: pipeline {r['makespan_ms']:.1f}, step-end work {r['tail_ms']:.1f})"
          + (f" | {r['tokens_per_s']:.0f} tokens/s" if r["tokens_per_s"] else "")
          + (f" | loss {loss['first']:.4f} -> {loss['last']:.4f}" if loss else ""))
    print("\nper rank, ms per step (median; communication: mean): idle = wait for input + drain + executor overhead")
    print(f"{'rank':>4} {'host':<10}{'step':>8}{'compute':>9}{'comm':>8}{'hidden':>8}{'idle':>8}{'wait':>8}"
          f"{'drain':>8}{'overhd':>8}{'peak MiB':>10}{'clock off ms':>13}")
    for k, x in r["ranks"].items():
        mem = x["peak_mem_bytes"]
        print(f"{k:>4} {str(x['host'])[:9]:<10}{x['step_ms']:>8.1f}{x['compute_ms']:>9.1f}{x['comm_ms']:>8.1f}"
              f"{_ms(x['hidden_pct']):>7}%{x['idle_ms']:>8.1f}{x['wait_ms']:>8.1f}{x['drain_ms']:>8.1f}"
              f"{x['overhead_ms']:>8.1f}{_ms(None if mem is None else mem / 2**20, '.0f'):>10}"
              f"{x['clock_offset_ms']:>13.3f}")
    o = r["overall"]
    print(f"{'all':>4} {'(sum)':<10}{r['step_ms']:>8.1f}{o['compute_ms']:>9.1f}{o['comm_ms']:>8.1f}"
          f"{_ms(o['hidden_pct']):>7}%{o['idle_ms']:>8.1f}{o['wait_ms']:>8.1f}{o['drain_ms']:>8.1f}"
          f"{o['overhead_ms']:>8.1f}")
    b, c = r["bubble"], r["bubble"]["costs_ms"]
    print(f"\nbubble (largest per-rank idle): measured {b['measured_ms']:.1f} ms = {100 * b['measured_fraction']:.1f}% "
          f"of the step ({b['without_overhead_ms']:.1f} ms without executor overhead); simulator "
          f"{b['sim_ms']:.1f} ms = {100 * b['sim_fraction']:.1f}% for the measured costs F {c['f']:.2f}, B {c['b']:.2f}, "
          f"W {c['w']:.2f}, FB {c['fb']:.2f}, hop {c['comm']:.2f} ms; difference {b['diff_pct_of_step']:+.1f}% of "
          f"the step ({b['without_overhead_diff_pct_of_step']:+.1f}% without overhead)")
    fb = r["fb_overlap"]
    if fb and fb["hidden_fraction"] is not None:
        print(f"FB-phase messages: {100 * fb['hidden_fraction']:.1f}% of their in-flight time hidden under compute "
              f"({fb['messages']} messages)")
    sr, ss = r["slowest_rank"], r["slowest_stage"]
    print(f"slowest rank: {sr['rank']} ({sr['compute_ms']:.1f} ms compute per step)"
          + (f"; slowest stage: {ss['stage']} ({ss['compute_ms']:.1f} ms compute per step)" if ss else ""))
    print(f"\nbubble attributed to schedule actions (top {top} waits, ms per step): producer = before the input "
          f"was sent, in flight = travelling, after = landed but not yet noticed; sim = simulator's gap")
    for w in r["waits"][:top]:
        print(f"  r{w['rank']} {w['action']:<26} waited {w['wait_ms']:6.2f} on r{w['on_rank']} {w['on_action']:<26}"
              f" producer {w['producer_ms']:6.2f}  in flight {w['in_flight_ms']:6.2f}  after {w['after_ms']:5.2f}"
              f"  sim {_ms(w['predicted_ms'], '.2f')}")
    if len(r["waits"]) > top:
        print(f"  (+{len(r['waits']) - top} more waits, {sum(w['wait_ms'] for w in r['waits'][top:]):.2f} ms per step)")
    who = ", ".join(f"r{x['rank']} on r{x['on_rank']} {x['wait_ms']:.1f} (producer {x['producer_ms']:.1f}, in flight "
                    f"{x['in_flight_ms']:.1f})" for x in r["waited_on"])
    print(f"waited on: {who or 'nobody'}")
    ends = ", ".join(f"r{e['rank']} {e['op']}(dir {e['dir']}, mb {e['mb']}, chunk {e['chunk']}) in {e['steps']} "
                     f"steps" for e in r["pipeline_end"][:3])
    print(f"the pipeline ends with (the other ranks drain until then): {ends}")
    print("\ntraffic by message kind and link class (analysed steps): messages, MB, send open time (post to "
          "completion, summed)")
    for t in r["traffic"]:
        print(f"  {t['kind']:<8}{t['link']:<12}{t['messages']:>7}{t['bytes'] / 1e6:>10.2f} MB{t['time_ms']:>10.1f} ms")
    if r["messages_unmatched"]:
        print(f"note: {r['messages_unmatched']} scheduled messages had no send or receive span")
    if r.get("ep_exchanges") is not None or r.get("ep_steps") is not None:
        print_ep(r["ep_exchanges"], r["ep_steps"])


def print_ep(ex: dict | None, eps: dict | None) -> None:
    """The expert-parallel part of the report: exchanges by phase and link class, bytes per step,
    expert-load balance."""
    if ex and ex["rows"]:
        print("\nexpert-parallel exchanges (every rank; per step, summed over ranks): in flight = post to completion, "
              "blocked = the rank waited for it, hidden = 1 - blocked / in flight")
        print(f"  {'phase':<18}{'link':<12}{'exch':>7}{'MB sent':>10}{'in flight ms':>14}{'blocked ms':>12}{'hidden':>8}")
        for x in ex["rows"] + ex["links"]:
            print(f"  {x['phase']:<18}{x['link']:<12}{x['exchanges']:>7.1f}{x['bytes'] / 1e6:>10.3f}"
                  f"{x['in_flight_ms']:>14.1f}{x['blocked_ms']:>12.1f}{_ms(x['hidden_pct']):>7}%")
        ctx = ex["contexts"]
        print("  " + "; ".join(f"{'inside overlapped F&B pairs' if k == 'fb' else 'elsewhere'}: "
                               f"{_ms(v['hidden_pct'])}% hidden ({v['in_flight_ms']:.1f} ms in flight, "
                               f"{v['blocked_ms']:.1f} ms blocked per step)" for k, v in ctx.items()))
    elif ex is not None:
        print("\nexpert-parallel exchanges: no exchange spans in the analysed steps (run without --no-trace)")
    if eps:
        per_link = ", ".join(f"{link}-node {v['tokens'] / 1e6:.3f} MB tokens + {v['meta'] / 1e6:.3f} MB meta"
                             for link, v in eps["bytes_per_step"].items())
        print(f"EP bytes sent per step (ep_step logs, summed over ranks, mean of {eps['steps']} steps): {per_link}")
        if eps["load"]:
            worst = max(eps["load"], key=lambda x: x["worst"])
            print("expert load max/mean (1.0 = even; group-summed, mean over steps) per pipeline rank / chunk / "
                  "MoE layer: " + ", ".join(f"r{x['pp_rank']} c{x['chunk']} L{x['moe_layer']} {x['max_over_mean']:.2f}"
                                            for x in eps["load"])
                  + f"; worst {worst['worst']:.2f} (step {worst['worst_step']}, r{worst['pp_rank']} c{worst['chunk']} "
                    f"L{worst['moe_layer']})")


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    ns = p.parse_args(argv)
    try:
        first, stop = parse_steps(ns.steps) if ns.steps else (None, None)
    except ValueError as exc:
        p.error(str(exc))
    if ns.top < 0:
        p.error(f"--top {ns.top}: must be >= 0")
    try:
        run = Path(ns.run)
        if run.is_dir() and not rank_files(run):
            run = newest_run(run)
            print(f"launch.analyze: newest run in {ns.run}: {run}", file=sys.stderr)
        log = read_run(run)
        if ns.steps is None:
            every = split_steps(log.spans)
            first = every[0].step + 1 if len(every) > 1 else None
        r = report(log, first=first, stop=stop, ep_index=ns.ep_index)
        rep = replica(log, ns.ep_index)
    except LogError as exc:
        print(f"launch.analyze: {exc}", file=sys.stderr)
        return 2
    for line in log.problems[:10]:
        print(f"launch.analyze: {line}", file=sys.stderr)
    if len(log.problems) > 10:
        print(f"launch.analyze: ... {len(log.problems) - 10} more problems (all in --json 'problems')", file=sys.stderr)
    schedule = rep.schedule
    halves = plan(schedule).pair_halves
    steps = select_steps(split_steps(rep.records), first, stop)
    written = []
    if ns.trace is not None:
        window = (min(s.start for s in steps), max(s.end for s in steps) + 1) if ns.steps else None
        # the trace shows every world rank; FB halves and peers are named by pipeline rank
        ep = rep.ep
        world_halves = frozenset((w, *h[1:]) for h in halves for w in range(h[0] * ep, (h[0] + 1) * ep))
        trace = chrome_trace(log.spans, hosts=log.hosts, fb_halves=world_halves, window=window,
                             peer_rank=lambda rank, peer: peer * ep + rank % ep,
                             metadata={"run": str(run), "schedule": schedule.name, "ep": ep})
        written.append(write_trace(ns.trace or run / "trace.json", trace))
    if ns.png is not None:
        shown = steps[-TIMELINE_STEPS:]
        title = (f"{run.name}: {schedule.name}, pp {schedule.pp}, {schedule.microbatches} microbatches, "
                 f"steps {shown[0].step}-{shown[-1].step}")
        written.append(draw_timeline(ns.png or run / "timeline.png", shown, fb_halves=halves, title=title))
    if ns.json:
        print(json.dumps(r, indent=1))
    else:
        print_report(r, ns.top)
    for path in written:
        print(f"wrote {path}", file=sys.stderr if ns.json else sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
