"""Clock-offset estimate under mpiexec with injected skews (3 ranks; no torch).

Run: python -m launch.local -n 3 tests.mpi.clock_checks
"""

from __future__ import annotations

import time

from mpi4py import MPI

from runtime.clock import offset_to_root

SKEW_NS = {0: 0, 1: 7_000_000_000, 2: -3_000_000_000}
"""What each rank's injected clock adds to the host's monotonic clock."""

comm = MPI.COMM_WORLD
rank = comm.Get_rank()
skew = SKEW_NS[rank]
off = offset_to_root(comm, rounds=8, clock=lambda: time.monotonic_ns() + skew)
# rank 0's clock = local - skew, so the true offset is -skew; the estimate errs by at most rtt/2
assert off.rounds == (0 if rank == 0 else 8), off
assert abs(off.offset_ns + skew) <= off.rtt_ns // 2 + 1, (rank, off)
print(f"rank {rank}: clock ok (offset {off.offset_ns} ns, rtt {off.rtt_ns} ns)", flush=True)
