"""Cluster launch (launch/cluster.py): exact commands for Open MPI, MPICH/Hydra and SLURM on 2- and
16-node hostfiles, the rank table, slot shortage, precision from node kinds, DualPipe mirror kinds."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from launch.cluster import launch_plan
from topology import Cluster, Node, cluster_from_hostfile

ROOT = Path(__file__).resolve().parent.parent
TWO = cluster_from_hostfile("a slots=8\nb slots=8\n")
SIXTEEN = cluster_from_hostfile("".join(f"gpu{i:02d}:8\n" for i in range(16)))
JOB = "python3 -m mpi4py -m launch.train --pp 4 --ep 4 --micro-batch 4"
JOB16 = "python3 -m mpi4py -m launch.train --pp 16 --ep 8 --micro-batch 8 --microbatches 32 --layers 16"


@pytest.mark.parametrize("cluster, np, args, job", [
    (TWO, 16, ["--pp", "4", "--ep", "4", "--micro-batch", "4"], JOB),
    (SIXTEEN, 128, ["--pp", "16", "--ep", "8", "--micro-batch", "8", "--microbatches", "32", "--layers", "16"], JOB16),
])
def test_commands_per_launcher(cluster, np, args, job):
    nodes = cluster.num_nodes
    expect = {
        "openmpi": f"mpirun -n {np} --hostfile H --map-by slot --bind-to numa -x PYTHONPATH={ROOT} "
                   f"-x HETEROPIPE_RUN_ID=R {job}",
        "mpich": f"mpiexec -n {np} -f H -bind-to numa -genv PYTHONPATH {ROOT} -genv HETEROPIPE_RUN_ID R {job}",
        "slurm": f"srun --mpi=pmix --nodes={nodes} --ntasks={np} --distribution=block:block --cpu-bind=ldoms {job}",
    }
    for flavor, line in expect.items():
        plan = launch_plan(cluster, np, flavor, "launch.train", args, kinds_known=False, run_id="R", root=ROOT,
                           hostfile_path="H")
        assert shlex.join(plan.argv) == line
        names = [n.name for n in cluster.nodes]
        if flavor == "openmpi":
            assert plan.hostfile.splitlines() == [f"{n} slots=8" for n in names]
        elif flavor == "mpich":
            assert plan.hostfile.splitlines() == [f"{n}:8" for n in names]
        else:
            assert f"#SBATCH --nodes={nodes}\n" in plan.sbatch and "#SBATCH --ntasks-per-node=8\n" in plan.sbatch
            assert f"#SBATCH --nodelist={','.join(names)}\n" in plan.sbatch and plan.sbatch.endswith(line + "\n")
        # node-major: rank r on node r // 8, device cuda:(r % 8); pipeline rank r // ep
        ep = int(args[args.index("--ep") + 1])
        for row in plan.rows:
            assert (row.node, row.local, row.device) == (names[row.rank // 8], row.rank % 8, f"cuda:{row.rank % 8}")
            assert row.role.startswith(f"pp{row.rank // ep} ") and row.role.endswith(f"ep{row.rank % ep}")


def test_too_few_slots_names_the_count():
    with pytest.raises(ValueError, match=r"16 slots in all, but the job needs 24.*add 8 slots \(e\.g\. 1 more node"):
        launch_plan(TWO, 24, "openmpi", "launch.ring", [], kinds_known=False)
    with pytest.raises(ValueError, match=r"pp x ep = 4 x 4 = 16 ranks; set NP=16"):
        launch_plan(TWO, 8, "mpich", "launch.train", ["--pp", "4", "--ep", "4", "--micro-batch", "4"],
                    kinds_known=False)


def test_precision_follows_node_kinds_and_mirror_rule():
    kinds = ["h800", "ascend910c", "ascend910c", "h800"]
    mixed = Cluster(nodes=tuple(Node(name=f"n{i}", num_devices=2, kind=k) for i, k in enumerate(kinds)))
    plan = launch_plan(mixed, 8, "mpich", "launch.train", ["--pp", "4", "--ep", "2", "--micro-batch", "2"],
                       kinds_known=True, run_id="R")
    assert plan.argv[-2:] == ("--rank-precision", "fp8,bf16,bf16,fp8")
    assert [r.precision for r in plan.rows] == ["fp8", "fp8", "bf16", "bf16", "bf16", "bf16", "fp8", "fp8"]
    assert [r.device for r in plan.rows[:4]] == ["cuda:0", "cuda:1", "npu:0", "npu:1"]
    # the user's --precision wins and nothing is added
    forced = launch_plan(mixed, 8, "mpich", "launch.train", ["--pp", "4", "--ep", "2", "--micro-batch", "2",
                                                            "--precision", "bf16"], kinds_known=True)
    assert "--rank-precision" not in forced.argv and {r.precision for r in forced.rows} == {"bf16"}
    bad = Cluster(nodes=tuple(Node(name=f"n{i}", num_devices=2, kind=k)
                              for i, k in enumerate(["h800", "ascend910c", "h800", "h800"])))
    with pytest.raises(ValueError, match="must be of one kind.*dualpipev"):
        launch_plan(bad, 8, "mpich", "launch.train", ["--pp", "4", "--ep", "2", "--micro-batch", "2"],
                    kinds_known=True)


def test_dry_run_cli(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("a slots=8\nb slots=8\n")
    run = lambda *a: subprocess.run([sys.executable, "-m", "launch.cluster", *a], capture_output=True, text=True,
                                    timeout=120, cwd=tmp_path, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    out = run("-f", str(hosts), "-n", "2", "--mpi", "openmpi", "--run-id", "R", "--dry-run", "--", "launch.ring")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert f"mpirun -n 2 --hostfile logs/R/hostfile.openmpi --map-by slot --bind-to numa -x PYTHONPATH={ROOT} " \
           f"-x HETEROPIPE_RUN_ID=R python3 -m mpi4py -m launch.ring" in lines
    assert lines[-2].split() == ["0", "a", "0", "cuda:0", "-", "-"] and not (tmp_path / "logs").exists()
    short = run("-f", str(hosts), "-n", "20", "--mpi", "slurm", "--dry-run", "--", "launch.ring")
    assert short.returncode == 2 and "needs 20" in short.stderr and "Traceback" not in short.stderr
