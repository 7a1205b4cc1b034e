"""Telemetry benchmark: does the live progress line cost the ranks anything, and does killing its
collector mid-run disturb them?

    python -m bench.telemetry                  # make bench-telemetry: 7 rounds x 3 variants
    python -m bench.telemetry --rounds 9 --steps 14 --model small

Runs ``launch.train`` (``--pp 2`` DualPipe, one core per rank) in three variants, interleaved
round by round because the machine is noisy (A B C A B C ...):

* ``none``: no collector (no ``$HETEROPIPE_TELEMETRY``: the ranks send nothing);
* ``alive``: a collector (``python -m launch.collector``) that reads every frame;
* ``killed``: a collector that is SIGKILLed once it has printed ``--kill-after`` step lines; the
  ranks keep sending into a dead endpoint (their frames are dropped).

Step time of a run: the median over its steps after ``--warmup`` of the step wall time, from the
run's logs (``runtime.analysis``). Reported: per variant the median over rounds, and the ratios
alive / none and killed / none per round (same round = neighbouring runs) with their median.
Also the frames each rank sent and dropped (its ``telemetry`` log record), and the cost of one
``Telemetry.send`` measured in this process (to a reading collector and to a dead endpoint), which
bounds what telemetry can add to a step far below the noise of whole runs. Target (issue 15): both
ratios within 5% of 1. Prints a table and writes ``--out`` (default bench/results/telemetry.json).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import zmq

from bench.output import write_result
from launch import collector
from launch.local import LaunchTimeout, run_local
from runtime.analysis import read_run, split_steps
from runtime.analysis.load import rank_files
from runtime.telemetry import Telemetry

VARIANTS = ("none", "alive", "killed")
TARGET_WITHIN = 0.05


def _kill_after(proc: subprocess.Popen, lines: int, killed: list) -> None:
    """Read the collector's output; SIGKILL it after ``lines`` step lines."""
    seen = 0
    for raw in proc.stdout:
        if raw.startswith(b"step "):
            seen += 1
            if seen >= lines:
                os.kill(proc.pid, signal.SIGKILL)
                killed.append(time.monotonic())
                return


def run_once(ns: argparse.Namespace, variant: str, log_root: Path, run_id: str) -> dict:
    args = ["--schedule", "dualpipe", "--pp", "2", "--microbatches", str(ns.microbatches), "--model", ns.model,
            "--steps", str(ns.steps), "--threads", "1", "--log-dir", str(log_root), "--run-id", run_id]
    proc, env, killed = None, {}, []
    if variant != "none":
        proc, env = collector.start(stdout=subprocess.PIPE if variant == "killed" else subprocess.DEVNULL)
        if variant == "killed":
            threading.Thread(target=_kill_after, args=(proc, ns.kill_after, killed), daemon=True).start()
    try:
        res = run_local(2, "launch.train", args, timeout=ns.timeout, capture=True,
                        env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **env})
    except LaunchTimeout as exc:
        raise SystemExit(f"bench.telemetry: {variant} run {run_id} ran past {ns.timeout} s:\n{exc.output[-2000:]}")
    finally:
        if proc is not None:
            collector.stop(proc)
    if res.returncode != 0:
        raise SystemExit(f"bench.telemetry: {variant} run {run_id} failed:\n{res.stdout[-3000:]}")
    log = read_run(log_root / run_id)
    steps = [s for s in split_steps(log.spans) if s.step >= ns.warmup]
    tele = {}
    for r, path in rank_files(log_root / run_id).items():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("event") == "telemetry":
                tele[r] = {"sent": rec["sent"], "dropped": rec["dropped"]}
    if variant == "killed" and not killed:
        raise SystemExit(f"bench.telemetry: the collector of {run_id} printed fewer than {ns.kill_after} steps; "
                         f"raise --steps")
    return {"variant": variant, "run_id": run_id,
            "step_ms": statistics.median((s.end - s.start) / 1e6 for s in steps), "telemetry": tele}


def send_cost_us(endpoint: str, *, frames: int = 20000, reader: bool) -> float:
    """Mean µs per ``Telemetry.send`` of a rank-0-sized frame, into a collector-like PULL socket that
    reads (``reader``) or into an endpoint nobody binds (a dead collector)."""
    ctx = zmq.Context()
    pull = None
    if reader:
        pull = ctx.socket(zmq.PULL)
        pull.bind(endpoint)
        stop = threading.Event()

        def drain() -> None:
            while not stop.is_set():
                if pull.poll(50):
                    while True:
                        try:
                            pull.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
        t = threading.Thread(target=drain, daemon=True)
        t.start()
    tele = Telemetry(endpoint)
    time.sleep(0.2)  # let the connection come up
    fields = {"rank": 0, "size": 4, "step": 1, "steps": 60, "seconds": 0.5, "compute_s": 0.3, "loss": 2.5,
              "grad_norm": 0.7, "tokens": 1024}
    t0 = time.perf_counter()
    for k in range(frames):
        tele.send(**{**fields, "step": k})
    us = (time.perf_counter() - t0) / frames * 1e6
    tele.close()
    if pull is not None:
        stop.set()
        t.join()
        pull.close(linger=0)
    ctx.term()
    return us


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.telemetry", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7, help="rounds of the three variants (default 7)")
    p.add_argument("--steps", type=int, default=12, help="steps per run (default 12)")
    p.add_argument("--warmup", type=int, default=2, help="first steps not measured (default 2)")
    p.add_argument("--kill-after", type=int, default=4, help="killed variant: SIGKILL the collector after this "
                                                             "many step lines (default 4)")
    p.add_argument("--model", choices=["tiny", "small"], default="small", help="model preset (default small)")
    p.add_argument("--microbatches", type=int, default=4, help="microbatches per step (default 4)")
    p.add_argument("--timeout", type=float, default=300, help="seconds before a run is killed (default 300)")
    p.add_argument("--log-dir", default="logs/bench-telemetry", help="runs go to LOG_DIR/<timestamp>/")
    p.add_argument("--out", default="bench/results/telemetry.json", help="JSON output")
    ns = p.parse_args(argv)
    if ns.steps <= max(ns.warmup, ns.kill_after):
        p.error(f"--steps {ns.steps} must exceed --warmup {ns.warmup} and --kill-after {ns.kill_after}")
    if ns.rounds < 1:
        p.error("--rounds must be >= 1")
    log_root = Path(ns.log_dir) / time.strftime("%Y%m%d-%H%M%S")
    print(f"bench.telemetry: {ns.rounds} rounds x {VARIANTS}, dualpipe pp=2 {ns.model}, {ns.steps} steps "
          f"({ns.warmup} warm-up); logs in {log_root}", flush=True)
    runs = []
    for k in range(ns.rounds):
        for v in VARIANTS:
            runs.append({"round": k, **run_once(ns, v, log_root, f"r{k}-{v}")})
            print(f"  round {k + 1} {v:<7} step {runs[-1]['step_ms']:8.1f} ms", flush=True)
    by = {v: {r["round"]: r["step_ms"] for r in runs if r["variant"] == v} for v in VARIANTS}
    ratios = {v: [by[v][k] / by["none"][k] for k in range(ns.rounds)] for v in ("alive", "killed")}
    res = {"command": " ".join(["python -m bench.telemetry", *(sys.argv[1:] if argv is None else argv)]),
           "inputs": {k: v for k, v in vars(ns).items() if k not in ("out", "log_dir")}, "log_dir": str(log_root),
           "runs": runs, "median_step_ms": {v: statistics.median(by[v].values()) for v in VARIANTS},
           "ratios": ratios, "median_ratio": {v: statistics.median(x) for v, x in ratios.items()},
           "target_within": TARGET_WITHIN}
    res["verdict"] = {v: abs(m - 1) <= TARGET_WITHIN for v, m in res["median_ratio"].items()}
    print(f"\n{'variant':<9}{'median step ms':>15}{'ratio to none (median, per round)':>40}")
    for v in VARIANTS:
        rr = ratios.get(v)
        txt = f"{statistics.median(rr):.3f} [{', '.join(f'{x:.3f}' for x in rr)}]" if rr else "-"
        print(f"{v:<9}{res['median_step_ms'][v]:>15.1f}   {txt}")
    killed = [r["telemetry"] for r in runs if r["variant"] == "killed"]
    print("killed collector, frames sent/dropped per rank: "
          + "; ".join(", ".join(f"r{r}: {t['sent']}/{t['dropped']}" for r, t in sorted(k.items())) for k in killed))
    tmp = tempfile.gettempdir()
    res["send_us"] = {"live collector": send_cost_us(f"ipc://{tmp}/bench-tele-{os.getpid()}-a.sock", reader=True),
                      "no collector": send_cost_us(f"ipc://{tmp}/bench-tele-{os.getpid()}-b.sock", reader=False)}
    print("cost of one Telemetry.send (one per rank per step), µs: "
          + ", ".join(f"{k} {v:.1f}" for k, v in res["send_us"].items()))
    print(f"verdict (|median ratio - 1| <= {TARGET_WITHIN:.0%}): {json.dumps(res['verdict'])}")
    write_result(ns.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
