"""Pipeline benchmark: step time, bubble and communication overlap of DualPipe, DualPipeV, 1F1B and
ZB1P, measured side by side on the same model, ranks and microbatches.

    python -m bench.pipeline                       # make bench-pipeline: pp=2, 8 microbatches, small model
    python -m bench.pipeline --repeats 3 --steps 6 --microbatches 16
    python -m bench.pipeline --analyze logs/bench-pipeline/20260101-120000   # re-analyse kept logs

Runs ``launch.train`` (``python -m launch.local -n PP launch.train ...``, torch threads 1, one rank
per core) once per schedule and repeat, interleaved (A B C D A B C D ...) because the machine is
noisy, one multi-rank job at a time. The first ``--warmup`` steps of every run are discarded. Then,
from the per-rank JSON logs of each run (:mod:`runtime.analysis` has the exact definitions):

* step time: median over the measured steps (all repeats) of the wall time of one optimizer step
  (earliest step start to latest step end over the ranks); the ratio to the baseline (1F1B) both
  pooled and per round (same round = neighbouring runs);
* measured mean F, B, W and F&B (an FB pair's two halves) compute times, and a per-hop message
  latency (transfers that the consumer waited for from the moment they left);
* measured bubble: per rank, pipeline makespan − compute time; the max over ranks in ms and as a
  fraction of the step time, split into waiting for inputs, drain (done while others compute) and
  executor overhead between computes (not simulated) — next to
  ``runtime.schedules.simulate`` with ``Costs`` built from the measured times, and the difference
  as % of the step time (target: within 10%);
* FB overlap: of the in-flight time of messages produced or consumed by FB pairs, the fraction
  during which the receiver was not waiting for them (target >= 80%), and a stricter "nominal"
  figure: 1 - exposed time / (messages x per-hop latency);
* computes that waited clearly longer than the simulator predicts (executor findings).

Prints tables and writes ``--out`` (default bench/results/pipeline.json) with the inputs, every
figure and machine facts (cores, torch threads, host, the CPU load of other processes during each
run). The step-end work (mirrored-gradient sum, norm, AdamW, loss gather) is in the step time but
not in the pipeline makespan the simulator models; it is reported as "tail".

Targets (issue 6): DualPipe's step time below 1F1B's; measured bubble within 10% of step time of the
simulator's; communication hidden under compute >= 80% in the FB phase.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path

from bench.output import write_result
from runtime.analysis import read_run, split_steps, summarize
from launch.local import LaunchTimeout, run_local
from runtime.schedules import SCHEDULE_NAMES, build

DEFAULT_SCHEDULES = ["dualpipe", "dualpipev", "1f1b", "zb1p"]
TARGETS = {"dualpipe_step_ratio_to_1f1b_below": 1.0, "bubble_diff_pct_of_step_within": 10.0,
           "fb_hidden_fraction_at_least": 0.80}


# ------------------------------------------------------------------------------ machine facts
def _cpu_times() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat (0s elsewhere)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return 0.0, 0.0
    hz = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is in user)
    return (total - idle) / hz, total / hz


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def foreign_load(seconds: float = 1.0) -> float:
    """CPU cores busy over the next ``seconds``, all processes but this one (no children run)."""
    b0, _ = _cpu_times()
    s0 = time.process_time()
    time.sleep(seconds)
    b1, _ = _cpu_times()
    return max(0.0, (b1 - b0) - (time.process_time() - s0)) / seconds


def machine_facts(threads: int) -> dict:
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for pkg in ("torch", "mpi4py", "mpich"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"host": platform.node(), "cores": os.cpu_count(),
            "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "cpu": cpu_model, "torch_threads_per_rank": threads, "python": platform.python_version(),
            "platform": platform.platform(), **versions}


# -------------------------------------------------------------------------------------- running
def _train_args(ns: argparse.Namespace, name: str, log_root: Path, run_id: str) -> list[str]:
    args = ["--schedule", name, "--pp", str(ns.pp), "--microbatches", str(ns.microbatches),
            "--micro-batch", str(ns.micro_batch), "--steps", str(ns.steps), "--model", ns.model,
            "--precision", ns.precision, "--seed", str(ns.seed), "--threads", "1",
            "--log-dir", str(log_root), "--run-id", run_id]
    if ns.seq_len is not None:
        args += ["--seq-len", str(ns.seq_len)]
    return args


def _wait_quiet(limit_s: float, threshold: float) -> float:
    """Wait up to ``limit_s`` for other processes to use < ``threshold`` cores; returns the last load."""
    load = foreign_load(0.5)
    t_end = time.monotonic() + limit_s
    while load >= threshold and time.monotonic() < t_end:
        load = foreign_load(1.0)
    return load


def run_all(ns: argparse.Namespace, log_root: Path) -> list[dict]:
    """Run every schedule ``repeats`` times, interleaved; returns one record per run."""
    records = []
    total = ns.repeats * len(ns.schedules)
    for k in range(ns.repeats):
        for name in ns.schedules:
            run_id = f"r{k}-{name}"
            before = _wait_quiet(ns.quiet_wait, ns.quiet_threshold) if ns.quiet_wait > 0 else foreign_load(0.3)
            b0, _ = _cpu_times()
            c0 = _children_cpu()
            t0 = time.monotonic()
            try:
                res = run_local(ns.pp, "launch.train", _train_args(ns, name, log_root, run_id), timeout=ns.timeout,
                                capture=True, env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
            except LaunchTimeout as exc:
                print(exc.output[-3000:], file=sys.stderr)
                raise SystemExit(f"bench.pipeline: {name} (round {k}) ran past --timeout {ns.timeout} s") from None
            wall = time.monotonic() - t0
            b1, _ = _cpu_times()
            ours = _children_cpu() - c0
            if res.returncode != 0:
                print(res.stdout[-4000:], file=sys.stderr)
                raise SystemExit(f"bench.pipeline: {name} (round {k}) failed with exit code {res.returncode}; "
                                 f"logs in {log_root / run_id}")
            rec = {"round": k, "schedule": name, "run_id": run_id, "wall_s": wall,
                   "rank_cpu_s": ours, "foreign_load_before_cores": before,
                   "foreign_load_cores": max(0.0, (b1 - b0) - ours) / wall}
            records.append(rec)
            print(f"  [{len(records):>2}/{total}] round {k + 1} {name:<9} {wall:6.1f} s wall, "
                  f"other processes {rec['foreign_load_cores']:.2f} cores", flush=True)
    return records


# ------------------------------------------------------------------------------------- analysis
def analyse(log_root: Path, schedules: list[str], repeats: int, warmup: int, baseline: str) -> dict:
    """Per-schedule summaries and ratios to ``baseline`` from the kept logs of every run."""
    out: dict[str, dict] = {}
    per_round: dict[str, dict[int, float]] = {}
    for name in schedules:
        runs = []
        per_round[name] = {}
        for k in range(repeats):
            run_dir = log_root / f"r{k}-{name}"
            if not run_dir.exists():
                continue
            log = read_run(run_dir)
            c = log.config
            schedule = build(c["schedule"], c["pp"], c["microbatches"])
            steps = [st for st in split_steps(log.spans) if st.step >= warmup]
            if steps:
                runs.append((schedule, steps))
                per_round[name][k] = statistics.median((st.end - st.start) / 1e6 for st in steps)
        if not runs:
            raise SystemExit(f"bench.pipeline: no measured steps for {name} under {log_root} "
                             f"(--steps must exceed --warmup)")
        out[name] = summarize(runs)
    if baseline in out:
        base = out[baseline]["median_step_ms"]
        for name, s in out.items():
            ratios = [per_round[name][k] / per_round[baseline][k] for k in per_round[name] if k in per_round[baseline]]
            s["ratio_to_baseline"] = s["median_step_ms"] / base
            s["round_ratios_to_baseline"] = ratios
            s["round_step_ms"] = per_round[name]
    return out


def _fmt(v, spec=".1f", none="-") -> str:
    return none if v is None else format(v, spec)


def print_tables(res: dict, baseline: str) -> None:
    sch = res["schedules"]
    print("\nstep time (median over measured steps; ratio pooled and per round, same round = neighbouring runs)")
    print(f"{'schedule':<10}{'stages':>7}{'steps':>6}{'step ms':>9}{'vs ' + baseline:>9}{'per-round ratio':>20}"
          f"{'makespan':>10}{'tail':>7}")
    for name, s in sch.items():
        rr = s.get("round_ratios_to_baseline") or []
        rtxt = f"{statistics.median(rr):.3f} [{min(rr):.3f}-{max(rr):.3f}]" if rr else "-"
        print(f"{name:<10}{s['stages']:>7}{s['steps_measured']:>6}{s['median_step_ms']:>9.1f}"
              f"{_fmt(s.get('ratio_to_baseline'), '.3f'):>9}{rtxt:>20}{s['median_makespan_ms']:>10.1f}"
              f"{s['median_tail_ms']:>7.1f}")
    print("\ncompute (mean ms per chunk) and per-hop latency (ms, samples); simulate() gets these as Costs, "
          "each stage scaled by its F+B over the mean (scale)")
    print(f"{'schedule':<10}{'F':>7}{'B':>7}{'Bsplit':>7}{'W':>7}{'F&B':>7}{'hop (n)':>12}   F / B per stage")
    for name, s in sch.items():
        m = s["means"]
        g = lambda k: _fmt(m[k]["mean_ms"] if k in m else None)  # noqa: E731
        per = s["stage_means_ms"]
        scale = s.get("stage_scale") or [1.0] * s["stages"]
        stages = " ".join(f"{per.get('F', {}).get(st, 0):.1f}/{per.get('B', {}).get(st, 0):.1f} (x{scale[st]:.2f})"
                          for st in range(s["stages"]))
        print(f"{name:<10}{g('F'):>7}{g('B'):>7}{g('Bsplit'):>7}{g('W'):>7}{g('FB'):>7}"
              f"{s['comm_per_hop_ms']:>7.2f} ({s['comm_samples']:>2})   {stages}")
    print("\nbubble = max over ranks of (makespan - compute), medians over steps; on that rank idle = wait + drain + "
          "overhead (executor work, not simulated)")
    print(f"{'schedule':<10}{'bubble':>8}{'%step':>7}{'wait':>7}{'drain':>7}{'overhd':>7} |{'sim':>7}{'%step':>7} |"
          f"{'diff %step':>11} | {'w/o overhead':>12}{'diff %step':>11}")
    for name, s in sch.items():
        worst = max(s["idle_ms"], key=lambda r: s["idle_ms"][r])
        print(f"{name:<10}{s['bubble_ms']:>8.1f}{100 * s['bubble_fraction']:>7.1f}{s['wait_ms'][worst]:>7.1f}"
              f"{s['drain_ms'][worst]:>7.1f}{s['overhead_ms'][worst]:>7.1f} |{s['sim']['bubble_ms']:>7.1f}"
              f"{100 * s['sim']['bubble_fraction']:>7.1f} |{s['bubble_diff_pct_of_step']:>+11.1f} | "
              f"{s['bubble_without_overhead_ms']:>12.1f}{s['bubble_without_overhead_diff_pct_of_step']:>+11.1f}")
    print("\nper rank (median ms): idle = wait + drain + overhead (of which before stage-0 F); busy measured/simulated")
    for name, s in sch.items():
        parts = [f"r{r}: {s['idle_ms'][r]:.1f} = {s['wait_ms'][r]:.1f} + {s['drain_ms'][r]:.1f} + "
                 f"{s['overhead_ms'][r]:.1f} ({s['overhead_f0_ms'][r]:.1f}), busy {s['busy_ms'][r]:.1f}/"
                 f"{s['sim']['busy_ms'][r]:.1f}" for r in s["idle_ms"]]
        print(f"  {name:<10}" + "; ".join(parts))
    print("\ncommunication overlap (all measured steps): hidden = in-flight time the receiver did not spend waiting "
          "for the message; nominal = 1 - exposed / (msgs x hop)")
    print(f"{'schedule':<10}{'phase':>7}{'msgs':>6}{'in flight ms':>14}{'exposed ms':>12}{'hidden':>8}"
          f"{'msgs x hop ms':>15}{'nominal':>9}")
    pct = lambda v: _fmt(None if v is None else 100 * v, ".1f") + "%"  # noqa: E731
    for name, s in sch.items():
        for phase, o in (("FB", s["fb_overlap"]), ("all", s["all_overlap"])):
            if o is None:
                continue
            print(f"{name:<10}{phase:>7}{o['messages']:>6}{o['comm_ms']:>14.1f}{o['exposed_ms']:>12.1f}"
                  f"{pct(o['hidden_fraction']):>8}{o['nominal_comm_ms']:>15.1f}{pct(o['hidden_fraction_nominal']):>9}")
    print("\nwaits longer than the simulator predicts (mean per step, measured vs simulated gap, ms; threshold "
          "max(1 ms, 5% of F)); the rest of such a wait is spent before the producer sent the input:")
    for name, s in sch.items():
        rows = s["unexpected_waits"]
        if not rows:
            print(f"  {name:<10}none")
            continue
        txt = ", ".join(f"r{w['rank']} {w['op']}(dir {w['dir']}, mb {w['mb']}, chunk {w['chunk']}) "
                        f"{w['measured_wait_ms']:.1f} vs {w['predicted_gap_ms']:.1f}" for w in rows[:4])
        more = f" (+{len(rows) - 4} more)" if len(rows) > 4 else ""
        total = sum(w["excess_ms"] for w in rows)
        flight = sum(w["in_flight_ms"] for w in rows)
        print(f"  {name:<10}{len(rows)} computes, {total:.1f} ms excess per step, of their waits {flight:.1f} ms "
              f"with the input in flight: {txt}{more}")


def verdict(res: dict, baseline: str) -> dict:
    sch = res["schedules"]
    v = {}
    if "dualpipe" in sch and baseline in sch:
        v["dualpipe_faster_than_" + baseline] = sch["dualpipe"]["ratio_to_baseline"] < 1.0
    v["bubble_within_10pct"] = {n: abs(s["bubble_diff_pct_of_step"]) <= TARGETS["bubble_diff_pct_of_step_within"]
                                for n, s in sch.items()}
    v["fb_hidden_at_least_80pct"] = {
        n: (s["fb_overlap"]["hidden_fraction"] or 0) >= TARGETS["fb_hidden_fraction_at_least"]
        for n, s in sch.items() if s["fb_overlap"]}
    v["fb_hidden_nominal_at_least_80pct"] = {
        n: (s["fb_overlap"]["hidden_fraction_nominal"] or 0) >= TARGETS["fb_hidden_fraction_at_least"]
        for n, s in sch.items() if s["fb_overlap"]}
    return v


# ----------------------------------------------------------------------------------------- main
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--pp", type=int, default=2, help="pipeline ranks = MPI ranks, one core each (default 2; must be <= cores "
                                        "unless --oversubscribe)")
    a("--microbatches", type=int, default=8, help="microbatches per step, the same for every schedule (default 8; "
                                                  "dualpipe needs an even number >= 2*pp, dualpipev >= 2*pp)")
    a("--micro-batch", type=int, default=2, help="sequences per microbatch (default 2)")
    a("--seq-len", type=int, default=None, help="tokens per sequence (default: the model preset's)")
    a("--model", choices=["small", "tiny"], default="small", help="model preset (default small, as make run)")
    a("--precision", choices=["fp32", "bf16", "fp8"], default="fp32", help="GEMM precision (default fp32)")
    a("--steps", type=int, default=8, help="optimizer steps per run, warm-up included (default 8)")
    a("--warmup", type=int, default=2, help="first steps of every run that are not measured (default 2)")
    a("--repeats", type=int, default=5, help="rounds; each round runs every schedule once (default 5)")
    a("--schedules", nargs="+", choices=SCHEDULE_NAMES, default=DEFAULT_SCHEDULES,
      help="schedules in the order they run within a round (default: dualpipe dualpipev 1f1b zb1p)")
    a("--baseline", choices=SCHEDULE_NAMES, default="1f1b", help="schedule the step-time ratios refer to")
    a("--seed", type=int, default=0, help="parameter and data seed (default 0)")
    a("--timeout", type=float, default=300,
      help="seconds after which one run is killed and the bench fails (default 300)")
    a("--quiet-wait", type=float, default=5, help="before each run, wait up to this many seconds for other "
                                                  "processes to go quiet (0: do not wait; default 5)")
    a("--quiet-threshold", type=float, default=0.25, help="'quiet' = other processes use fewer cores than this")
    a("--oversubscribe", action="store_true", help="allow pp > cores (the timings then mean little)")
    a("--log-dir", default="logs/bench-pipeline", help="the runs' logs go to LOG_DIR/<timestamp>/r<round>-<schedule>/")
    a("--analyze", metavar="DIR", help="do not run: analyse the logs kept in DIR (a LOG_DIR/<timestamp> of an "
                                       "earlier bench) with the inputs recorded there")
    a("--out", default="bench/results/pipeline.json", help="JSON output (default bench/results/pipeline.json)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    ns = p.parse_args(argv)
    command = " ".join(["python -m bench.pipeline", *(sys.argv[1:] if argv is None else argv)])
    rerun_by = None
    if ns.analyze:
        log_root = Path(ns.analyze)
        saved = json.loads((log_root / "bench-inputs.json").read_text())
        for k, v in saved["args"].items():
            if k not in ("out", "log_dir"):
                setattr(ns, k, v)
        records, machine = saved.get("runs", []), saved["machine"]
        command, rerun_by = saved.get("command", "(not recorded)"), command
    else:
        if ns.steps <= ns.warmup:
            p.error(f"--steps {ns.steps} must exceed --warmup {ns.warmup}")
        if ns.repeats < 1:
            p.error("--repeats must be >= 1")
        for name in ns.schedules:
            try:
                build(name, ns.pp, ns.microbatches)
            except ValueError as exc:
                p.error(str(exc))
        cores = os.cpu_count() or 1
        if ns.pp > cores and not ns.oversubscribe:
            p.error(f"--pp {ns.pp} needs {ns.pp} cores for one core per rank, this machine has {cores}; "
                    f"use --pp {cores} or --oversubscribe")
        log_root = Path(ns.log_dir) / time.strftime("%Y%m%d-%H%M%S")
        log_root.mkdir(parents=True, exist_ok=True)
        machine = machine_facts(1)
        args = {k: v for k, v in vars(ns).items() if k not in ("analyze",)}
        print(f"bench.pipeline: {', '.join(ns.schedules)} on pp={ns.pp} ranks, {ns.microbatches} microbatches x "
              f"{ns.micro_batch} sequences, model {ns.model} {ns.precision}; {ns.repeats} rounds x {ns.steps} steps "
              f"({ns.warmup} warm-up); host {machine['host']}, {machine['cores']} cores, torch threads 1; "
              f"logs in {log_root}", flush=True)
        t0 = time.monotonic()
        records = run_all(ns, log_root)
        print(f"  all runs: {time.monotonic() - t0:.0f} s", flush=True)
        saved = {"command": command, "args": args, "machine": machine, "runs": records}
        (log_root / "bench-inputs.json").write_text(json.dumps(saved, indent=1))
    schedules = analyse(log_root, ns.schedules, ns.repeats, ns.warmup, ns.baseline)
    res = {
        "command": command,
        "analysed_again_by": rerun_by,
        "inputs": {k: getattr(ns, k) for k in ("pp", "microbatches", "micro_batch", "seq_len", "model", "precision",
                                               "steps", "warmup", "repeats", "schedules", "baseline", "seed")},
        "machine": machine,
        "log_dir": str(log_root),
        "runs": records,
        "targets": TARGETS,
        "schedules": schedules,
    }
    res["verdict"] = verdict(res, ns.baseline)
    print_tables(res, ns.baseline)
    busy_runs = [r for r in records if r["foreign_load_cores"] > ns.quiet_threshold]
    if busy_runs:
        print(f"\nnote: other processes used > {ns.quiet_threshold} cores during {len(busy_runs)} of {len(records)} "
              f"runs (max {max(r['foreign_load_cores'] for r in busy_runs):.2f}): those timings are disturbed")
    print(f"\nverdict: {json.dumps(res['verdict'])}")
    write_result(ns.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
