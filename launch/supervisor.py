"""The job's supervisor: names a dead, frozen or stuck rank within seconds, then ends the job.

``launch.local`` runs one next to ``mpiexec`` (``--no-supervise`` turns it off); ``launch.cluster``
runs ``python -m launch.supervisor -n N --port P --advertise HEAD -- mpirun ...`` on the launching
(head) node (:func:`supervise` in both). It binds a ZeroMQ PULL socket — lossless control,
separate from any droppable telemetry — whose address the ranks get in ``$HETEROPIPE_SUPERVISOR``
(``tcp://127.0.0.1:PORT`` locally; ``tcp://HEAD:PORT`` on a cluster, bound on every interface and
passed to every node by the launcher: ``-x``, ``-genv``, ``srun --export=ALL``); each rank's :class:`~runtime.heartbeat.Heartbeat` sends a
hello, then its status every ``heartbeat_s`` (step, action, progress counter, the receive it is
blocked on, pending operations, flight-recorder tail), and a ``failed`` or ``bye`` message last.

Verdicts, checked every poll (a tenth of a heartbeat):

* **failed** — a rank reported an exception (the rank also aborts the job itself);
* **died** — a rank's process is gone (ranks on the supervisor's host: a pidfd per rank wakes the
  supervisor the moment the process exits, so a SIGKILL is named at once; a rank on another node
  that dies goes silent or takes the job down with its launcher's own message; ``mpiexec`` runs with auto-cleanup off,
  but MPI still takes down a peer that touches the dead rank's channels within milliseconds, so
  the rank that died *first* is the culprit, and the others' last heartbeats say what they were
  waiting for);
* **silent** — no heartbeat for ``liveness_s`` (a frozen process: SIGSTOP, a stuck interpreter,
  a lost node); the thread beats independently of the training loop, so a long computation is
  not silence;
* **stuck** — a rank's progress counter (one tick per schedule action) has not moved for
  ``progress_s`` (``startup_s`` until its first step is done: start-up, compilation). The culprit
  is found by following "waits for" edges (the ranks each has receives open from) from the
  stalled ranks to a rank that waits for nobody, or to a cycle (a deadlock, reported as such).

A rank whose per-step compute time exceeds ``straggler_ratio`` times its own usual time (the median
of its first steps) is reported as a straggler — how much slower, since which step — but not
stopped, until a deadline fires; comparing a rank with itself keeps the pipeline's uneven stages
(embedding, head) from reading as stragglers. On a
verdict the supervisor prints the report (the culprit with its role, last step, last action, error
if any, and what every other rank was waiting for) to stderr, writes it with every rank's last
status to ``supervisor.json`` in the run's log folder, and kills the job: the launcher exits
:data:`EXIT_CODE`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import msgpack
import zmq

__all__ = ["SupervisorConfig", "Supervisor", "EXIT_CODE", "ENV_ADDRESS", "ENV_HEARTBEAT", "LaunchTimeout",
           "KILL_GRACE_S", "supervise", "command", "add_deadline_arguments", "config_from_args", "main"]

EXIT_CODE = 3
"""Exit code of a job the supervisor ended."""
ENV_ADDRESS = "HETEROPIPE_SUPERVISOR"
"""Environment variable carrying the supervisor's address to the ranks."""
ENV_HEARTBEAT = "HETEROPIPE_HEARTBEAT_S"
"""Environment variable carrying the heartbeat interval to the ranks."""
KILL_GRACE_S = 5.0
"""Default seconds between SIGTERM and SIGKILL of a cluster launcher (``mpirun``/``srun`` then end
their remote ranks in order); local jobs are SIGKILLed at once."""
_FAILED_GRACE_S = 3.0
"""After a rank reports an exception it aborts the job itself; this long is left for its own report."""
_EXIT_GRACE_S = 0.3
"""A process that exited is judged dead only if its ``bye`` has not arrived this long after: a
clean exit's last message can land on the socket just after its pidfd fires."""


@dataclass(kw_only=True, slots=True)
class SupervisorConfig:
    """Deadlines of the supervisor (seconds)."""

    heartbeat_s: float = 1.0
    """Interval between a rank's heartbeats."""
    liveness_s: float = 10.0
    """A rank with no heartbeat for this long is named silent (frozen or lost)."""
    progress_s: float = 20.0
    """A rank whose progress counter has not moved for this long is stuck (after its first step)."""
    startup_s: float = 120.0
    """Grace for start-up (first heartbeat) and for the first step (imports, model build, compilation)."""
    straggler_ratio: float = 2.0
    """A rank whose step compute time exceeds this multiple of its usual time is reported as a straggler."""

    def __post_init__(self) -> None:
        for name in ("heartbeat_s", "liveness_s", "progress_s", "startup_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SupervisorConfig.{name}={getattr(self, name)!r}: must be > 0 seconds")
        if self.liveness_s < 2 * self.heartbeat_s:
            raise ValueError(f"SupervisorConfig.liveness_s={self.liveness_s}: must be at least two heartbeats "
                             f"(2 x heartbeat_s = {2 * self.heartbeat_s}), or one late beat kills the job")
        if not self.straggler_ratio > 1:
            raise ValueError(f"SupervisorConfig.straggler_ratio={self.straggler_ratio!r}: must be > 1")


def _proc_state(pid: int) -> str | None:
    """State letter of local process ``pid`` (R, S, T for stopped, Z for zombie...), None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


class _Rank:
    __slots__ = ("rank", "hello", "last", "t_seen", "t_progress", "count", "final", "straggling", "t_dead", "pidfd",
                 "compute_s")

    def __init__(self, rank: int):
        self.rank = rank
        self.hello: dict | None = None
        self.last: dict = {}
        self.t_seen = 0.0
        self.t_progress = 0.0
        self.count = -1
        self.final: dict | None = None
        self.straggling: dict | None = None
        self.t_dead: float | None = None
        self.pidfd: int | None = None
        self.compute_s: dict[int, float] = {}  # step -> compute seconds, as heartbeats report them

    def role(self) -> str:
        if self.hello is None:
            return "never reported"
        r = self.hello["role"]
        what = r.get("role", "actor")
        if "stages" in r:
            what = (f"pipeline stage{'s' if len(r['stages']) > 1 else ''} {'+'.join(map(str, r['stages']))} "
                    f"of {r.get('num_stages')} ({r.get('schedule')})")
        if r.get("expert_group") is not None:
            what += f", expert group {r['expert_group']}"
        return f"{what}, pid {self.hello['pid']} on {self.hello['host']}"

    def where(self) -> str:
        s = self.last
        if not s:
            return "no status yet"
        text = f"step {s.get('step')}, action {s.get('action')}"
        recvs = [p for p in s.get("pending") or () if p.get("op") == "recv"]
        if recvs:
            oldest = max(recvs, key=lambda p: p.get("age_s") or 0)
            what = " ".join(f"{k} {oldest[k]}" for k in ("kind", "mb", "chunk") if oldest.get(k) is not None)
            text += (f", waiting for rank{'s' if len(s['waits_for']) > 1 else ''} "
                     f"{','.join(map(str, s['waits_for']))} (oldest: {what} from rank {oldest['peer']} channel "
                     f"{oldest['channel']}, open {oldest.get('age_s', 0):.1f} s)")
        else:
            text += ", waiting for no rank"
        if s.get("num_pending"):
            text += f"; {s['num_pending']} operations open"
        return text


class Supervisor:
    """Receives heartbeats from ``num_ranks`` ranks and judges them (see the module doc)."""

    def __init__(self, num_ranks: int, config: SupervisorConfig | None = None, *, bind: str = "127.0.0.1",
                 port: int = 0, advertise: str | None = None):
        """Listen on ``bind`` (an interface address, ``*`` for all) at ``port`` (0: any free one); the
        ranks are told ``tcp://ADVERTISE:PORT`` (default: the bound address), the name other nodes
        reach this one by. Raises zmq.ZMQError when the port is taken."""
        self.config = config or SupervisorConfig()
        self.num_ranks = num_ranks
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.LINGER, 0)
        try:
            if port:
                self._sock.bind(f"tcp://{bind}:{port}")
            else:
                port = self._sock.bind_to_random_port(f"tcp://{bind}")
        except zmq.ZMQError:
            self._sock.close()
            self._ctx.term()
            raise
        self.address = f"tcp://{advertise or bind}:{port}"
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._pidfds: dict[int, _Rank] = {}
        self._ranks = [_Rank(r) for r in range(num_ranks)]
        self._t0 = time.monotonic()
        self._local = socket.gethostname()
        self._noted: set[tuple] = set()
        self.notes: list[str] = []

    def env(self) -> dict[str, str]:
        """What the ranks need to find the supervisor."""
        return {ENV_ADDRESS: self.address, ENV_HEARTBEAT: str(self.config.heartbeat_s)}

    # ------------------------------------------------------------------ receiving
    def receive(self, timeout_s: float) -> None:
        """Take every message that arrives within ``timeout_s`` (returns early once drained)."""
        events = dict(self._poller.poll(int(timeout_s * 1000)))
        now = time.monotonic()
        for fd, st in list(self._pidfds.items()):
            if fd in events:  # the process exited: readable pidfd
                st.t_dead = now
                self._poller.unregister(fd)
                os.close(fd)
                del self._pidfds[fd]
        if self._sock not in events:
            return
        while True:
            try:
                raw = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = msgpack.unpackb(raw, strict_map_key=False)
            except (ValueError, msgpack.UnpackException):
                continue  # on a cluster the port is open to the network: not every frame is a heartbeat
            self._take(msg)

    def _take(self, msg: dict) -> None:
        if not isinstance(msg, dict):
            return
        rank = msg.get("rank")
        if not isinstance(rank, int) or not 0 <= rank < self.num_ranks:
            return
        st, now = self._ranks[rank], time.monotonic()
        st.t_seen = now
        kind = msg.get("type")
        if kind == "hello":
            st.hello, st.t_progress = msg, now
            if msg.get("host") == self._local and hasattr(os, "pidfd_open"):
                try:
                    st.pidfd = os.pidfd_open(msg["pid"])
                except OSError:  # already gone: the /proc check below names it
                    pass
                else:
                    self._pidfds[st.pidfd] = st
                    self._poller.register(st.pidfd, zmq.POLLIN)
        elif kind in ("failed", "bye"):
            st.final = msg
            if kind == "failed":
                st.last = msg
        elif kind == "beat":
            st.last = msg
            if msg.get("count") != st.count:
                st.count, st.t_progress = msg.get("count"), now
            if msg.get("last_compute_s") is not None and msg.get("step") is not None:
                st.compute_s.setdefault(msg["step"] - (msg.get("action") != "step done"), msg["last_compute_s"])

    # ------------------------------------------------------------------ judging
    def check(self) -> dict | None:
        """A verdict if a deadline fired or a rank failed or died, else None (may add notes)."""
        now, c = time.monotonic(), self.config
        for st in self._ranks:
            if st.final is not None and st.final["type"] == "failed":
                return self._verdict("failed", st, f"raised {st.final.get('error')}")
        for st in self._ranks:
            if st.hello is not None and st.final is None and st.t_dead is None and st.pidfd is None \
                    and st.hello["host"] == self._local and _proc_state(st.hello["pid"]) in (None, "Z", "X"):
                st.t_dead = now
        dead = [st for st in self._ranks if st.t_dead is not None and st.final is None]
        if any(now - st.t_dead < _EXIT_GRACE_S for st in dead):
            dead = []  # judge once every recent exit had time to say bye
        if dead:
            first = min(dead, key=lambda st: st.t_dead)
            after = [f"rank {st.rank} {(st.t_dead - first.t_dead) * 1e3:.0f} ms later" for st in dead if st is not first]
            return self._verdict("died", first, "its process is gone (killed, crashed or out of memory)"
                                 + (f"; it died first ({', '.join(after)}, taken down by MPI)" if after else ""))
        for st in self._ranks:
            if st.hello is None:
                if now - self._t0 > c.startup_s:
                    return self._verdict("silent", st, f"never reported within the {c.startup_s:g} s start-up grace "
                                                       f"(a rank on another node: can it reach {self.address}?)")
                continue
            if st.final is None and now - st.t_seen > c.liveness_s:
                state = _proc_state(st.hello["pid"]) if st.hello["host"] == self._local else None
                why = " (process stopped: SIGSTOP or a debugger)" if state == "T" else ""
                return self._verdict("silent", st, f"sent no heartbeat for {now - st.t_seen:.1f} s "
                                                   f"(liveness deadline {c.liveness_s:g} s){why}")
        stalled = []
        for st in self._ranks:
            if st.hello is None or st.final is not None:
                continue
            first_step_done = (st.last.get("step") or 0) > 0 or st.last.get("last_step_s") is not None
            deadline = c.progress_s if first_step_done else max(c.progress_s, c.startup_s)
            idle = now - st.t_progress
            if idle > deadline:
                stalled.append(st)
            elif idle > deadline / 2:
                self._note(f"rank {st.rank} has made no progress for {idle:.0f} s (deadline {deadline:g} s): "
                           f"{st.where()}", key=("idle", st.rank, st.count))
        if stalled:
            return self._stuck(stalled, now)
        self._stragglers()
        return None

    def _stuck(self, stalled: list[_Rank], now: float) -> dict:
        """Follow 'waits for' edges from the stalled ranks to the culprit: a rank that waits for
        nobody (stuck in its own work, or alive but no longer sending); else a cycle (deadlock)."""
        waited_on: dict[int, set[int]] = {}
        sinks: list[_Rank] = []
        for start in stalled:
            todo, seen = [start.rank], set()
            while todo:
                r = todo.pop()
                if r in seen:
                    continue
                seen.add(r)
                peers = self._ranks[r].last.get("waits_for")
                if peers == [] and self._ranks[r] not in sinks:
                    sinks.append(self._ranks[r])
                for p in peers or ():
                    if 0 <= p < self.num_ranks:
                        waited_on.setdefault(p, set()).add(r)
                        todo.append(p)
        if sinks:
            st = max(sinks, key=lambda x: (len(waited_on.get(x.rank, ())), now - x.t_progress))
            waiters = [r.rank for r in self._ranks if st.rank in (r.last.get("waits_for") or ())]
            return self._verdict("stuck", st, f"made no progress for {now - st.t_progress:.1f} s (deadline "
                                              f"{self.config.progress_s:g} s) while waiting for no other rank; "
                                              + (f"rank{'s' if len(waiters) > 1 else ''} {','.join(map(str, waiters))} "
                                                 f"wait{'' if len(waiters) > 1 else 's'} on it" if waiters else
                                                 "no rank waits on it"))
        st = min(stalled, key=lambda x: x.t_progress)
        ring = sorted(r.rank for r in stalled)
        return self._verdict("stuck", st, f"deadlock: ranks {ring} all wait for each other (no progress for "
                                          f"{now - st.t_progress:.1f} s); rank {st.rank} stalled first")

    def _stragglers(self) -> None:
        for st in self._ranks:
            steps = sorted(st.compute_s)
            if len(steps) < 4:
                continue
            # its usual pace: the median of its first steps after the first (which compiles, warms up)
            usual = statistics.median(st.compute_s[k] for k in steps[1:6])
            step = steps[-1]
            ratio = st.compute_s[step] / usual if usual > 0 else 1.0
            if ratio > self.config.straggler_ratio and st.straggling is None:
                st.straggling = {"since_step": step, "ratio": ratio}
                self._note(f"rank {st.rank} ({st.role()}) is a straggler: step {step} took {st.compute_s[step]:.3f} s "
                           f"of compute, {ratio:.1f}x its usual {usual:.3f} s, since step {step}",
                           key=("straggler", st.rank, step))
            elif ratio <= self.config.straggler_ratio and st.straggling is not None:
                self._note(f"rank {st.rank} is back to its usual pace at step {step} (a straggler since step "
                           f"{st.straggling['since_step']})", key=("straggler-end", st.rank, step))
                st.straggling = None

    def _note(self, text: str, key: tuple) -> None:
        if key not in self._noted:
            self._noted.add(key)
            self.notes.append(f"supervisor: {text}")

    def _verdict(self, kind: str, st: _Rank, why: str) -> dict:
        final = st.final if st.final is not None and st.final["type"] == "failed" else None
        lines = [f"supervisor: rank {st.rank} ({st.role()}) {kind}: {why}",
                 f"  rank {st.rank} last status: {st.where()}"
                 + (f"; last heartbeat {time.monotonic() - st.t_seen:.1f} s ago" if st.hello else "")]
        if final is not None and final.get("traceback"):
            lines.append("  " + final["traceback"].rstrip().splitlines()[-1])
        lines.append("  the other ranks:")
        for other in self._ranks:
            if other is not st:
                lines.append(f"    rank {other.rank} ({other.role()}): {other.where()}")
        tail = (st.last or {}).get("flight") or []
        if tail:
            lines.append(f"  rank {st.rank}'s last {min(len(tail), 8)} recorded operations (newest last):")
            lines += [f"    {e}" for e in tail[-8:]]
        return {"verdict": kind, "rank": st.rank, "role": st.role(), "why": why,
                "step": (st.last or {}).get("step"), "action": (st.last or {}).get("action"),
                "error": final.get("error") if final else None, "text": "\n".join(lines),
                "t_wall": time.time(), "since_start_s": round(time.monotonic() - self._t0, 3),
                "ranks": [{"rank": o.rank, "role": o.role(), "hello": o.hello, "last": o.last,
                           "final": o.final} for o in self._ranks]}

    def write_report(self, verdict: dict) -> str:
        """Write ``verdict`` to ``supervisor.json`` in the run's log folder (from the first hello that
        names one); returns the line to print: ``full report: <path>``, or why there is no file."""
        hello = next((st.hello for st in self._ranks if st.hello and st.hello.get("log_dir")), None)
        if hello is None:
            return "no report file: no rank named a log folder in its hello"
        path = Path(hello["log_dir"]) / "supervisor.json"
        try:
            path.write_text(json.dumps(verdict, default=str, indent=1))
        except OSError as exc:
            return f"no report file: cannot write {path}: {exc}"
        return f"full report: {path}"

    def close(self) -> None:
        for fd in self._pidfds:
            os.close(fd)
        self._pidfds.clear()
        self._sock.close()
        self._ctx.term()


class LaunchTimeout(RuntimeError):
    """The job ran past its timeout and was killed; ``output`` holds what it printed."""

    def __init__(self, message: str, output: str):
        super().__init__(message)
        self.output = output


def _end(proc: subprocess.Popen, grace_s: float) -> int:
    """End the launcher's process group: SIGTERM first when ``grace_s`` > 0 (srun and mpirun then
    take their remote ranks down in order), SIGKILL after ``grace_s`` or at once."""
    if proc.poll() is None and grace_s > 0:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            return proc.wait(grace_s)
        except subprocess.TimeoutExpired:  # it ignored SIGTERM for the whole grace: SIGKILL below
            pass
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait()


def supervise(argv: list[str], sup: Supervisor, *, env: dict | None = None, timeout: float | None = None,
              capture: bool = False, cwd: str | None = None, kill_grace_s: float = 0.0) -> subprocess.CompletedProcess:
    """Run the launcher command ``argv`` (mpiexec, mpirun, srun) under ``sup`` and wait.

    The ranks get ``sup.env()`` on top of ``env`` (a launcher that does not pass its environment to
    other nodes must name these variables itself: ``-x``, ``-genv``). With ``capture`` stdout and
    stderr are merged into ``result.stdout``. Notes and the report go to stderr (and into the captured
    output); a job the supervisor ended returns :data:`EXIT_CODE`. ``kill_grace_s``: see :func:`_end`.
    Raises :class:`LaunchTimeout` after killing a job that outlives ``timeout``.
    """
    config = sup.config
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE if capture else None,
                            stderr=subprocess.STDOUT if capture else None, text=True,
                            env={**(os.environ if env is None else env), **sup.env()}, cwd=cwd,
                            start_new_session=True)
    chunks: list[str] = []
    reader = None
    if capture:  # drain the pipe while supervising, or a chatty job blocks on a full pipe
        reader = threading.Thread(target=lambda: chunks.extend(iter(proc.stdout.readline, "")), daemon=True)
        reader.start()

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)
        if capture:
            chunks.append(text + "\n")

    t_end = None if timeout is None else time.monotonic() + timeout
    printed = 0
    try:
        while True:
            sup.receive(config.heartbeat_s / 10)
            rc = proc.poll()
            verdict = sup.check()
            for note in sup.notes[printed:]:
                say(note)
            printed = len(sup.notes)
            if verdict is not None:
                if verdict["verdict"] == "failed":  # it aborts the job itself, with its own report
                    try:
                        proc.wait(_FAILED_GRACE_S)
                    except subprocess.TimeoutExpired:  # its own abort did not end it: _end below does
                        pass
                say(f"{verdict['text']}\n  {sup.write_report(verdict)}")
                rc = _end(proc, kill_grace_s)
                say(f"supervisor: verdict at unix time {verdict['t_wall']:.3f}, {verdict['since_start_s']:.1f} s "
                    f"after launch; job ended")
                rc = EXIT_CODE if rc <= 0 else rc
                break
            if rc is not None:
                verdict = None
                if rc:  # the job ended itself: take the last messages and exits, then say who started it
                    sup.receive(0.2)
                    time.sleep(0.5)
                    sup.receive(0)
                    verdict = sup.check()
                if verdict is not None and verdict["verdict"] in ("failed", "died"):
                    say(f"{verdict['text']}\n  {sup.write_report(verdict)}")
                break
            if t_end is not None and time.monotonic() > t_end:
                _end(proc, kill_grace_s)
                if reader is not None:
                    reader.join(5)
                raise LaunchTimeout(f"{' '.join(argv)} ran past {timeout} s and was killed", "".join(chunks))
    except BaseException:
        _end(proc, kill_grace_s)
        raise
    if reader is not None:
        reader.join(5)
    return subprocess.CompletedProcess(argv, rc, "".join(chunks) if capture else None, None)


def add_deadline_arguments(parser: argparse.ArgumentParser) -> None:
    """The deadline flags of every launcher (read back by :func:`config_from_args`)."""
    d = SupervisorConfig()
    parser.add_argument("--heartbeat-s", type=float, default=d.heartbeat_s,
                        help=f"seconds between a rank's heartbeats (default {d.heartbeat_s:g})")
    parser.add_argument("--liveness-s", type=float, default=d.liveness_s,
                        help=f"a rank with no heartbeat for this long is named (default {d.liveness_s:g})")
    parser.add_argument("--progress-s", type=float, default=d.progress_s,
                        help=f"a rank whose schedule has not advanced for this long is named (default {d.progress_s:g})")
    parser.add_argument("--startup-s", type=float, default=d.startup_s,
                        help=f"grace for start-up and the first step (default {d.startup_s:g})")


def config_from_args(ns: argparse.Namespace) -> SupervisorConfig:
    """The deadlines :func:`add_deadline_arguments` read; ValueError naming the field and the fix."""
    return SupervisorConfig(heartbeat_s=ns.heartbeat_s, liveness_s=ns.liveness_s, progress_s=ns.progress_s,
                            startup_s=ns.startup_s)


def command(num_ranks: int, config: SupervisorConfig, *, port: int, advertise: str, python: str = "python3",
            kill_grace_s: float = KILL_GRACE_S) -> list[str]:
    """``python -m launch.supervisor ... --``: a launcher command appended to it runs supervised."""
    return [python, "-m", "launch.supervisor", "-n", str(num_ranks), "--port", str(port), "--advertise", advertise,
            "--heartbeat-s", f"{config.heartbeat_s:g}", "--liveness-s", f"{config.liveness_s:g}",
            "--progress-s", f"{config.progress_s:g}", "--startup-s", f"{config.startup_s:g}",
            "--kill-grace-s", f"{kill_grace_s:g}", "--"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m launch.supervisor",
        description="Run a launcher command (mpirun, mpiexec, srun) under the supervisor: it listens for the ranks' "
                    "heartbeats on every interface of this node, names a rank that fails, dies, freezes or stops "
                    "making progress, and ends the job (exit 3). The ranks are told tcp://ADVERTISE:PORT in "
                    f"${ENV_ADDRESS}: the launcher must pass it to every node (launch.cluster does).",
        epilog="example: python -m launch.supervisor -n 16 --port 29600 --advertise gpu-a -- mpirun -n 16 "
               f"-x {ENV_ADDRESS}=tcp://gpu-a:29600 -x {ENV_HEARTBEAT}=1 ... python3 -m mpi4py -m launch.train")
    p.add_argument("-n", "--ranks", type=int, required=True, help="number of ranks the job starts")
    p.add_argument("--port", type=int, required=True, help="TCP port to listen on (open to the other nodes)")
    p.add_argument("--advertise", default=socket.gethostname(),
                   help="name or IP address the other nodes reach this one by (default: this host's name)")
    p.add_argument("--bind", default="*", help="interface address to listen on (default *: all)")
    p.add_argument("--kill-grace-s", type=float, default=KILL_GRACE_S,
                   help=f"on a verdict, SIGTERM the launcher and SIGKILL it this many seconds later (default "
                        f"{KILL_GRACE_S:g})")
    add_deadline_arguments(p)
    p.add_argument("command", nargs=argparse.REMAINDER, help="the launcher command, after --")
    ns = p.parse_args(argv)
    cmd = ns.command[1:] if ns.command[:1] == ["--"] else ns.command
    if not cmd:
        p.error("no launcher command: put it after --")
    if ns.ranks < 1:
        p.error(f"--ranks {ns.ranks}: must be at least 1")
    if not 0 < ns.port < 65536:
        p.error(f"--port {ns.port}: must be a TCP port (1-65535)")
    if ns.kill_grace_s < 0:
        p.error(f"--kill-grace-s {ns.kill_grace_s}: must be >= 0")
    try:
        config = config_from_args(ns)
    except ValueError as exc:
        p.error(str(exc))
    try:
        sup = Supervisor(ns.ranks, config, bind=ns.bind, port=ns.port, advertise=ns.advertise)
    except zmq.ZMQError as exc:
        print(f"launch.supervisor: cannot listen on tcp://{ns.bind}:{ns.port}: {exc}; pass another --port",
              file=sys.stderr)
        return 2
    # a batch system or user ending the supervisor ends the job with it (the job runs in its own session)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    print(f"supervisor: {ns.ranks} ranks report to {sup.address}", file=sys.stderr, flush=True)
    try:
        return supervise(cmd, sup, kill_grace_s=ns.kill_grace_s).returncode
    except FileNotFoundError as exc:
        print(f"launch.supervisor: cannot run {cmd[0]!r}: {exc.strerror}", file=sys.stderr)
        return 2
    finally:
        sup.close()


if __name__ == "__main__":
    sys.exit(main())
