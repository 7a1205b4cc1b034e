"""Transport benchmark: the runtime's queues against raw mpi4py Send/Recv on 2 ranks.

Ping-pong between ranks 0 and 1 for message sizes 8 B ... 64 MiB. For each size the two methods
are measured alternately, round after round, in one run (this machine is noisy; only ratios
measured side by side mean anything), and the median of the rounds is reported:
one-way time = round trip / 2, bandwidth = bytes / one-way time.

    python -m launch.local -n 2 bench.transport [--rounds 7] [--out bench/results/transport.json]

Targets (issue 3): bandwidth ratio queue/raw >= 0.95 at >= 1 MiB; added one-way latency <= 15 us at 8 B.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from mpi4py import MPI

from runtime.envelope import tensor_bytes
from runtime.transport import Transport, TransportConfig

SIZES = [8, 64, 512, 4096, 32768, 262144, 1 << 20, 4 << 20, 16 << 20, 64 << 20]


def _iters(nbytes: int) -> int:
    # about 30-60 ms of transfer per measurement at a few GB/s, at least 4 round trips
    return max(4, min(4000, (64 << 20) // max(nbytes, 1) // 4))


def raw_pingpong(comm: MPI.Comm, buf, iters: int) -> float:
    peer = 1 - comm.rank
    comm.Barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        if comm.rank == 0:
            comm.Send([buf, MPI.BYTE], peer, 77)
            comm.Recv([buf, MPI.BYTE], peer, 77)
        else:
            comm.Recv([buf, MPI.BYTE], peer, 77)
            comm.Send([buf, MPI.BYTE], peer, 77)
    return (time.perf_counter() - t0) / iters / 2


def queue_pingpong(tp: Transport, x: torch.Tensor, out: torch.Tensor, iters: int) -> float:
    peer = 1 - tp.rank
    tp.comm.Barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        if tp.rank == 0:
            h = tp.irecv(peer, channel=1, out=out)  # posted ahead into a preallocated buffer
            tp.isend(peer, x, channel=0)
            tp.wait(h)
        else:
            tp.recv(peer, channel=0, out=out)
            tp.isend(peer, out, channel=1)
    tp.flush()
    return (time.perf_counter() - t0) / iters / 2


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.local -n 2 bench.transport", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7, help="alternating measurement rounds per size (median taken)")
    p.add_argument("--max-bytes", type=int, default=64 << 20, help="largest message size (default 64 MiB)")
    p.add_argument("--out", default="bench/results/transport.json", help="JSON output path (rank 0 writes)")
    ns = p.parse_args(argv)
    comm = MPI.COMM_WORLD
    if comm.Get_size() != 2:
        print("bench.transport needs exactly 2 ranks: python -m launch.local -n 2 bench.transport", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    tp = Transport(comm, TransportConfig(timeout_s=300))
    rows = []
    for nbytes in [s for s in SIZES if s <= ns.max_bytes]:
        x = torch.ones(nbytes, dtype=torch.uint8)
        out = torch.empty_like(x)
        raw_buf = tensor_bytes(x.clone())
        iters = _iters(nbytes)
        raw_t, q_t = [], []
        queue_pingpong(tp, x, out, max(1, iters // 4))  # warm-up: first-touch, MPI connection setup
        raw_pingpong(comm, raw_buf, max(1, iters // 4))
        for _ in range(ns.rounds):
            raw_t.append(raw_pingpong(comm, raw_buf, iters))
            q_t.append(queue_pingpong(tp, x, out, iters))
        raw_s, q_s = statistics.median(raw_t), statistics.median(q_t)
        rows.append({"bytes": nbytes, "iters": iters, "raw_us": raw_s * 1e6, "queue_us": q_s * 1e6,
                     "raw_GBps": nbytes / raw_s / 1e9, "queue_GBps": nbytes / q_s / 1e9,
                     "bw_ratio": raw_s / q_s, "added_us": (q_s - raw_s) * 1e6})
        if comm.rank == 0:
            r = rows[-1]
            print(f"{nbytes:>10} B  raw {r['raw_us']:10.2f} us {r['raw_GBps']:7.3f} GB/s | queue {r['queue_us']:10.2f} us "
                  f"{r['queue_GBps']:7.3f} GB/s | ratio {r['bw_ratio']:.3f}  added {r['added_us']:+8.2f} us", flush=True)
    tp.close()
    if comm.rank == 0:
        big = [r["bw_ratio"] for r in rows if r["bytes"] >= 1 << 20]
        small = rows[0]
        summary = {"min_bw_ratio_ge_1MiB": min(big) if big else None, "added_latency_us_8B": small["added_us"],
                   "targets": {"bw_ratio_ge_1MiB": 0.95, "added_latency_us_8B": 15.0},
                   "mpi": MPI.Get_library_version().splitlines()[0], "rounds": ns.rounds}
        print(f"\nsummary: min bandwidth ratio at >= 1 MiB = {summary['min_bw_ratio_ge_1MiB']}, "
              f"added one-way latency at 8 B = {summary['added_latency_us_8B']:.2f} us "
              f"(targets >= 0.95, <= 15 us)")
        Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.out).write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))
        print(f"wrote {ns.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
