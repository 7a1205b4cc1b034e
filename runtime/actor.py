"""The actor: the unit of work on one MPI rank, and how a failing actor takes the job down.

An actor owns its rank, its communicator and its :class:`~runtime.transport.Transport` queues.
:meth:`Actor.run` starts it, runs the subclass's :meth:`Actor.main` loop and stops it. Any
exception escaping ``main`` (a bug, a receive past its deadline, a corrupt message) is reported as
a value tagged with rank and host — error, traceback and every pending send/recv — to the rank's
log and to stderr, and then the whole job is aborted with ``MPI_Abort``: peers blocked on this
rank would otherwise wait forever.

Each actor keeps a :class:`~runtime.flight.FlightRecorder` of its last queue operations and compute
spans (dumped with the failure report) and a position — step, current action, a counter of actions
done, the ranks it has receives open from — that :meth:`Actor.status` reports; with :meth:`Actor.supervise`
a :class:`~runtime.heartbeat.Heartbeat` thread sends that status to the job's supervisor, which
names a dead, frozen or stuck rank even when the rank itself cannot.
"""

from __future__ import annotations

import abc
import socket
import sys
import traceback

from mpi4py import MPI

from runtime import log
from runtime.flight import FlightRecorder
from runtime.heartbeat import Heartbeat
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


def abort_job(report: dict, comm: MPI.Comm = MPI.COMM_WORLD, code: int = 1, flight: list[dict] | None = None) -> None:
    """Log and print ``report`` (and dump the ``flight`` recorder's entries to the log), then abort
    every rank of ``comm``'s job. Does not return."""
    log.get_logger().error("actor_failed", **{k: v for k, v in report.items() if k != "traceback"},
                           traceback=report["traceback"])
    if flight is not None:
        log.get_logger().info("flight_recorder", entries=flight)
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
        self.flight = FlightRecorder()
        self._trace = trace
        self.transport = Transport(comm, transport, on_span=self._on_transfer)
        # Position, written by the main thread and read by the heartbeat thread (plain attribute
        # stores: atomic under the GIL). progress_count moves on every action: the supervisor's
        # progress deadline watches it, so a long step is not mistaken for a hang.
        self.progress_step = -1
        self.progress_action: object = "start"
        self.progress_count = 0
        self.last_step_s: float | None = None
        self.last_compute_s: float | None = None
        self.heartbeat: Heartbeat | None = None
        self._world_of: list[int] | None = None  # this communicator's ranks as COMM_WORLD ranks
        self.running = False

    def _on_transfer(self, name: str, t0: int, t1: int, **fields) -> None:
        # Runs on every message: ``fields`` is this call's own dict, so the flight recorder keeps it
        # (with dur_us added after the log has read it) instead of a keyword copy of it.
        if self._trace:
            log.record_span(name, t0, t1, **fields)
        fields["dur_us"] = (t1 - t0) // 1000
        self.flight.record_fields(name, t1, fields)

    def role_info(self) -> dict:
        """What this rank is, for reports (subclasses add their pipeline stages, expert group, ...)."""
        return {"role": self.role}

    def status(self) -> dict:
        """Where this rank is now (read from the heartbeat thread while the main thread runs).

        ``waits_for``: the ranks this one has receives open from — a stalled rank is blocked on one
        of them (the supervisor follows these edges to the culprit)."""
        pending = self.transport.pending()
        if self._world_of is not None:  # the transport's peers are ranks of self.comm
            pending = [{**p, "peer": self._world_of[p["peer"]]} if p["op"] in ("send", "recv") else p for p in pending]
        return {"step": self.progress_step, "action": str(self.progress_action), "count": self.progress_count,
                "waits_for": sorted({p["peer"] for p in pending if p["op"] == "recv"}), "pending": pending[:16],
                "num_pending": len(pending), "last_step_s": self.last_step_s,
                "last_compute_s": self.last_compute_s, "flight": self.flight.tail(24)}

    def supervise(self, address: str, *, interval_s: float = 1.0, log_dir: str | None = None) -> None:
        """Start heartbeats to the supervisor at ``address`` (``launch.supervisor``).

        The supervisor knows ranks by their place in the job, so the heartbeat carries this
        process's COMM_WORLD rank and ``waits_for`` is translated from this actor's communicator
        (e.g. the pipeline communicator of one expert-parallel slice) to COMM_WORLD ranks."""
        world = MPI.COMM_WORLD
        self._world_of = MPI.Group.Translate_ranks(self.comm.Get_group(), list(range(self.size)), world.Get_group())
        self.heartbeat = Heartbeat(address, rank=world.Get_rank(), status=self.status, role=self.role_info(),
                                   log_dir=log_dir, interval_s=interval_s)

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
        if self.heartbeat is not None and not self.heartbeat.stop():
            self.log.warning("supervisor_unreachable", message="the final 'bye' heartbeat did not leave: the "
                             "supervisor is gone or not reading")

    def run(self):
        """start, main, stop; on any exception report it and abort the whole job."""
        try:
            self.start()
            result = self.main()
            self.stop()
            return result
        except BaseException as exc:  # noqa: BLE001 - any failure must take the job down, not hang it
            pending = exc.pending if isinstance(exc, CommTimeout) else self.transport.pending()
            report = failure_report(exc, rank=self.rank, role=self.role, pending=pending)
            if self.heartbeat is not None and not self.heartbeat.report_failure(report):
                self.log.warning("supervisor_unreachable", message="the failure report did not reach the supervisor (gone "
                                 "or not reading); it is still logged here and printed to stderr")
            abort_job(report, self.comm, flight=self.flight.tail())
