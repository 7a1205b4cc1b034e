"""Launch a job on a cluster: one rank per device, numbered node by node, with Open MPI, MPICH/Hydra
or SLURM; ``--dry-run`` prints the exact commands and the rank table without starting anything.

    python -m launch.cluster --hostfile hosts -n 16 [--mpi openmpi|mpich|slurm] [--dry-run] -- launch.train ...
    make cluster HOSTFILE=hosts NP=16 CONFIG=run.toml

:func:`launch_plan` is pure (commands from the cluster, the rank count and the flavour); ``main``
reads argv, detects the MPI flavour and runs the command. ``launch/mpirun.sh`` and
``launch/slurm.sbatch`` are thin wrappers around it.

Placement: ranks fill each node's slots before the next node (Open MPI ``--map-by slot``, Hydra's
default with ``host:N`` lines, SLURM ``--distribution=block:block``), the numbering the rank layout
(``topology.Layout``) assumes; each rank is bound to its NUMA domain (``--bind-to numa``,
``-bind-to numa``, ``--cpu-bind=ldoms``) and takes the device of its local rank
(``runtime.device``: ``OMPI_COMM_WORLD_LOCAL_RANK``, ``MPI_LOCALRANKID``, ``SLURM_LOCALID``).
With a cluster file naming node kinds, each pipeline rank's precision follows its kind
(``topology.kinds.KIND_PRECISION``: FP8 on Hopper, BF16 on Ascend/CPU) unless the job's arguments
set ``--precision`` or ``--rank-precision``.

Supervision (:class:`Head`): as under ``launch.local``, the job runs under the supervisor (for
``launch.train``; ``--supervise`` for other modules) and next to the progress collector, both on
the launching (head) node: the launcher command is wrapped in ``python -m launch.supervisor ... --``
(listening on every interface at ``--port``) and ``python -m launch.collector tcp://*:PORT+1`` runs
beside it. The ranks on every node learn where they are from ``$HETEROPIPE_SUPERVISOR`` and
``$HETEROPIPE_TELEMETRY`` (``tcp://HEAD:PORT``, HEAD from ``--head``, default this host's name),
which the launcher passes to all of them (Open MPI ``-x``, Hydra ``-genv``, ``srun --export=ALL``).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from launch import collector, supervisor
from launch.local import SUPERVISED_MODULES
from launch.supervisor import ENV_ADDRESS, ENV_HEARTBEAT, SupervisorConfig
from runtime.schedules import Schedule, build
from topology import Cluster, Layout, cluster_from_hostfile, emulated_cluster, load_cluster
from topology.kinds import KIND_PRECISION, KINDS

__all__ = ["FLAVORS", "LOCAL_RANK_VAR", "CLUSTERS", "DEFAULT_PORT", "Head", "RankRow", "LaunchPlan", "launch_plan",
           "hostfile_text", "add_cluster_arguments", "cluster_from_args", "main"]

FLAVORS = ("openmpi", "mpich", "slurm")
LOCAL_RANK_VAR = {"openmpi": "OMPI_COMM_WORLD_LOCAL_RANK", "mpich": "MPI_LOCALRANKID", "slurm": "SLURM_LOCALID"}
"""The variable each launcher sets to a rank's index on its node (runtime.device reads them all)."""

_ROOT = Path(__file__).resolve().parent.parent

CLUSTERS = Path(__file__).resolve().parent / "clusters"
"""Shipped cluster files; ``--cluster NAME`` looks here when NAME is not a path."""

DEFAULT_PORT = 29600
"""The supervisor's TCP port on the head node (the collector takes the next one); fixed rather than
random so that ``--dry-run`` prints the exact command and a firewall can let the nodes through."""


def _read_hostfile(path: Path, kind: str) -> Cluster:
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"--hostfile {str(path)!r}: cannot read ({e.strerror}); check the path") from None
    return cluster_from_hostfile(text, kind=kind)


def add_cluster_arguments(p: argparse.ArgumentParser) -> None:
    """The cluster flags of ``launch.topology`` and ``launch.plan`` (read back by :func:`cluster_from_args`)."""
    src = p.add_argument_group("cluster (one of)")
    src.add_argument("--cluster", help="cluster TOML file (nodes, link classes, device speeds), or the name of one "
                                       "in launch/clusters/ (v3-2048.toml, v3-2048-h800-910c.toml)")
    src.add_argument("--hostfile", type=Path, help="MPI hostfile: 'host slots=N' (Open MPI) or 'host:N' (Hydra)")
    src.add_argument("--nodes", type=int, help="emulate N identical nodes (with --devices-per-node)")
    src.add_argument("--devices-per-node", type=int, help="devices on each emulated node")
    src.add_argument("--kind", default="h800",
                     help=f"device kind for --hostfile / --nodes ({', '.join(KINDS)}; default h800)")


def cluster_from_args(ns: argparse.Namespace) -> Cluster:
    """The cluster the flags of :func:`add_cluster_arguments` describe; ValueError naming the flag."""
    given = [ns.cluster is not None, ns.hostfile is not None, ns.nodes is not None or ns.devices_per_node is not None]
    if sum(given) != 1:
        raise ValueError("cluster: give exactly one of --cluster FILE, --hostfile FILE, --nodes N --devices-per-node G")
    if ns.cluster is not None:
        path = Path(ns.cluster)
        if not path.exists() and (CLUSTERS / path.name).exists():
            path = CLUSTERS / path.name
        return load_cluster(path)
    if ns.hostfile is not None:
        return _read_hostfile(ns.hostfile, ns.kind)
    if ns.nodes is None or ns.devices_per_node is None:
        raise ValueError("--nodes and --devices-per-node go together")
    return emulated_cluster(ns.nodes, ns.devices_per_node, kind=ns.kind)


@dataclass(kw_only=True, slots=True)
class Head:
    """What runs on the launching (head) node beside the launcher, and where the ranks reach it."""

    host: str
    """Name or IP address the ranks on every node reach the head node by (``--head``)."""
    port: int = DEFAULT_PORT
    """The supervisor's TCP port; the progress collector listens on ``port + 1``."""
    supervise: SupervisorConfig | None = None
    """The supervisor's deadlines; None runs the job without a supervisor."""
    progress: bool = True
    """Run the progress collector (the live step line on the head node's terminal)."""
    kill_grace_s: float = supervisor.KILL_GRACE_S
    """On a verdict the supervisor SIGTERMs the launcher (which takes the remote ranks down) and
    SIGKILLs it this many seconds later."""

    def __post_init__(self) -> None:
        if not self.host or any(c.isspace() or c in ":/[]" for c in self.host):
            raise ValueError(f"head.host={self.host!r}: pass --head with the host name or IPv4 address the nodes "
                             f"reach this one by")
        if not 0 < self.port < 65535:
            raise ValueError(f"head.port={self.port}: must be 1-65534 (the collector takes port + 1); pass --port")
        if not self.kill_grace_s >= 0:
            raise ValueError(f"head.kill_grace_s={self.kill_grace_s}: must be >= 0 seconds; pass --kill-grace-s")


@dataclass(frozen=True, slots=True)
class RankRow:
    """One rank of the job."""

    rank: int
    node: str
    local: int
    device: str
    role: str
    precision: str


@dataclass(frozen=True, slots=True)
class LaunchPlan:
    """What a launch runs."""

    flavor: str
    argv: tuple[str, ...]
    """The launcher command (for slurm: the srun line inside the allocation)."""
    hostfile: str
    """Hostfile text in the flavour's syntax (Open MPI ``host slots=N``, Hydra ``host:N``, SLURM: node list)."""
    sbatch: str
    """For slurm: the batch script that holds ``argv``; empty otherwise."""
    rows: tuple[RankRow, ...]
    env: tuple[tuple[str, str], ...] = ()
    """(name, value) every rank gets, passed by the launcher (``-x``, ``-genv``, ``srun --export=ALL``)."""
    collector: tuple[str, ...] = ()
    """The progress collector's command on the head node; empty without one."""


def hostfile_text(cluster: Cluster, flavor: str) -> str:
    """The cluster's hosts in ``flavor``'s hostfile syntax."""
    if flavor == "openmpi":
        return "".join(f"{n.name} slots={n.num_devices}\n" for n in cluster.nodes)
    if flavor == "mpich":
        return "".join(f"{n.name}:{n.num_devices}\n" for n in cluster.nodes)
    return ",".join(n.name for n in cluster.nodes) + "\n"


def _device(kind: str, local: int) -> str:
    if kind == "cpu":
        return "cpu"
    return f"npu:{local}" if kind.startswith("ascend") else f"cuda:{local}"


def _train_shape(module: str, args: list[str]) -> tuple[int, int, Schedule, str | None, bool] | None:
    """(pp, ep, schedule, precision set by the arguments or None, whether expert placement can weigh
    rank speeds: redundant experts and no --rank-kind of the user's) of a launch.train job; None for
    other modules."""
    if module != "launch.train":
        return None
    from launch.train import parse_config  # imports the model: only for training jobs

    cfg = parse_config(args)
    forced = None
    if "--precision" in args or "--rank-precision" in args or cfg.rank_precision:
        forced = ",".join(cfg.rank_precision) if cfg.rank_precision else cfg.model.precision
    pipe = cfg.pipeline
    weigh = pipe.redundant_experts > 0 and cfg.rank_kind is None
    return pipe.pp, pipe.ep, build(pipe.schedule, pipe.pp, pipe.microbatches), forced, weigh


def launch_plan(cluster: Cluster, np: int, flavor: str, module: str, args: list[str], *, kinds_known: bool,
                python: str = "python3", mpirun: str | None = None, run_id: str = "run", root: Path = _ROOT,
                extra: list[str] | None = None, hostfile_path: str = "hostfile", head: Head | None = None) -> LaunchPlan:
    """The command and rank table for ``np`` ranks of ``python -m module args`` on ``cluster``.

    ``kinds_known``: the cluster came from a file naming node kinds (then precision follows kinds).
    ``head``: the supervisor and collector on the launching node (None: neither, as before).
    Raises ValueError naming the fix for too few slots, a rank count that does not match a training
    job's pp x ep, and DualPipe mirror ranks of different kinds.
    """
    if flavor not in FLAVORS:
        raise ValueError(f"mpi={flavor!r}: choose one of {', '.join(FLAVORS)}")
    if isinstance(np, bool) or not isinstance(np, int) or np < 1:
        raise ValueError(f"np={np!r}: must be a positive number of ranks")
    slots = cluster.num_devices
    if slots < np:
        per = max(n.num_devices for n in cluster.nodes)
        raise ValueError(f"hostfile: {cluster.num_nodes} host(s) with {slots} slots in all, but the job needs {np} "
                         f"(one rank per device): add {np - slots} slots (e.g. {-(-(np - slots) // per)} more "
                         f"node(s) of {per}) or lower NP")
    shape = _train_shape(module, args)
    args = list(args)
    node_of = cluster.device_node()
    first = [0] * cluster.num_nodes
    for n in range(1, cluster.num_nodes):
        first[n] = first[n - 1] + cluster.nodes[n - 1].num_devices
    roles = ["-"] * np
    precision = ["-"] * np
    if shape is not None:
        pp, ep, schedule, forced, weigh = shape
        if pp * ep != np:
            raise ValueError(f"np={np}: the training job runs pp x ep = {pp} x {ep} = {pp * ep} ranks; set NP={pp * ep} "
                             f"or change --pp/--ep")
        layout = Layout(cluster=cluster, pp=pp, ep=ep, dp=ep)
        # an EP group may mix kinds (FP8 and BF16 ranks, actors/ep_wire.py): then one precision per rank
        rank_kinds = [layout.place(r).kind for r in range(np)]
        per_rank = [KIND_PRECISION.get(k, "bf16") for k in rank_kinds]
        if kinds_known:
            from topology.plan import check_mirror_kinds

            for e in range(ep):  # DualPipe's mirror ranks (same ep index) hold the same stages
                check_mirror_kinds(schedule.name, [rank_kinds[p * ep + e] for p in range(pp)])
        if weigh and kinds_known and len(set(rank_kinds)) > 1:
            # replicas can follow speed: each rank's kind weighs its share of the experts (launch.train)
            args += ["--rank-kind", ",".join(rank_kinds)]
        if forced is None and kinds_known:
            uniform = all(len(set(per_rank[p * ep:(p + 1) * ep])) == 1 for p in range(pp))
            args += ["--rank-precision", ",".join(per_rank[::ep] if uniform else per_rank)]
        for r in range(np):
            p, e = divmod(r, ep)
            stages = sorted({schedule.stage_of(p, chunk) for chunk in schedule.chunks(p)})
            roles[r] = f"pp{p} stages {'+'.join(map(str, stages))} ep{e}"
            if forced is not None:
                entries = forced.split(",")  # one for all, one per pipeline rank, or one per rank
                precision[r] = entries[r if len(entries) > pp else p] if len(entries) > 1 else forced
            elif kinds_known:
                precision[r] = per_rank[r]
            else:
                precision[r] = "config"
    rows = tuple(RankRow(rank=r, node=cluster.nodes[node_of[r]].name, local=r - first[node_of[r]],
                         device=_device(cluster.nodes[node_of[r]].kind, r - first[node_of[r]]), role=roles[r],
                         precision=precision[r]) for r in range(np))
    used = sorted({node_of[r] for r in range(np)})
    job = [python, "-m", "mpi4py", "-m", module, *args]
    env = [("PYTHONPATH", str(root)), ("HETEROPIPE_RUN_ID", run_id)]
    supervised = head is not None and head.supervise is not None
    wrap, collect = [], ()
    if supervised:
        env += [(ENV_ADDRESS, f"tcp://{head.host}:{head.port}"), (ENV_HEARTBEAT, str(head.supervise.heartbeat_s))]
        wrap = supervisor.command(np, head.supervise, port=head.port, advertise=head.host, python=python,
                                  kill_grace_s=head.kill_grace_s)
    if head is not None and head.progress:
        env.append((collector.ENV, f"tcp://{head.host}:{head.port + 1}"))
        collect = tuple(collector.command(f"tcp://*:{head.port + 1}", python))
    common = dict(hostfile=hostfile_text(cluster, flavor), rows=rows, env=tuple(env), collector=collect)
    if flavor == "openmpi":
        argv = [*wrap, mpirun or "mpirun", "-n", str(np), "--hostfile", hostfile_path, "--map-by", "slot",
                "--bind-to", "numa", *(a for k, v in env for a in ("-x", f"{k}={v}")), *(extra or []), *job]
        return LaunchPlan(flavor=flavor, argv=tuple(argv), sbatch="", **common)
    if flavor == "mpich":
        # the others stay up when one rank dies, so that they can tell the supervisor what they waited for
        argv = [*wrap, mpirun or "mpiexec", "-n", str(np), "-f", hostfile_path, "-bind-to", "numa",
                *(a for k, v in env for a in ("-genv", k, v)), *(["-disable-auto-cleanup"] if supervised else []),
                *(extra or []), *job]
        return LaunchPlan(flavor=flavor, argv=tuple(argv), sbatch="", **common)
    sizes = {cluster.nodes[n].num_devices for n in used}
    # --export=ALL (srun's default, unless the site changed it): the ranks get the variables exported below
    argv = [*wrap, mpirun or "srun", "--mpi=pmix", f"--nodes={len(used)}", f"--ntasks={np}",
            "--distribution=block:block", "--cpu-bind=ldoms", "--export=ALL", *(extra or []), *job]
    gpus = sorted(sizes)[-1]
    header = ["#!/bin/bash", "#SBATCH --job-name=heteropipe", f"#SBATCH --nodes={len(used)}", f"#SBATCH --ntasks={np}",
              f"#SBATCH --nodelist={','.join(cluster.nodes[n].name for n in used)}", "#SBATCH --exclusive"]
    if len(sizes) == 1:
        header.append(f"#SBATCH --ntasks-per-node={gpus}")
    if any(cluster.nodes[n].kind not in ("cpu",) and not cluster.nodes[n].kind.startswith("ascend") for n in used):
        header.append(f"#SBATCH --gpus-per-node={gpus}")
    body = [f"export {k}={shlex.quote(v)}" for k, v in env]
    if collect:  # the batch script runs on the allocation's first node: the head
        body += [shlex.join(collect) + " &", "trap 'kill $!' EXIT"]
    body.append(shlex.join(argv))
    return LaunchPlan(flavor=flavor, argv=tuple(argv), sbatch="\n".join(header + body) + "\n", **common)


def format_table(plan: LaunchPlan) -> str:
    """The rank -> node / device / role / precision table."""
    head = ("rank", "node", "local", "device", "role", "precision")
    cells = [head] + [(str(r.rank), r.node, str(r.local), r.device, r.role, r.precision) for r in plan.rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    return "\n".join("  ".join(c[i].ljust(widths[i]) for i in range(len(head))).rstrip() for c in cells)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m launch.cluster", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a heteropipe module on a cluster, one rank per device (see the module docstring for the "
                    "mapping and binding). --dry-run prints the hostfile, the command and the rank -> node / device "
                    "/ role / precision table and starts nothing.",
        epilog="examples:\n  python -m launch.cluster --hostfile hosts -n 16 --dry-run -- launch.train --pp 4 --ep 4\n"
               "  python -m launch.cluster --cluster launch/clusters/v3-2048.toml -n 2048 --mpi slurm --dry-run -- "
               "launch.train --config v3.toml\n  make cluster HOSTFILE=hosts NP=16 CONFIG=run.toml")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-f", "--hostfile", type=Path, help="hostfile: 'host slots=N' (Open MPI) or 'host:N' (Hydra)")
    src.add_argument("--cluster", type=Path, help="cluster TOML (topology/cluster.py): hosts with device kinds")
    p.add_argument("--kind", default="h800", help="device kind of every --hostfile node (default h800)")
    p.add_argument("-n", "--np", type=int, required=True, help="ranks (one per device)")
    p.add_argument("--mpi", choices=("auto", *FLAVORS), default="auto",
                   help="launcher: openmpi (mpirun), mpich (Hydra mpiexec; Intel MPI too), slurm (srun in an "
                        "allocation); auto: slurm inside an allocation, else from `$MPIRUN --version`")
    p.add_argument("--mpirun", default=os.environ.get("MPIRUN"), help="launcher executable (default $MPIRUN, else "
                                                                      "mpirun / mpiexec / srun)")
    p.add_argument("--python", default=os.environ.get("PYTHON", "python3"), help="Python on the nodes ($PYTHON)")
    p.add_argument("--run-id", default=os.environ.get("HETEROPIPE_RUN_ID"),
                   help="shared log folder name for every node's ranks (default: time-stamped)")
    p.add_argument("--mpi-args", default=os.environ.get("EXTRA_MPI_ARGS", ""),
                   help="extra launcher arguments, passed through ($EXTRA_MPI_ARGS)")
    p.add_argument("--dry-run", action="store_true", help="print what would run and exit")
    head = p.add_argument_group("supervision and progress on the launching (head) node")
    head.add_argument("--head", default=None,
                      help="name or IP address the ranks on every node reach this node by (default: this host's "
                           "name; slurm: $SLURMD_NODENAME, else the first node, where sbatch runs the script)")
    head.add_argument("--port", type=int, default=DEFAULT_PORT,
                      help=f"the supervisor's TCP port on the head node; the collector takes the next one (default "
                           f"{DEFAULT_PORT}; the nodes must be able to connect to both)")
    head.add_argument("--supervise", action=argparse.BooleanOptionalAction, default=None,
                      help="run under the supervisor (default: on for launch.train, whose ranks send heartbeats)")
    head.add_argument("--no-progress", action="store_true", help="do not start the progress collector")
    head.add_argument("--kill-grace-s", type=float, default=supervisor.KILL_GRACE_S,
                      help=f"on a verdict, SIGTERM the launcher and SIGKILL it this many seconds later (default "
                           f"{supervisor.KILL_GRACE_S:g})")
    supervisor.add_deadline_arguments(head)
    p.add_argument("module", help="module every rank runs (launch.train, launch.ring)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    return p


def _flavor(ns: argparse.Namespace) -> str:
    if ns.mpi != "auto":
        return ns.mpi
    if os.environ.get("SLURM_JOB_ID"):
        return "slurm"
    from launch.local import mpi_flavor

    found = mpi_flavor(ns.mpirun or "mpirun")
    if found == "unknown":
        raise ValueError(f"--mpi auto: cannot tell the MPI of {ns.mpirun or 'mpirun'!r} from its --version; "
                         f"pass --mpi openmpi|mpich|slurm")
    return found


def _head(ns: argparse.Namespace, flavor: str, module: str, cluster: Cluster) -> Head:
    host = ns.head
    if host is None:
        host = (os.environ.get("SLURMD_NODENAME") or cluster.nodes[0].name) if flavor == "slurm" else socket.gethostname()
    supervised = module in SUPERVISED_MODULES if ns.supervise is None else ns.supervise
    return Head(host=host, port=ns.port, supervise=supervisor.config_from_args(ns) if supervised else None,
                progress=not ns.no_progress, kill_grace_s=ns.kill_grace_s)


def _print_plan(plan: LaunchPlan, np: int, hostfile: Path) -> None:
    flavor = plan.flavor
    print(f"# {flavor}: {np} ranks on {len({r.node for r in plan.rows})} node(s); local rank from "
          f"${LOCAL_RANK_VAR[flavor]}")
    passed = {"openmpi": "mpirun -x", "mpich": "mpiexec -genv", "slurm": "export + srun --export=ALL"}[flavor]
    print(f"# env of every rank (passed by {passed}):")
    print("\n".join(f"{k}={v}" for k, v in plan.env))
    supervised = plan.argv[1:3] == ("-m", "launch.supervisor")
    if flavor == "slurm":
        print("# batch script (sbatch; the collector and the supervisor run on its node, the head):")
        print(plan.sbatch, end="")
    else:
        print(f"# {hostfile}:")
        print(plan.hostfile, end="")
        if plan.collector:
            print("# progress collector, on this (head) node:")
            print(shlex.join(plan.collector))
        print("# command (on this node; the supervisor runs the launcher and judges the ranks' heartbeats):"
              if supervised else "# command:")
        print(shlex.join(plan.argv))
    print("# ranks:")
    print(format_table(plan))


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
    module = ns.module
    if module == "--" and args:
        module, args = args[0], args[1:]
    run_id = ns.run_id or time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + f"-{os.getpid()}"
    try:
        if ns.cluster is not None:
            cluster, kinds_known = load_cluster(ns.cluster), True
        else:
            cluster, kinds_known = _read_hostfile(ns.hostfile, ns.kind), False
        flavor = _flavor(ns)
        hostfile = Path("logs") / run_id / f"hostfile.{flavor}"
        plan = launch_plan(cluster, ns.np, flavor, module, args, kinds_known=kinds_known, python=ns.python,
                           mpirun=ns.mpirun, run_id=run_id, extra=shlex.split(ns.mpi_args), hostfile_path=str(hostfile),
                           head=_head(ns, flavor, module, cluster))
    except ValueError as e:
        print(f"launch.cluster: {e}", file=sys.stderr)
        return 2
    if ns.dry_run:
        _print_plan(plan, ns.np, hostfile)
        return 0
    if flavor != "slurm":
        hostfile.parent.mkdir(parents=True, exist_ok=True)
        hostfile.write_text(plan.hostfile)
    env = {**os.environ, **dict(plan.env)}
    # ended by the batch system or a user: the finally blocks below end the supervisor (and so the job)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    progress = subprocess.Popen(list(plan.collector), env=env) if plan.collector else None
    try:
        job = subprocess.Popen(list(plan.argv), env=env)
        try:
            return job.wait()
        finally:
            if job.poll() is None:  # SIGTERM, not SIGKILL: the supervisor ends the job before it exits
                job.terminate()
                job.wait()
    except FileNotFoundError as e:
        print(f"launch.cluster: cannot run {e.filename!r}: {e.strerror}; check --python / --mpirun", file=sys.stderr)
        return 2
    finally:
        if progress is not None:
            collector.stop(progress)


if __name__ == "__main__":
    sys.exit(main())
