"""Per-rank entry of the ring demo: ``python -m launch.local -n 4 launch.ring [--laps 3]``."""

from __future__ import annotations

import argparse
import os
import sys

import torch
from mpi4py import MPI

from actors.ring import RingActor
from runtime import log


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.local -n N launch.ring",
                                description="Actors pass tensors around a ring of MPI ranks and check the sums.")
    p.add_argument("--laps", type=int, default=3, help="times the tensors go round the ring (default 3)")
    p.add_argument("--numel", type=int, default=1 << 18, help="elements per tensor (default 262144 = 1 MiB fp32)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"], help="tensor dtype")
    p.add_argument("--log-dir", default="logs", help="per-rank JSON logs go to LOG_DIR/RUN_ID/rank-R.jsonl")
    p.add_argument("--run-id", default=os.environ.get("HETEROPIPE_RUN_ID", "ring"), help="run id (default: ring)")
    ns = p.parse_args(argv)
    comm = MPI.COMM_WORLD
    log.configure(run_id=ns.run_id, rank=comm.rank, role="ring", log_dir=ns.log_dir)
    res = RingActor(laps=ns.laps, numel=ns.numel, dtype=getattr(torch, ns.dtype)).run()
    if comm.rank == 0:
        mib = ns.numel * torch.empty((), dtype=getattr(torch, ns.dtype)).element_size() / 2**20
        print(f"ring of {comm.size} ranks: {res['hops']} hops of {mib:.2f} MiB in {res['seconds']:.3f} s, "
              f"every tensor summed to {res['value']:g} as expected; logs in {log.log_path(ns.log_dir, ns.run_id, 0).parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
