"""Seconds from an injected fault to the supervisor's verdict, with the default deadlines.

Each fault of tests/mpi/faults.py (SIGKILL, raise, SIGSTOP, mute) is injected on one rank of a
``make run``-like job (default model and DualPipe unless flags say otherwise) under the supervisor
with its default deadlines; the table gives the verdict, the rank and role it named and the delay
(the faulty rank writes the fault's wall time, the supervisor's report its verdict's).

Run: python -m bench.faults [--ranks 4] [--rank 2] [--step 3] [-- launch.train flags]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

from bench.output import write_result
from launch.local import run_local
from launch.supervisor import SupervisorConfig

FAULTS = ("kill", "raise", "stop", "mute")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=4, help="MPI ranks = --pp (default 4)")
    p.add_argument("--rank", type=int, default=2, help="the faulty rank (default 2)")
    p.add_argument("--step", type=int, default=3, help="the step the fault hits, 0-based (default 3)")
    p.add_argument("train", nargs=argparse.REMAINDER, help="extra launch.train flags after --")
    ns = p.parse_args(argv)
    config = SupervisorConfig()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for fault in FAULTS:
            stamp = Path(tmp) / f"{fault}.time"
            args = [fault, str(ns.rank), str(ns.step), "--pp", str(ns.ranks), "--steps", "40", "--no-trace",
                    "--log-dir", str(Path(tmp) / "logs"), *[a for a in ns.train if a != "--"]]
            t0 = time.monotonic()
            res = run_local(ns.ranks, "tests.mpi.faults", args, timeout=600, capture=True, supervise=config,
                            env={"OMP_NUM_THREADS": "1", "FAULT_TIME_FILE": str(stamp)})
            found = re.search(r"full report: (\S+)", res.stdout)
            if found is None or not stamp.exists():
                print(f"{fault}: no verdict (exit {res.returncode}); output tail:\n{res.stdout[-2000:]}", file=sys.stderr)
                return 1
            report = json.loads(Path(found.group(1)).read_text())
            rows.append({"fault": fault, "verdict": report["verdict"], "rank": report["rank"], "role": report["role"],
                         "exit": res.returncode, "seconds_to_verdict": round(report["t_wall"] - float(stamp.read_text()), 2),
                         "job_seconds": round(time.monotonic() - t0, 1)})
    print(f"defaults: liveness {config.liveness_s:g} s, progress {config.progress_s:g} s, heartbeat {config.heartbeat_s:g} s")
    print(f"{'fault':6} {'verdict':8} {'rank':>4} {'exit':>4} {'named after':>12}  role")
    for r in rows:
        print(f"{r['fault']:6} {r['verdict']:8} {r['rank']:>4} {r['exit']:>4} {r['seconds_to_verdict']:>10.2f} s  {r['role']}")
    write_result("bench/results/faults.json", {"deadlines": {"liveness_s": config.liveness_s,
                                                             "progress_s": config.progress_s,
                                                             "heartbeat_s": config.heartbeat_s}, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
