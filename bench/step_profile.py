"""Where one rank's training step spends its time: cProfile over ``StageActor.train_step``.

    python -m launch.local -n 2 bench.step_profile [--schedule dualpipe] [--steps 6] [--rank 0] [--top 0]

The peer bench's settings (``bench.peer_pipelining``): ModelConfig.small, pp = ranks, 8 microbatches
of 2 x 64 tokens, one torch thread per rank, spans traced as ``launch.train`` does. Two warm-up
steps, then ``--steps`` unprofiled steps (their median wall time, slowest rank, after a barrier)
and ``--steps`` profiled ones on rank ``--rank``. Prints, per step, the cumulative time of each
piece of the step that is not the model's own compute (data drawing, span logging, transport
progress and waits, channel posts, the mirror exchange, the step tail's parts) and, with
``--top N``, cProfile's N costliest functions by own time. The profiler slows Python-heavy pieces
more than torch kernels: compare pieces between runs of this command, not with unprofiled times.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import re
import statistics
import sys
import time

import torch
from mpi4py import MPI

from actors.data import SyntheticTokens
from actors.model import ModelConfig
from actors.optim import OptimConfig
from actors.pipeline import StageActor
from bench.output import write_result
from runtime import log
from runtime.schedules import SCHEDULE_NAMES, build

# piece -> regex over "file:function" of the functions whose cumulative time it is
PIECES = {
    "walk (all actions)": r"action_walk.py:walk$",
    "data drawing": r"data.py:batch$",
    "span logging": r"log.py:record_span$",
    "transport progress": r"progress.py:progress$",
    "waiting on receives": r"progress.py:wait$",
    "receive posts": r"channels.py:post$",
    "channel sends": r"channels.py:send$",
    "W closures": r"action_walk.py:_weight_grad$",
    "mirror post": r"mirror_sync.py:post$",
    "tail: mirror sum": r"mirror_sync.py:add_theirs$",
    "tail: mirror loads": r"mirror_sync.py:sum_loads$",
    "tail: grad norm": r"pipeline.py:_global_grad_norm$",
    "tail: optimizer": r"optim.py:step$",
    "tail: gate bias": r"model.py:update_gate_bias$",
    "tail: losses": r"step_reduce.py:(start|finish)$",
    "tail: flush": r"transport.py:flush$",
}


def pieces_ms(stats: pstats.Stats, steps: int) -> dict[str, float]:
    """Cumulative ms per step of every piece of :data:`PIECES` (and of the whole profile)."""
    out = {"profiled step": sum(v[2] for v in stats.stats.values()) / steps * 1e3}
    for name, pattern in PIECES.items():
        rx = re.compile(pattern)
        out[name] = sum(ct for (f, _, fn), (_, _, _, ct, _) in stats.stats.items() if rx.search(f"{f}:{fn}")) / steps * 1e3
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.local -n 2 bench.step_profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schedule", choices=SCHEDULE_NAMES, default="dualpipe", help="schedule (default dualpipe)")
    p.add_argument("--steps", type=int, default=6, help="unprofiled and profiled steps each (default 6)")
    p.add_argument("--rank", type=int, default=0, help="rank to profile (default 0)")
    p.add_argument("--microbatches", type=int, default=8, help="microbatches per step (default 8)")
    p.add_argument("--top", type=int, default=0, help="also print cProfile's N costliest functions (default 0)")
    p.add_argument("--out", default=None, help="JSON output path (default bench/results/step_profile_SCHEDULE.json)")
    ns = p.parse_args(argv)
    world = MPI.COMM_WORLD
    if not 0 <= ns.rank < world.size or ns.steps < 1:
        p.error(f"need --steps >= 1 and --rank in 0..{world.size - 1}")
    torch.set_num_threads(1)
    log.configure(run_id=f"step-profile-{time.strftime('%Y%m%d-%H%M%S')}", rank=world.rank, role="stage",
                  log_dir="/tmp/bench-step-profile-logs")
    model = ModelConfig.small(seq_len=64)
    actor = StageActor(schedule=build(ns.schedule, world.size, ns.microbatches), model=model, optim=OptimConfig(),
                       data=SyntheticTokens(model.vocab_size, model.seq_len, 0), micro_batch=2, seed=0,
                       program=lambda a: None, trace=True)
    for k in range(2):
        actor.train_step(k)
    plain = []
    for k in range(ns.steps):
        world.Barrier()
        t0 = time.perf_counter()
        actor.train_step(2 + k)
        plain.append(world.allreduce(time.perf_counter() - t0, op=MPI.MAX) * 1e3)
    prof = cProfile.Profile()
    profiled = []
    for k in range(ns.steps):
        world.Barrier()
        mine = world.rank == ns.rank
        if mine:
            prof.enable()
        r = actor.train_step(2 + ns.steps + k)
        if mine:
            prof.disable()
            profiled.append((r.seconds * 1e3, r.compute_seconds * 1e3))
    actor.stop()
    if world.rank != ns.rank:
        return 0
    stats = pstats.Stats(prof)
    ms = pieces_ms(stats, ns.steps)
    step_ms, compute_ms = (statistics.median(x[i] for x in profiled) for i in (0, 1))
    print(f"{ns.schedule}, {world.size} ranks: unprofiled step {statistics.median(plain):.1f} ms (median, slowest "
          f"rank); profiled rank {ns.rank}: step {step_ms:.1f} ms, of it inside F/B/W {compute_ms:.1f} ms")
    print(f"{'piece (cumulative, profiled)':<30}{'ms/step':>9}")
    for name, v in ms.items():
        print(f"{name:<30}{v:>9.1f}")
    if ns.top:
        s = io.StringIO()
        stats.stream = s
        stats.sort_stats("tottime").print_stats(ns.top)
        print(s.getvalue())
    write_result(ns.out or f"bench/results/step_profile_{ns.schedule}.json",
                 {"args": vars(ns), "unprofiled_step_ms": plain, "profiled_step_ms": step_ms,
                  "profiled_compute_ms": compute_ms, "pieces_ms_per_step": ms})
    return 0


if __name__ == "__main__":
    sys.exit(main())
