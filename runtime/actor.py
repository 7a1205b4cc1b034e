"""The actor: the unit of work on one MPI rank, and how a failing actor takes the job down.

An actor owns its rank, its communicator and its :class:`~runtime.transport.Transport` queues.
:meth:`Actor.run` starts it, runs the subclass's :meth:`Actor.main` loop and stops it. Any
exception escaping ``main`` (a bug, a receive past its deadline, a corrupt message) is reported as
a value tagged with rank and host — error, traceback and every pending send/recv — to the rank's
log and to stderr, and then the whole job is aborted with ``MPI_Abort``: peers blocked on this
rank would otherwise wait forever.
"""

from __future__ import annotations

import abc
import socket
import sys
import traceback

from mpi4py import MPI

from runtime import log
from runtime.transport import CommTimeout, Transport, TransportConfig

__all__ = ["Actor", "failure_report", "abort_job"]


def failure_report(exc: BaseException, *, rank: int, role: str, pending: list[dict]) -> dict:
    """The error as a value: who failed, where, why, and what was still in flight."""
    return {
        "rank": rank,
        "host": socket.gethostname(),
        "role": role,
        "error": f"{type(exc).__name__}: {exc}",
        "traceback": "".join(traceback.format_exception(exc)),
        "pending": pending,
    }


def abort_job(report: dict, comm: MPI.Comm = MPI.COMM_WORLD, code: int = 1) -> None:
    """Log and print ``report``, then abort every rank of ``comm``'s job. Does not return."""
    log.get_logger().error("actor_failed", **{k: v for k, v in report.items() if k != "traceback"},
                           traceback=report["traceback"])
    log.flush()
    lines = [f"[rank {report['rank']} @ {report['host']} ({report['role']})] FAILED: {report['error']}"]
    if report["pending"]:
        lines.append(f"  {len(report['pending'])} pending operations:")
        lines += [f"    {p}" for p in report["pending"][:32]]
    else:
        lines.append("  no pending operations")
    lines.append(report["traceback"].rstrip())
    print("\n".join(lines), file=sys.stderr, flush=True)
    comm.Abort(code)


class Actor(abc.ABC):
    """Base of every rank-resident actor (pipeline stage, expert group, ...).

    Subclasses implement :meth:`main`; they may extend :meth:`start` / :meth:`stop` (call super).
    """

    role: str = "actor"

    def __init__(self, comm: MPI.Comm = MPI.COMM_WORLD, *, transport: TransportConfig | None = None,
                 trace: bool = True):
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.log = log.get_logger()
        self.transport = Transport(comm, transport, on_span=log.record_span if trace else None)
        self.running = False

    def start(self) -> None:
        """Called once before :meth:`main`."""
        self.running = True
        self.log.info("actor_start", actor=type(self).__name__, size=self.size)

    @abc.abstractmethod
    def main(self):
        """The actor's loop: exchange messages through ``self.transport`` and compute."""

    def stop(self) -> None:
        """Called once after :meth:`main` returned: flushes sends, checks no receive is left open."""
        self.transport.close()
        self.running = False
        self.log.info("actor_stop", actor=type(self).__name__)

    def run(self):
        """start, main, stop; on any exception report it and abort the whole job."""
        try:
            self.start()
            result = self.main()
            self.stop()
            return result
        except BaseException as exc:  # noqa: BLE001 - any failure must take the job down, not hang it
            pending = exc.pending if isinstance(exc, CommTimeout) else self.transport.pending()
            abort_job(failure_report(exc, rank=self.rank, role=self.role, pending=pending), self.comm)
