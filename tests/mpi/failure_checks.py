"""Failure paths: ``raise`` (rank 2 raises while peers wait on it) and ``timeout`` (rank 1 waits
for a message nobody sends). Both must abort the whole job quickly with the report on stderr.

Run: python -m launch.local -n 4 tests.mpi.failure_checks raise|timeout LOG_DIR
"""

from __future__ import annotations

import sys

import torch
from mpi4py import MPI

from runtime import log
from runtime.actor import Actor
from runtime.transport import TransportConfig

MODE, LOG_DIR = sys.argv[1], sys.argv[2]


class Faulty(Actor):
    role = "faulty"

    def main(self) -> None:
        if MODE == "raise":
            if self.rank == 2:
                # 4 MiB: more than MPI sends eagerly, so the send stays open (an eager one is done at once)
                self.transport.isend(0, torch.ones(1 << 20), channel=7, mb=5)
                raise ValueError("boom from rank 2")
            # everyone else waits for a message rank 2 will never send
            self.transport.recv(2, channel=9, expect={"kind": "act", "mb": 11})
        else:
            if self.rank == 1:
                self.transport.recv(0, channel=3, expect={"kind": "grad", "mb": 42}, )
            else:
                self.transport.recv(1, channel=8, expect={"kind": "act", "mb": 0})


log.configure(run_id=f"fail-{MODE}", rank=MPI.COMM_WORLD.Get_rank(), role="faulty", log_dir=LOG_DIR)
timeout = 2.0 if MODE == "timeout" else 100.0
# Rank 1's short deadline fires first in the timeout case; the others would wait 100 s.
Faulty(transport=TransportConfig(timeout_s=timeout if MPI.COMM_WORLD.Get_rank() == 1 else 100.0)).run()
