"""One rank's progress engine: every open MPI request, what completes when it does, and deadlines.

Everything that moves bytes on a rank — the :class:`~runtime.transport.Transport` queues, its
schedule-known :mod:`~runtime.channels`, and any later exchange over another communicator (an
expert-parallel ``Ialltoallv`` on a sub-communicator, say) — posts its requests here with
:meth:`Progress.add`, naming an *operation* (any object with ``_part_done(part, status)``), and
registers itself once with :meth:`Progress.register` as a *source* of the failure report (an
object whose ``open_operations()`` lists what it has in flight; the per-message paths use this,
since tracking each operation costs a call per message); a user with few operations (an
exchange per layer) may instead :meth:`Progress.track` each one (an object with ``describe()``)
until it is done. The engine then gives all of them one progress loop, one wait and
one failure report:

* :meth:`Progress.progress` completes whatever is ready (``Testsome``) and returns at once;
* :meth:`Progress.wait` blocks *inside MPI* (``Waitany``, with the GIL released) until an
  operation is done, running each completed request's Python part as it lands; MPI advances every
  transfer while it waits, so a large shared-memory copy is not chopped up by Python polling;
* a deadline still fires while blocked: a watchdog thread completes a generalized request
  (``MPI.Grequest``) that sits in every wait's request list once the deadline passed, the wait
  wakes up and raises :class:`CommTimeout` with :meth:`Progress.pending`, the list of every open
  operation of every user of the engine (it needs ``MPI_THREAD_MULTIPLE``, mpi4py's default).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol

from mpi4py import MPI

__all__ = ["Progress", "Operation", "Source", "CommTimeout"]

_WATCHDOG_PERIOD_S = 0.05
"""How often the watchdog looks at the current wait's deadline (a timeout fires this much late at most)."""
_SPIN_POLLS = 64
"""Testsome polls a wait makes before it blocks in Waitany: a blocking call costs ~3 us more per
completion than a poll here (MPICH), which is most of a small message's cost; a transfer still in
flight after ~100 us of polling is a large one, better advanced inside MPI."""


class CommTimeout(TimeoutError):
    """A wait passed its deadline. ``pending`` lists every operation still open on the engine."""

    def __init__(self, message: str, pending: list[dict]):
        super().__init__(message)
        self.pending = pending


class Operation(Protocol):
    """What the engine needs from an operation that owns requests."""

    def _part_done(self, part: int, status: MPI.Status) -> None:
        """Request ``part`` of this operation completed (``status`` is only valid during the call)."""


class Source(Protocol):
    """A user of the engine, as the failure report sees it."""

    def open_operations(self) -> list[dict]:
        """One dict per operation in flight: op, peer, channel, kind, mb, seq, state, age_s, ..."""


class _Alarm:
    """The watchdog's generalized request: completing it wakes a blocked wait."""

    __slots__ = ()

    def _part_done(self, part: int, status: MPI.Status) -> None:
        pass  # handled by the engine itself


_ALARM = _Alarm()


def _new_alarm() -> MPI.Grequest:
    return MPI.Grequest.Start(lambda status: None, lambda: None, lambda completed: None)


class Progress:
    """Open requests of one rank, in one list, each with the operation (and part) it belongs to.

    Index 0 of the list is always the watchdog's alarm, so every ``Testsome`` / ``Waitany`` sees it.
    """

    def __init__(self, timeout_s: float = 120.0):
        if not timeout_s > 0:
            raise ValueError(f"timeout_s={timeout_s}: must be > 0 seconds")
        if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
            raise RuntimeError("the progress engine's deadline needs MPI_THREAD_MULTIPLE: leave "
                               "mpi4py.rc.thread_level at its default 'multiple'")
        self.timeout_s = timeout_s
        self._reqs: list[MPI.Request] = [_new_alarm()]
        self._owners: list[tuple[Operation, int]] = [(_ALARM, 0)]
        self._status = MPI.Status()
        self._statuses = [MPI.Status() for _ in range(64)]
        self._sources: list[Source] = []
        self._open: dict[object, None] = {}  # tracked operations not done yet, in posting order
        self._lock = threading.Lock()  # alarm replacement vs. the watchdog completing it
        self._deadline: float | None = None
        self._alarm_fired = False
        self._watchdog: threading.Thread | None = None

    # ------------------------------------------------------------------ posting
    def add(self, req: MPI.Request, op: Operation, part: int = 0) -> None:
        """Let the engine complete ``req``; ``op._part_done(part, status)`` runs when it does."""
        self._reqs.append(req)
        self._owners.append((op, part))

    def register(self, source: Source) -> None:
        """List ``source``'s open operations in :meth:`pending` (and so in every failure report)."""
        self._sources.append(source)

    def track(self, op: object) -> None:
        """List ``op`` (it has ``describe() -> dict``) in :meth:`pending` until :meth:`untrack`."""
        self._open[op] = None

    def untrack(self, op: object) -> None:
        self._open.pop(op, None)

    # ------------------------------------------------------------------ completion
    def progress(self) -> int:
        """Complete every request that is ready now; returns how many finished."""
        reqs = self._reqs
        n = len(reqs)
        if n == 1:
            return 0
        if n > len(self._statuses):
            self._statuses.extend(MPI.Status() for _ in range(n - len(self._statuses)))
        try:
            idx = MPI.Request.Testsome(reqs, self._statuses)
        except MPI.Exception as exc:
            raise self._mpi_failed(exc) from None
        if not idx:
            return 0
        owners, statuses = self._owners, self._statuses
        finished = [(owners[i], statuses[k]) for k, i in enumerate(idx)]  # statuses come packed
        if len(idx) == n - 1 and 0 not in idx:  # the usual case on a latency-bound path
            del reqs[1:], owners[1:]
        else:
            done = set(idx)
            self._reqs = [r for i, r in enumerate(reqs) if i not in done]
            self._owners = [o for i, o in enumerate(owners) if i not in done]
            if 0 in done:
                self._renew_alarm()
        for (op, part), status in finished:
            if op is not _ALARM:
                op._part_done(part, status)
        return len(idx)

    def wait(self, done: Callable[[], bool], what: Callable[[], str], timeout: float | None = None,
             op: object | None = None) -> None:
        """Block in MPI until ``done()``; past the deadline raise CommTimeout saying ``what()``.

        ``op``: the operation ``done()`` waits for, if there is one: the first polls test only its
        requests (one ``Test`` each, ~0.2 us, where a ``Testsome`` over the list costs ~3 us in
        mpi4py), with a full progress every few polls so that the others complete too.
        """
        if done():
            return
        for k in range(_SPIN_POLLS):
            if op is not None and k % 8 != 7:
                if self._poll(op) and done():
                    return
            elif self.progress() and done():
                return
        limit = self.timeout_s if timeout is None else timeout
        deadline = time.monotonic() + limit
        self._deadline = deadline
        if self._watchdog is None:
            self._watchdog = threading.Thread(target=self._watch, name="progress-watchdog", daemon=True)
            self._watchdog.start()
        status = self._status
        try:
            while not done():
                if len(self._reqs) == 1 and not self._alarm_fired:
                    # nothing is open that could make done() true
                    raise CommTimeout(f"{what()}: nothing is posted that could complete it", self.pending())
                try:
                    i = MPI.Request.Waitany(self._reqs, status)
                except MPI.Exception as exc:
                    raise self._mpi_failed(exc) from None
                op, part = self._owners[i]
                del self._reqs[i], self._owners[i]
                if op is _ALARM:
                    self._renew_alarm()
                    if time.monotonic() >= deadline:
                        raise CommTimeout(f"{what()} for more than {limit:g} s", self.pending())
                    self._deadline = deadline  # a stale alarm from an earlier wait: keep waiting
                else:
                    op._part_done(part, status)
        finally:
            self._deadline = None

    def _poll(self, op: object) -> bool:
        """Test ``op``'s open requests one by one; completes (at most) one; returns whether it did."""
        owners, status = self._owners, self._status
        for i in range(len(owners) - 1, 0, -1):
            owner, part = owners[i]
            if owner is op:
                try:
                    flag = self._reqs[i].Test(status)
                except MPI.Exception as exc:
                    raise self._mpi_failed(exc) from None
                if flag:
                    del self._reqs[i], owners[i]
                    op._part_done(part, status)
                    return True
        return False

    def _mpi_failed(self, exc: MPI.Exception) -> Exception:
        """The error for a request MPI failed (mpi4py does not say which one): in practice a message
        larger than its posted receive, i.e. two ranks disagreeing on a shape or dtype."""
        from runtime.envelope import EnvelopeError

        return EnvelopeError(f"MPI failed a request ({exc.Get_error_string()}): most likely a message larger than "
                             f"its posted receive (sender and receiver disagree on a channel's shape or dtype); "
                             f"open operations: {self.pending()[:16]}")

    def _renew_alarm(self) -> None:
        with self._lock:
            self._reqs.insert(0, _new_alarm())
            self._owners.insert(0, (_ALARM, 0))
            self._alarm_fired = False

    def _watch(self) -> None:
        """Watchdog thread: complete the alarm once the current wait's deadline has passed."""
        while True:
            time.sleep(_WATCHDOG_PERIOD_S)
            deadline = self._deadline
            if deadline is None or time.monotonic() < deadline:
                continue
            with self._lock:
                if not self._alarm_fired and self._deadline is not None:
                    self._alarm_fired = True
                    self._reqs[0].Complete()

    def pending(self) -> list[dict]:
        """Every open operation of every source registered with this engine."""
        return [p for src in self._sources for p in src.open_operations()] + [op.describe() for op in list(self._open)]

    def cancel_all(self) -> None:
        """Cancel and complete every open request (shutdown); the alarm is completed, not cancelled."""
        with self._lock:
            reqs, self._reqs, self._owners = self._reqs, [self._reqs[0]], [self._owners[0]]
            for req in reqs[1:]:
                try:
                    req.Cancel()
                except MPI.Exception:
                    pass  # already complete (e.g. inactive after the MPI error that ended the run)
            if len(reqs) > 1:
                MPI.Request.Waitall(reqs[1:])

    def close(self) -> None:
        """Release the alarm (after :meth:`cancel_all`); the engine must not be used afterwards."""
        self._deadline = None
        with self._lock:
            if not self._alarm_fired:
                self._alarm_fired = True
                self._reqs[0].Complete()
            self._reqs[0].Wait()
