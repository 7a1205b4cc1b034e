"""Expert-parallel training steps: DualPipe pp=2 x ep=2 with the F&B overlap on and off, and the pure
pipeline pp=4, on the same model and the same 4 ranks, interleaved in one run.

    python -m launch.local -n 4 bench.ep_step [--rounds 7] [--model small|tiny] [--out bench/results/ep_step.json]

Two StageActors live in every rank: one over the pp=2 x ep=2 layout (2 emulated nodes per EP group,
:func:`actors.ep_layout.expert_parallel_job`) and one over all 4 ranks as pp=4. Each round runs one
optimizer step of each variant, in a rotating order: ``overlap`` (FB actions interleave the forward
and backward so one microbatch's exchanges travel while the other computes, actors/fb_overlap.py,
and the layer hooks progress the exchanges during compute), ``no-hooks`` (the same without the
layer hooks: exchanges progress only where one is posted or waited for), ``serial`` (the same
actions, each exchange waited for at once) and ``pp4``. Reported: the median
step time (slowest rank), the median over rounds of each variant's step time / serial's in the same
round (robust to the host's load drifting between rounds), and for the EP variants the time
blocked on exchanges inside FB actions (sum over ranks). EP communication hidden in the FB phase
= 1 - (blocked in FB, overlap) / (blocked in FB, serial) — the serial wait being the exchanges'
time when nothing runs under them.
On this host both "links" are shared memory and the ranks share 2 cores, so a hidden exchange
still competes with the compute it hides under for CPU time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from mpi4py import MPI

from actors.data import RowShard, SyntheticTokens
from actors.ep_layout import expert_parallel_job
from actors.model import ModelConfig
from actors.optim import OptimConfig
from actors.pipeline import StageActor
from bench.output import write_result
from runtime import log
from runtime.schedules import build

VARIANTS = ("overlap", "no-hooks", "serial", "pp4")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.local -n 4 bench.ep_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median reported)")
    p.add_argument("--model", choices=["tiny", "small"], default="small", help="model preset (make run: small)")
    p.add_argument("--microbatches", type=int, default=8, help="microbatches per step")
    p.add_argument("--out", default="bench/results/ep_step.json", help="JSON output path (rank 0 writes)")
    ns = p.parse_args(argv)
    world = MPI.COMM_WORLD
    if world.Get_size() != 4:
        print("bench.ep_step: run on 4 ranks", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    log.configure(run_id="bench-ep-step", rank=world.Get_rank(), role="stage", log_dir="/tmp/bench-ep-step-logs")
    model = getattr(ModelConfig, ns.model)()
    optim, seed, micro_batch = OptimConfig(), 0, 2
    data = SyntheticTokens(model.vocab_size, model.seq_len, seed)
    job = expert_parallel_job(world, pp=2, ep=2, nodes=2, model=model, microbatches=ns.microbatches)
    ep_actor = StageActor(schedule=build("dualpipe", 2, ns.microbatches), model=model, optim=optim,
                          data=RowShard(data, part=job.comms.place.ep, parts=2), micro_batch=micro_batch // 2,
                          seed=seed, program=lambda a: None, comm=job.comms.pp, trace=False, executor=job.executor)
    pp_actor = StageActor(schedule=build("dualpipe", 4, ns.microbatches), model=model, optim=optim, data=data,
                          micro_batch=micro_batch, seed=seed, program=lambda a: None, comm=world, trace=False)
    ex = ep_actor.exec

    def step(variant: str, k: int) -> dict:
        world.Barrier()
        t0 = time.perf_counter()
        if variant == "pp4":
            pp_actor.train_step(k)
        else:
            ex.overlap = variant in ("overlap", "no-hooks")
            ex.progress_in_compute = variant != "no-hooks"
            ex.clock.take()
            ep_actor.train_step(k)
        dt = world.allreduce(time.perf_counter() - t0, op=MPI.MAX)
        fb = world.allreduce(ex.clock.take().get("fb", 0.0)) if variant != "pp4" else 0.0
        return {"step_s": dt, "fb_wait_s": fb}

    for v in VARIANTS:  # warm-up
        step(v, 0)
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for r in range(ns.rounds):
        for v in VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]:
            runs[v].append(step(v, 1 + r))
    if world.Get_rank() == 0:
        med = {v: {k: statistics.median(x[k] for x in runs[v]) for k in ("step_s", "fb_wait_s")} for v in VARIANTS}
        hidden = 1 - med["overlap"]["fb_wait_s"] / med["serial"]["fb_wait_s"]
        hidden_no_hooks = 1 - med["no-hooks"]["fb_wait_s"] / med["serial"]["fb_wait_s"]
        print(f"EP training step, {ns.model} model, {ns.microbatches} microbatches x {micro_batch} sequences, 4 ranks "
              f"(pp=2 x ep=2 over 2 emulated nodes per EP group vs pp=4), median of {ns.rounds} interleaved rounds")
        # the load of a shared host drifts between rounds: the ratio inside each round, then its median
        per_round = {v: statistics.median(a["step_s"] / b["step_s"] for a, b in zip(runs[v], runs["serial"]))
                     for v in VARIANTS}
        print(f"{'variant':<9}{'step s':>9}{'vs serial':>11}{'per-round vs serial':>21}"
              f"{'FB exchange wait s (sum of ranks)':>36}")
        for v in VARIANTS:
            print(f"{v:<9}{med[v]['step_s']:>9.3f}{med[v]['step_s'] / med['serial']['step_s']:>11.2f}"
                  f"{per_round[v]:>21.2f}{med[v]['fb_wait_s']:>36.3f}")
        print(f"EP communication hidden in FB actions: {hidden:.1%} (target >= 80%); without the layer progress "
              f"hooks {hidden_no_hooks:.1%}")
        write_result(ns.out, {"args": vars(ns), "runs": runs, "median": med, "per_round_vs_serial": per_round,
                              "hidden": hidden, "hidden_no_hooks": hidden_no_hooks})
    ep_actor.stop()
    pp_actor.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
