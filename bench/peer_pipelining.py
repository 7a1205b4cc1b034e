"""The project's pipeline against the peer a user would pick: torch.distributed.pipelining.

    python -m bench.peer_pipelining [--rounds 7] [--steps 6] [--warmup 2] [--out bench/results/peer_pipelining.json]

Same model pieces (``actors.model.build_stage``, ``ModelConfig.small``), same data, pp=2, 8
microbatches of 2 x 64 tokens, one torch thread per rank, CPU:

* **peer**: torch.distributed.pipelining over gloo, ``ScheduleDualPipeV`` (2 stages per rank, V
  layout) and ``Schedule1F1B`` (1 stage per rank) over those stages, each wrapped to return only
  its output (the peer's stages carry one output, so the sequence-balance loss is off for it);
  no optimizer. Step time: slowest rank's ``schedule.step`` after a barrier.
* **project**: ``launch.train`` with DualPipe, DualPipeV and 1F1B on the same model (its
  sequence-balance loss off too, unless ``--project-seq-aux``); step time from its logs
  (earliest step start to latest step end over the ranks) minus the optimizer's part of the
  step's tail (the slowest rank's AdamW, which the peer does not run); the DualPipe mirror
  exchange, the norm and the loss gather stay in.

Every round runs all five, one job after the other (the machine is noisy; only neighbouring
runs compare), ``--warmup`` steps of each dropped. Reported: medians over measured steps and,
per round, the ratios project / peer: DualPipe and DualPipeV against the peer's DualPipeV
(target <= 0.9), and each schedule against the peer's schedule of the same kind (target <= 1.0).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.output import write_result
from launch.local import LaunchTimeout, run_local

PEER = ("dualpipev", "1f1b")
PROJECT = ("dualpipe", "dualpipev", "1f1b")
RATIOS = {  # name: (project schedule, peer schedule, target)
    "dualpipe / peer dualpipev": ("dualpipe", "dualpipev", 0.9),
    "dualpipev / peer dualpipev": ("dualpipev", "dualpipev", 0.9),
    "1f1b / peer 1f1b": ("1f1b", "1f1b", 1.0),
}


# ------------------------------------------------------------------------------ peer worker (mpiexec)
def _peer_worker(ns: argparse.Namespace) -> int:
    """One rank of the peer job: every schedule in ``--peer``, ``--steps`` steps each; rank 0 prints JSON."""
    import torch
    import torch.distributed as dist
    from mpi4py import MPI
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleDualPipeV

    from actors.data import SyntheticTokens
    from actors.model import ModelConfig, build_stage, loss_fn
    from runtime.schedules import layout

    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    rank, pp = comm.rank, comm.size
    if rank == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    port = comm.bcast(port if rank == 0 else None)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=pp)
    cfg = ModelConfig.small(seq_aux_alpha=0.0, seq_len=ns.seq_len)
    data = SyntheticTokens(cfg.vocab_size, cfg.seq_len, ns.seed)

    class OutputOnly(torch.nn.Module):
        """A project stage without its balance-loss output (the peer's stages return one tensor)."""

        def __init__(self, stage):
            super().__init__()
            self.stage = stage

        def forward(self, x):
            return self.stage(x)[0]

    def batch(step: int):
        parts = [data.batch(step, mb, ns.micro_batch) for mb in range(ns.microbatches)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def loss(out, target):
        return loss_fn(out, target)

    results = {}
    for name in ns.peer:
        lay = layout(name, pp)  # the project's stage placement, which the peer's V layout shares
        num_stages, ids = lay.num_stages, list(lay.stages[rank])
        mods = [OutputOnly(build_stage(cfg, s, num_stages, seed=ns.seed)) for s in ids]
        stages = [PipelineStage(m, s, num_stages, torch.device("cpu")) for m, s in zip(mods, ids)]
        if name == "dualpipev":
            sched = ScheduleDualPipeV(stages, n_microbatches=ns.microbatches, loss_fn=loss)
        else:
            sched = Schedule1F1B(stages[0], n_microbatches=ns.microbatches, loss_fn=loss)
        has_first = 0 in ids
        has_last = num_stages - 1 in ids
        times = []
        for step in range(ns.steps):
            tokens, targets = batch(step)
            for m in mods:
                for p in m.parameters():
                    p.grad = None
            dist.barrier()
            t0 = time.perf_counter()
            args = (tokens,) if has_first else ()
            kwargs = {"target": targets, "losses": []} if has_last else {}
            sched.step(*args, **kwargs)
            t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            times.append(float(t) * 1e3)
        results[name] = times
    dist.destroy_process_group()
    if rank == 0:
        print("PEER_RESULT " + json.dumps(results), flush=True)
    return 0


# ------------------------------------------------------------------------------ project runs
def _project_step_ms(run_dir: Path, warmup: int) -> list[float]:
    """Per measured step: wall time over the ranks minus the slowest rank's optimizer time (ms)."""
    steps: dict[int, dict] = {}
    for path in sorted(run_dir.glob("rank-*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("event") != "span" or rec.get("span") not in ("step", "tail"):
                continue
            s = steps.setdefault(rec["step"], {"t0": [], "t1": [], "optim_us": []})
            if rec["span"] == "step":
                s["t0"].append(rec["t0"])
                s["t1"].append(rec["t1"])
            else:
                s["optim_us"].append(rec["optim_us"])
    out = []
    for step in sorted(steps):
        s = steps[step]
        if step >= warmup and s["t0"] and s["optim_us"]:
            out.append((max(s["t1"]) - min(s["t0"])) / 1e6 - max(s["optim_us"]) / 1e3)
    return out


def _run_project(ns: argparse.Namespace, name: str, log_root: Path, run_id: str) -> list[float]:
    args = ["--schedule", name, "--pp", str(ns.pp), "--microbatches", str(ns.microbatches),
            "--micro-batch", str(ns.micro_batch), "--seq-len", str(ns.seq_len), "--steps", str(ns.steps),
            "--model", "small", "--precision", "fp32", "--seed", str(ns.seed), "--threads", "1",
            "--log-dir", str(log_root), "--run-id", run_id]
    if not ns.project_seq_aux:  # the peer's model: its single-output stages carry no balance loss
        config = log_root / "same_model.toml"
        config.write_text("[model]\npreset = \"small\"\nseq_aux_alpha = 0.0\n")
        args += ["--config", str(config)]
    res = run_local(ns.pp, "launch.train", args, timeout=ns.timeout, capture=True,
                    env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    if res.returncode != 0:
        print(res.stdout[-4000:], file=sys.stderr)
        raise SystemExit(f"bench.peer_pipelining: launch.train {name} failed with exit code {res.returncode}")
    times = _project_step_ms(log_root / run_id, ns.warmup)
    if not times:
        raise SystemExit(f"bench.peer_pipelining: no measured steps in {log_root / run_id} (--steps must exceed --warmup)")
    return times


def _run_peer(ns: argparse.Namespace) -> dict[str, list[float]]:
    args = ["--worker", "--pp", str(ns.pp), "--microbatches", str(ns.microbatches), "--micro-batch",
            str(ns.micro_batch), "--seq-len", str(ns.seq_len), "--steps", str(ns.steps), "--seed", str(ns.seed),
            "--peer", *PEER]
    res = run_local(ns.pp, "bench.peer_pipelining", args, timeout=ns.timeout, capture=True,
                    env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    line = next((x for x in res.stdout.splitlines() if x.startswith("PEER_RESULT ")), None)
    if res.returncode != 0 or line is None:
        print(res.stdout[-4000:], file=sys.stderr)
        raise SystemExit(f"bench.peer_pipelining: the peer job failed with exit code {res.returncode}")
    return {k: v[ns.warmup:] for k, v in json.loads(line.split(" ", 1)[1]).items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.peer_pipelining", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7; ratios are per round)")
    p.add_argument("--steps", type=int, default=6, help="steps per run, including --warmup (default 6)")
    p.add_argument("--warmup", type=int, default=2, help="first steps of every run that are dropped (default 2)")
    p.add_argument("--pp", type=int, default=2, help="pipeline ranks (default 2)")
    p.add_argument("--microbatches", type=int, default=8, help="microbatches per step (default 8)")
    p.add_argument("--micro-batch", type=int, default=2, help="sequences per microbatch (default 2)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600, help="seconds before a job is killed (default 600)")
    p.add_argument("--out", default="bench/results/peer_pipelining.json", help="JSON output path")
    p.add_argument("--project-seq-aux", action="store_true",
                   help="keep the project's sequence-balance loss on (default: off, the peer's model; the peer "
                        "cannot carry it)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--peer", nargs="*", default=list(PEER), help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.worker:
        return _peer_worker(ns)
    if ns.rounds < 1 or ns.steps <= ns.warmup or ns.warmup < 0:
        p.error("need --rounds >= 1 and --steps > --warmup >= 0")
    if ns.microbatches < 2 * ns.pp or ns.microbatches % 2:
        p.error(f"--microbatches={ns.microbatches}: DualPipe needs an even count >= 2 * pp = {2 * ns.pp}")
    per_round: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="peer-bench-") as tmp:
        for k in range(ns.rounds):
            rec: dict[str, list[float]] = {}
            try:
                for name in PROJECT:
                    rec[f"project {name}"] = _run_project(ns, name, Path(tmp), f"r{k}-{name}")
                rec.update({f"peer {n}": v for n, v in _run_peer(ns).items()})
            except LaunchTimeout as exc:
                print(exc.output[-3000:], file=sys.stderr)
                raise SystemExit(f"bench.peer_pipelining: a job of round {k + 1} ran past --timeout {ns.timeout} s") from None
            med = {n: statistics.median(v) for n, v in rec.items()}
            ratios = {r: med[f"project {a}"] / med[f"peer {b}"] for r, (a, b, _) in RATIOS.items()}
            per_round.append({"step_ms": med, "ratios": ratios, "steps_ms": rec})
            print(f"round {k + 1}/{ns.rounds}: " + "  ".join(f"{n} {v:.1f} ms" for n, v in med.items()) + " | " +
                  "  ".join(f"{r} {v:.3f}" for r, v in ratios.items()), flush=True)
    names = list(per_round[0]["step_ms"])
    pooled = {n: statistics.median(x for r in per_round for x in r["steps_ms"][n]) for n in names}
    summary = {r: {"median_of_round_ratios": statistics.median(x["ratios"][r] for x in per_round),
                   "round_ratios": [x["ratios"][r] for x in per_round], "target_at_most": t,
                   "pooled_ratio": pooled[f"project {a}"] / pooled[f"peer {b}"]}
               for r, (a, b, t) in RATIOS.items()}
    print("\nstep ms (median over all measured steps; project = step minus its optimizer part)")
    for n in names:
        print(f"  {n:<18} {pooled[n]:8.1f}")
    print("\nratio project / peer (median of per-round ratios; range; ratio of the pooled medians above)")
    for r, s in summary.items():
        ok = "meets" if s["median_of_round_ratios"] <= s["target_at_most"] else "MISSES"
        print(f"  {r:<28} {s['median_of_round_ratios']:.3f}  ({min(s['round_ratios']):.3f}-{max(s['round_ratios']):.3f})"
              f"  pooled {s['pooled_ratio']:.3f}  target <= {s['target_at_most']}: {ok}")
    out = {"config": {k: v for k, v in vars(ns).items() if k not in ("worker", "peer")},
           "pooled_step_ms": pooled, "summary": summary, "rounds": per_round,
           "cores": os.cpu_count()}
    write_result(ns.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
