"""launch.train with one injected fault, for the supervision and checkpoint tests.

Run: python -m launch.local -n N tests.mpi.faults FAULT RANK STEP [launch.train flags...]

FAULT, injected on rank RANK at the start of optimizer step STEP (0-based):
  kill       SIGKILL itself (a crash, the OOM killer)
  raise      raise RuntimeError (a bug)
  stop       SIGSTOP itself (a frozen process: heartbeats stop too)
  mute       stop posting messages but stay alive (heartbeats go on, the schedule does not)
  ckpt-kill  SIGKILL itself half-way through writing its shard of the checkpoint after STEP steps
  nan        one NaN in the gradient of its chunk 0's last layer, after the backward of step STEP
Before the fault the rank prints ``FAULT <fault> rank R step S at <unix time>`` and writes the time
to ``$FAULT_TIME_FILE`` if set.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from mpi4py import MPI

from actors import checkpoint
from actors.pipeline import StageActor
from launch import train

FAULT, RANK, STEP = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
FAULTS = ("kill", "raise", "stop", "mute", "ckpt-kill", "nan")
assert FAULT in FAULTS, f"fault {FAULT!r}: one of {FAULTS}"


def _announce() -> None:
    now = time.time()
    print(f"FAULT {FAULT} rank {RANK} step {STEP} at {now:.3f}", flush=True)
    if os.environ.get("FAULT_TIME_FILE"):  # mpiexec may interleave the printed line with others
        with open(os.environ["FAULT_TIME_FILE"], "w") as f:
            f.write(f"{now:.3f}")
            f.flush()
            os.fsync(f.fileno())


_train_step = StageActor.train_step


def _faulty_train_step(self, step, **kwargs):
    if MPI.COMM_WORLD.rank == RANK and step == STEP and FAULT not in ("ckpt-kill", "nan"):
        _announce()
        if FAULT == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif FAULT == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        elif FAULT == "raise":
            raise RuntimeError(f"injected fault on rank {RANK} at step {STEP}")
        else:  # mute: complete what is in flight, never post anything again
            while True:
                self.transport.progress()
                time.sleep(0.01)
    return _train_step(self, step, **kwargs)


_global_grad_norm = StageActor._global_grad_norm


def _faulty_grad_norm(self):
    if FAULT == "nan" and MPI.COMM_WORLD.rank == RANK and self.progress_step == STEP:
        _announce()
        layer = self.chunks[0].layers[str(self.chunks[0].layer_ids[-1])]
        next(layer.parameters()).grad.view(-1)[0] = float("nan")
    return _global_grad_norm(self)


_write_atomic = checkpoint._write_atomic


def _faulty_write(path, data: bytes) -> None:
    if (FAULT == "ckpt-kill" and MPI.COMM_WORLD.rank == RANK and path.parent.name == f"step-{STEP:08d}"
            and path.suffix == ".pt"):
        _announce()
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_bytes(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    _write_atomic(path, data)


StageActor.train_step = _faulty_train_step
StageActor._global_grad_norm = _faulty_grad_norm
checkpoint._write_atomic = _faulty_write
train._exit(train.main(sys.argv[4:]))
