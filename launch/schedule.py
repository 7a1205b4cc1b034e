"""Print, export and simulate pipeline schedules: ``python -m launch.schedule dualpipe --pp 8 --microbatches 20``.

The only place that reads argv for :mod:`runtime.schedules`; everything else there is pure.
"""

from __future__ import annotations

import argparse
import sys

from runtime.schedules import (
    SCHEDULE_NAMES,
    Costs,
    ScheduleError,
    build,
    bubble_table,
    dumps,
    render_simulation,
    render_timeline,
    simulate,
)

__all__ = ["main"]

_DESCRIPTION = """\
Generate a pipeline schedule and show it as a per-rank timeline (default), as JSON (--json) or as
its full action lists with sends and receives (--actions); --simulate adds per-rank busy time,
bubble, peak activations and parameter copies next to the DualPipe README closed forms; --table
prints simulated vs closed-form figures of every schedule for several stage counts. The timeline
and --table run the simulator too, so the cost flags (--f --b --w --fb --comm) apply to all modes
except --json and --actions. "bubble" is the largest per-rank idle time (makespan - busy).

--pp is the number of RANKS. For dualpipe, 1f1b and zb1p that is also the number of stages (PP in
the README table); dualpipev runs 2*pp stages on pp ranks, so dualpipev --pp 4 is the PP=8 row.
"""

_EPILOG = """\
examples:
  python -m launch.schedule dualpipe --pp 8 --microbatches 20
  python -m launch.schedule dualpipev --pp 4 --microbatches 10 --json > v.json
  python -m launch.schedule dualpipe --pp 8 --microbatches 20 --simulate --f 1 --b 2 --w 1 --fb 2.6 --comm 0.2
  python -m launch.schedule --table --stages 4 8 16 --f 1 --b 2 --w 1 --fb 2.6
constraints: dualpipe needs even pp and even microbatches >= 2*pp; dualpipev needs microbatches >= 2*pp.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m launch.schedule",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", nargs="?", choices=SCHEDULE_NAMES,
                   help="schedule: dualpipe (DeepSeek-V3, two directions), dualpipev (V shape, 2*pp stages), "
                        "1f1b, zb1p (zero-bubble ZB-H1); not needed with --table")
    p.add_argument("--pp", type=int, help="number of pipeline RANKS (dualpipev: stages = 2*pp)")
    p.add_argument("--microbatches", type=int,
                   help="microbatches per step, all directions together (dualpipe sends half in from each end); "
                        "with --table: the count for every row (default 2*PP per row)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the schedule as JSON (format: docs/schedules.md)")
    out.add_argument("--actions", action="store_true",
                     help="print each rank's full action list, including Send/Recv, one action per line")
    out.add_argument("--table", action="store_true",
                     help="print simulated vs closed-form bubble, peak activations and parameter copies of all four "
                        "schedules for each PP in --stages (dualpipev on PP/2 ranks); needs no name/--pp")
    p.add_argument("--simulate", action="store_true",
                   help="after the timeline, print per-rank busy/idle time, bubble, peak live activations and "
                        "parameter copies, next to the closed-form figures (timeline mode only: "
                        "ignored with --json, --actions and --table)")
    p.add_argument("--f", type=float, default=1.0, help="time of one forward chunk F (default 1)")
    p.add_argument("--b", type=float, default=2.0,
                   help="time of one FULL backward chunk B, input + weight gradients (default 2); a backward "
                        "whose weight part is deferred costs b - w")
    p.add_argument("--w", type=float, default=1.0, help="time of the weight-gradient part W of a backward (default 1)")
    p.add_argument("--fb", type=float, default=2.6,
                   help="time of one overlapped forward+backward pair F&B (default 2.6; f + b = no overlap gain)")
    p.add_argument("--comm", type=float, default=0.0,
                   help="latency of one point-to-point message to a neighbouring rank (default 0)")
    p.add_argument("--scale", type=float, default=4.0,
                   help="timeline characters per time unit (default 4; timeline mode only)")
    p.add_argument("--stages", type=int, nargs="+", default=[4, 8, 16],
                   help="with --table: the stage counts PP to tabulate (default 4 8 16; even)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    ns = parser.parse_args(argv)
    try:
        costs = Costs(f=ns.f, b=ns.b, w=ns.w, fb=ns.fb, comm=ns.comm)
        if ns.table:
            print(bubble_table(ns.stages, costs, ns.microbatches))
            return 0
        if ns.name is None or ns.pp is None or ns.microbatches is None:
            parser.error("give a schedule name, --pp and --microbatches (or use --table)")
        schedule = build(ns.name, ns.pp, ns.microbatches)
        if ns.json:
            print(dumps(schedule))
            return 0
        if ns.actions:
            for rank, actions in enumerate(schedule.ranks):
                print(f"rank {rank}:")
                print("\n".join(f"  {i:>4}  {a}" for i, a in enumerate(actions)))
            return 0
        result = simulate(schedule, costs)
        print(render_timeline(schedule, result, ns.scale))
        if ns.simulate:
            print()
            print(render_simulation(schedule, result, costs))
    except ScheduleError as exc:
        print(f"launch.schedule: invalid schedule: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        parser.error(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
