"""Run a module on K local MPI ranks: ``python -m launch.local -n 4 launch.ring --steps 3``.

Wraps ``mpiexec`` for one machine. The MPI comes from, in order: ``--mpiexec``, the
``HETEROPIPE_MPIEXEC`` variable, the ``mpiexec`` next to this Python (the ``mpich`` wheel installs
one there), then ``PATH``. More ranks than cores is allowed (small machines): MPICH's Hydra
permits it as is, Open MPI gets ``--oversubscribe``. Every rank runs under ``python -m mpi4py`` so
that an uncaught exception on any rank aborts all of them instead of leaving peers waiting. A
``--timeout`` kills the whole process group and fails, so a hung job never hangs its caller.

Modules that send heartbeats (``launch.train``; ``--supervise`` for others) run under a
:class:`~launch.supervisor.Supervisor` in this process: it names a rank that fails, dies, freezes
or stops making progress within seconds, with its role and what the others were waiting for, and
ends the job (exit 3). Under supervision MPICH's automatic clean-up is turned off, so that when one
rank dies the others stay up long enough to report; the supervisor ends them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from launch import collector
from launch.supervisor import (LaunchTimeout, Supervisor, SupervisorConfig, add_deadline_arguments, config_from_args,
                               supervise)

__all__ = ["find_mpiexec", "mpi_flavor", "mpiexec_argv", "run_local", "LaunchTimeout", "main", "SUPERVISED_MODULES"]

SUPERVISED_MODULES = ("launch.train",)
"""Entry modules whose ranks send heartbeats: supervised by default."""


def find_mpiexec(explicit: str | None = None) -> str:
    """Path of the mpiexec to use (see module doc for the order)."""
    for cand in (explicit, os.environ.get("HETEROPIPE_MPIEXEC")):
        if cand:
            path = shutil.which(cand)
            if path is None:
                raise FileNotFoundError(f"mpiexec {cand!r} not found or not executable")
            return path
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.exists():
        return str(beside)
    path = shutil.which("mpiexec") or shutil.which("mpirun")
    if path is None:
        raise FileNotFoundError("no mpiexec found: run `make setup` (installs the mpich wheel) or set "
                                "HETEROPIPE_MPIEXEC to your MPI's mpiexec")
    return path


def mpi_flavor(mpiexec: str) -> str:
    """'openmpi', 'mpich' (Hydra, also Intel MPI) or 'unknown', from ``mpiexec --version``."""
    try:
        out = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if "Open MPI" in out or "OpenRTE" in out:
        return "openmpi"
    if "HYDRA" in out or "Intel" in out or "MPICH" in out:
        return "mpich"
    return "unknown"


def mpiexec_argv(n: int, module: str, args: list[str] | None = None, *, mpiexec: str | None = None,
                 python: str = sys.executable, supervised: bool = False) -> list[str]:
    """The command line that runs ``python -m module args`` on ``n`` local ranks (``supervised``:
    MPICH keeps the other ranks running when one dies, for the supervisor to question)."""
    if n < 1:
        raise ValueError(f"n={n}: need at least one rank")
    exe = find_mpiexec(mpiexec)
    flavor = mpi_flavor(exe)
    extra = ["--oversubscribe"] if flavor == "openmpi" else []
    if supervised and flavor == "mpich":
        extra.append("-disable-auto-cleanup")
    return [exe, "-n", str(n), *extra, python, "-m", "mpi4py", "-m", module, *(args or [])]


def run_local(n: int, module: str, args: list[str] | None = None, *, timeout: float | None = None,
              env: dict | None = None, capture: bool = False, mpiexec: str | None = None,
              cwd: str | None = None, supervise: SupervisorConfig | None = None) -> subprocess.CompletedProcess:
    """Run the job and wait; raises :class:`LaunchTimeout` after killing it if it outlives ``timeout``.

    With ``capture`` stdout and stderr are merged into ``result.stdout`` (text). With ``supervise``
    the job runs under a :class:`~launch.supervisor.Supervisor` with those deadlines (the module
    must send heartbeats); its report is printed to stderr (and added to the captured output) and
    a job it ended returns :data:`~launch.supervisor.EXIT_CODE`.
    """
    if supervise is not None:
        return _run_supervised(n, module, args, timeout=timeout, env=env, capture=capture, mpiexec=mpiexec,
                               cwd=cwd, config=supervise)
    argv = mpiexec_argv(n, module, args, mpiexec=mpiexec)
    full_env = _project_env(env)
    out = subprocess.PIPE if capture else None
    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT if capture else None, text=True,
                            env=full_env, cwd=cwd, start_new_session=True)
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, _ = proc.communicate()
        raise LaunchTimeout(f"{' '.join(argv)} ran past {timeout} s and was killed", stdout or "") from None
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, None)


def _project_env(env: dict | None) -> dict:
    full_env = {**os.environ, **(env or {})}
    # Ranks must find the project's packages wherever the caller runs from.
    root = str(Path(__file__).resolve().parent.parent)
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, full_env.get("PYTHONPATH")]))
    return full_env


def _run_supervised(n: int, module: str, args: list[str] | None, *, timeout: float | None, env: dict | None,
                    capture: bool, mpiexec: str | None, cwd: str | None,
                    config: SupervisorConfig) -> subprocess.CompletedProcess:
    sup = Supervisor(n, config)
    try:
        return supervise(mpiexec_argv(n, module, args, mpiexec=mpiexec, supervised=True), sup, env=_project_env(env),
                         timeout=timeout, capture=capture, cwd=cwd)
    finally:
        sup.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m launch.local",
        description="Run a heteropipe entry module on N local MPI ranks (mpiexec wrapper).",
        epilog="Example: python -m launch.local -n 4 launch.train --steps 20. Everything after the "
               "module name is passed to it; use `python -m launch.train --help` for its flags.")
    parser.add_argument("-n", "--ranks", type=int, default=4, help="number of MPI ranks (default 4)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="kill the whole job and exit 124 after this many seconds (default: none)")
    parser.add_argument("--mpiexec", default=None,
                        help="mpiexec to use (default: $HETEROPIPE_MPIEXEC, the one beside this Python, PATH)")
    parser.add_argument("--dry-run", action="store_true", help="print the mpiexec command line and exit")
    parser.add_argument("--no-progress", action="store_true",
                        help="do not start the telemetry collector that prints the live progress line (then rank 0 "
                             "of launch.train prints its own step lines)")
    parser.add_argument("--supervise", action=argparse.BooleanOptionalAction, default=None,
                        help=f"run under the supervisor (default: on for {', '.join(SUPERVISED_MODULES)}, whose "
                             f"ranks send heartbeats)")
    add_deadline_arguments(parser)
    parser.add_argument("module", help="Python module every rank runs, e.g. launch.train or launch.ring")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the module")
    ns = parser.parse_args(argv)
    supervise = ns.module in SUPERVISED_MODULES if ns.supervise is None else ns.supervise
    if ns.dry_run:
        print(" ".join(mpiexec_argv(ns.ranks, ns.module, ns.args, mpiexec=ns.mpiexec, supervised=supervise)))
        return 0
    config = None
    if supervise:
        try:
            config = config_from_args(ns)
        except ValueError as exc:
            parser.error(str(exc))
    try:
        with collector.running(enabled=not ns.no_progress) as telemetry_env:
            return run_local(ns.ranks, ns.module, ns.args, timeout=ns.timeout, mpiexec=ns.mpiexec,
                             supervise=config, env=telemetry_env).returncode
    except LaunchTimeout as exc:
        print(f"launch.local: {exc}", file=sys.stderr)
        return 124


if __name__ == "__main__":
    sys.exit(main())
