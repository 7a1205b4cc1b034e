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
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from runtime.schedules import Schedule, build
from topology import Cluster, Layout, cluster_from_hostfile, emulated_cluster, load_cluster
from topology.kinds import KIND_PRECISION, KINDS

__all__ = ["FLAVORS", "LOCAL_RANK_VAR", "CLUSTERS", "RankRow", "LaunchPlan", "launch_plan", "hostfile_text",
           "add_cluster_arguments", "cluster_from_args", "main"]

FLAVORS = ("openmpi", "mpich", "slurm")
LOCAL_RANK_VAR = {"openmpi": "OMPI_COMM_WORLD_LOCAL_RANK", "mpich": "MPI_LOCALRANKID", "slurm": "SLURM_LOCALID"}
"""The variable each launcher sets to a rank's index on its node (runtime.device reads them all)."""

_ROOT = Path(__file__).resolve().parent.parent

CLUSTERS = Path(__file__).resolve().parent / "clusters"
"""Shipped cluster files; ``--cluster NAME`` looks here when NAME is not a path."""


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


def _train_shape(module: str, args: list[str]) -> tuple[int, int, Schedule, str | None] | None:
    """(pp, ep, schedule, precision set by the arguments or None) of a launch.train job; None for other modules."""
    if module != "launch.train":
        return None
    from launch.train import parse_config  # imports the model: only for training jobs

    cfg = parse_config(args)
    forced = None
    if "--precision" in args or "--rank-precision" in args or cfg.rank_precision:
        forced = ",".join(cfg.rank_precision) if cfg.rank_precision else cfg.model.precision
    pipe = cfg.pipeline
    return pipe.pp, pipe.ep, build(pipe.schedule, pipe.pp, pipe.microbatches), forced


def launch_plan(cluster: Cluster, np: int, flavor: str, module: str, args: list[str], *, kinds_known: bool,
                python: str = "python3", mpirun: str | None = None, run_id: str = "run", root: Path = _ROOT,
                extra: list[str] | None = None, hostfile_path: str = "hostfile") -> LaunchPlan:
    """The command and rank table for ``np`` ranks of ``python -m module args`` on ``cluster``.

    ``kinds_known``: the cluster came from a file naming node kinds (then precision follows kinds).
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
        pp, ep, schedule, forced = shape
        if pp * ep != np:
            raise ValueError(f"np={np}: the training job runs pp x ep = {pp} x {ep} = {pp * ep} ranks; set NP={pp * ep} "
                             f"or change --pp/--ep")
        layout = Layout(cluster=cluster, pp=pp, ep=ep, dp=ep)
        stage_kinds = []
        for p in range(pp):
            ks = {layout.place(r).kind for r in range(p * ep, (p + 1) * ep)}
            if len(ks) > 1 and kinds_known and forced is None:
                raise ValueError(f"pipeline rank {p} spans device kinds {sorted(ks)}: one precision per pipeline "
                                 f"rank; order the nodes so each run of ep = {ep} ranks is one kind, or pass "
                                 f"--precision")
            stage_kinds.append(sorted(ks)[0])
        if kinds_known:
            from topology.plan import check_mirror_kinds

            check_mirror_kinds(schedule.name, stage_kinds)
        if forced is None and kinds_known:
            per_pp = [KIND_PRECISION.get(k, "bf16") for k in stage_kinds]
            args += ["--rank-precision", ",".join(per_pp)]
        for r in range(np):
            p, e = divmod(r, ep)
            stages = sorted({schedule.stage_of(p, chunk) for chunk in schedule.chunks(p)})
            roles[r] = f"pp{p} stages {'+'.join(map(str, stages))} ep{e}"
            if forced is not None:
                precision[r] = forced.split(",")[p] if "," in forced else forced
            elif kinds_known:
                precision[r] = KIND_PRECISION.get(stage_kinds[p], "bf16")
            else:
                precision[r] = "config"
    rows = tuple(RankRow(rank=r, node=cluster.nodes[node_of[r]].name, local=r - first[node_of[r]],
                         device=_device(cluster.nodes[node_of[r]].kind, r - first[node_of[r]]), role=roles[r],
                         precision=precision[r]) for r in range(np))
    used = sorted({node_of[r] for r in range(np)})
    job = [python, "-m", "mpi4py", "-m", module, *args]
    pythonpath = str(root)
    if flavor == "openmpi":
        argv = [mpirun or "mpirun", "-n", str(np), "--hostfile", hostfile_path, "--map-by", "slot", "--bind-to",
                "numa", "-x", f"PYTHONPATH={pythonpath}", "-x", f"HETEROPIPE_RUN_ID={run_id}", *(extra or []), *job]
        return LaunchPlan(flavor=flavor, argv=tuple(argv), hostfile=hostfile_text(cluster, flavor), sbatch="", rows=rows)
    if flavor == "mpich":
        argv = [mpirun or "mpiexec", "-n", str(np), "-f", hostfile_path, "-bind-to", "numa", "-genv", "PYTHONPATH",
                pythonpath, "-genv", "HETEROPIPE_RUN_ID", run_id, *(extra or []), *job]
        return LaunchPlan(flavor=flavor, argv=tuple(argv), hostfile=hostfile_text(cluster, flavor), sbatch="", rows=rows)
    sizes = {cluster.nodes[n].num_devices for n in used}
    argv = [mpirun or "srun", "--mpi=pmix", f"--nodes={len(used)}", f"--ntasks={np}", "--distribution=block:block",
            "--cpu-bind=ldoms", *(extra or []), *job]
    gpus = sorted(sizes)[-1]
    header = ["#!/bin/bash", "#SBATCH --job-name=heteropipe", f"#SBATCH --nodes={len(used)}", f"#SBATCH --ntasks={np}",
              f"#SBATCH --nodelist={','.join(cluster.nodes[n].name for n in used)}", "#SBATCH --exclusive"]
    if len(sizes) == 1:
        header.append(f"#SBATCH --ntasks-per-node={gpus}")
    if any(cluster.nodes[n].kind not in ("cpu",) and not cluster.nodes[n].kind.startswith("ascend") for n in used):
        header.append(f"#SBATCH --gpus-per-node={gpus}")
    body = [f"export PYTHONPATH={shlex.quote(pythonpath)}", f"export HETEROPIPE_RUN_ID={shlex.quote(run_id)}",
            shlex.join(argv)]
    return LaunchPlan(flavor=flavor, argv=tuple(argv), hostfile=hostfile_text(cluster, flavor),
                      sbatch="\n".join(header + body) + "\n", rows=rows)


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
                           mpirun=ns.mpirun, run_id=run_id, extra=shlex.split(ns.mpi_args), hostfile_path=str(hostfile))
    except ValueError as e:
        print(f"launch.cluster: {e}", file=sys.stderr)
        return 2
    if ns.dry_run:
        print(f"# {flavor}: {ns.np} ranks on {len({r.node for r in plan.rows})} node(s); local rank from "
              f"${LOCAL_RANK_VAR[flavor]}")
        if flavor == "slurm":
            print("# batch script (sbatch):")
            print(plan.sbatch, end="")
        else:
            print(f"# {hostfile}:")
            print(plan.hostfile, end="")
            print("# command:")
            print(shlex.join(plan.argv))
        print("# ranks:")
        print(format_table(plan))
        return 0
    if flavor != "slurm":
        hostfile.parent.mkdir(parents=True, exist_ok=True)
        hostfile.write_text(plan.hostfile)
    env = {**os.environ, "PYTHONPATH": str(_ROOT), "HETEROPIPE_RUN_ID": run_id}
    return subprocess.call(list(plan.argv), env=env)


if __name__ == "__main__":
    sys.exit(main())
