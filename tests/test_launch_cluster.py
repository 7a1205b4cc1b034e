"""Cluster launch (launch/cluster.py): exact commands for Open MPI, MPICH/Hydra and SLURM on 2- and
16-node hostfiles, with and without the supervisor and collector on the head node, the rank table,
slot shortage, precision from node kinds, DualPipe mirror kinds."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from launch.cluster import Head, launch_plan, main
from launch.supervisor import SupervisorConfig
from topology import Cluster, Node, cluster_from_hostfile

ROOT = Path(__file__).resolve().parent.parent
TWO = cluster_from_hostfile("a slots=8\nb slots=8\n")
SIXTEEN = cluster_from_hostfile("".join(f"gpu{i:02d}:8\n" for i in range(16)))
JOB = "python3 -m mpi4py -m launch.train --pp 4 --ep 4 --micro-batch 4"
JOB16 = "python3 -m mpi4py -m launch.train --pp 16 --ep 8 --micro-batch 8 --microbatches 32 --layers 16"
HEAD = Head(host="head0", port=29600, supervise=SupervisorConfig())
SUP = ("python3 -m launch.supervisor -n {np} --port 29600 --advertise head0 --heartbeat-s 1 --liveness-s 10 "
       "--progress-s 20 --startup-s 120 --kill-grace-s 5 -- ")
ENV = {"HETEROPIPE_SUPERVISOR": "tcp://head0:29600", "HETEROPIPE_HEARTBEAT_S": "1.0",
       "HETEROPIPE_TELEMETRY": "tcp://head0:29601"}


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
        "slurm": f"srun --mpi=pmix --nodes={nodes} --ntasks={np} --distribution=block:block --cpu-bind=ldoms "
                 f"--export=ALL {job}",
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


@pytest.mark.parametrize("cluster, np, args, job", [
    (TWO, 16, ["--pp", "4", "--ep", "4", "--micro-batch", "4"], JOB),
    (SIXTEEN, 128, ["--pp", "16", "--ep", "8", "--micro-batch", "8", "--microbatches", "32", "--layers", "16"], JOB16),
])
def test_supervised_commands_per_launcher(cluster, np, args, job):
    """The supervisor wraps the launcher on the head node and every rank, on every node, is told where
    it and the collector listen: the bug this catches is a remote rank that never finds them (a
    127.0.0.1 or ipc:// address, or a variable the launcher does not carry to other nodes)."""
    nodes, sup = cluster.num_nodes, SUP.format(np=np)
    xs = " ".join(f"-x {k}={v}" for k, v in ENV.items())
    genv = " ".join(f"-genv {k} {v}" for k, v in ENV.items())
    expect = {
        "openmpi": f"{sup}mpirun -n {np} --hostfile H --map-by slot --bind-to numa -x PYTHONPATH={ROOT} "
                   f"-x HETEROPIPE_RUN_ID=R {xs} {job}",
        "mpich": f"{sup}mpiexec -n {np} -f H -bind-to numa -genv PYTHONPATH {ROOT} -genv HETEROPIPE_RUN_ID R {genv} "
                 f"-disable-auto-cleanup {job}",
        "slurm": f"{sup}srun --mpi=pmix --nodes={nodes} --ntasks={np} --distribution=block:block --cpu-bind=ldoms "
                 f"--export=ALL {job}",
    }
    for flavor, line in expect.items():
        plan = launch_plan(cluster, np, flavor, "launch.train", args, kinds_known=False, run_id="R", root=ROOT,
                           hostfile_path="H", head=HEAD)
        assert shlex.join(plan.argv) == line
        assert dict(plan.env) == {"PYTHONPATH": str(ROOT), "HETEROPIPE_RUN_ID": "R", **ENV}
        assert shlex.join(plan.collector) == "python3 -m launch.collector 'tcp://*:29601'"
        if flavor == "slurm":  # srun inherits the batch script's exports; the collector runs beside the supervisor
            body = plan.sbatch.split("#SBATCH --gpus-per-node=8\n")[1]
            assert body == "".join(f"export {k}={shlex.quote(v)}\n" for k, v in plan.env) + \
                "python3 -m launch.collector 'tcp://*:29601' &\ntrap 'kill $!' EXIT\n" + line + "\n"
    # no supervisor (launch.ring, --no-supervise): the launcher alone, still told where the collector is
    bare = launch_plan(cluster, np, "mpich", "launch.ring", [], kinds_known=False, run_id="R", root=ROOT,
                       hostfile_path="H", head=Head(host="head0"))
    assert bare.argv[0] == "mpiexec" and "-disable-auto-cleanup" not in bare.argv
    assert dict(bare.env) == {"PYTHONPATH": str(ROOT), "HETEROPIPE_RUN_ID": "R",
                              "HETEROPIPE_TELEMETRY": "tcp://head0:29601"}


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


def test_dry_run_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hosts").write_text("a slots=8\nb slots=8\n")
    rc = main(["-f", "hosts", "-n", "2", "--mpi", "openmpi", "--run-id", "R", "--head", "h0", "--port", "4000",
               "--supervise", "--liveness-s", "6", "--dry-run", "--", "launch.ring"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    lines = out.out.splitlines()
    sup = ("python3 -m launch.supervisor -n 2 --port 4000 --advertise h0 --heartbeat-s 1 --liveness-s 6 --progress-s 20 "
           "--startup-s 120 --kill-grace-s 5 -- ")
    env = "-x HETEROPIPE_SUPERVISOR=tcp://h0:4000 -x HETEROPIPE_HEARTBEAT_S=1.0 -x HETEROPIPE_TELEMETRY=tcp://h0:4001"
    assert f"{sup}mpirun -n 2 --hostfile logs/R/hostfile.openmpi --map-by slot --bind-to numa -x PYTHONPATH={ROOT} " \
           f"-x HETEROPIPE_RUN_ID=R {env} python3 -m mpi4py -m launch.ring" in lines
    assert "python3 -m launch.collector 'tcp://*:4001'" in lines and "HETEROPIPE_SUPERVISOR=tcp://h0:4000" in lines
    assert lines[-2].split() == ["0", "a", "0", "cuda:0", "-", "-"] and not (tmp_path / "logs").exists()
    for bad, says in ((["-n", "20"], "needs 20"), (["-n", "2", "--port", "65535"], "pass --port"),
                      (["-n", "2", "--head", "tcp://h0"], "host name or IPv4 address"),
                      (["-n", "2", "--supervise", "--liveness-s", "1"], "liveness_s=1.0: must be at least two")):
        assert main(["-f", "hosts", *bad, "--mpi", "slurm", "--dry-run", "--", "launch.ring"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("launch.cluster: ") and says in err and err.count("\n") == 1, err


def test_rank_kinds_passed_when_replicas_can_follow_speed():
    """With redundant experts on a cluster of mixed kinds, launch.train gets every rank's kind (the
    expert placement weighs ranks by their kinds' speeds); without replicas the weighting cannot
    move load, so nothing is added (catches a kind list in the wrong rank order, or none passed)."""
    kinds = ["h800", "ascend910c", "h800", "ascend910c"]
    mixed = Cluster(nodes=tuple(Node(name=f"n{i}", num_devices=1, kind=k) for i, k in enumerate(kinds)))
    base = ["--pp", "2", "--ep", "2", "--nodes", "2", "--micro-batch", "2", "--schedule", "dualpipev"]
    plan = launch_plan(mixed, 4, "mpich", "launch.train", [*base, "--redundant-experts", "4"], kinds_known=True)
    argv = list(plan.argv)
    assert argv[argv.index("--rank-kind") + 1] == ",".join(kinds)
    assert "--rank-kind" not in launch_plan(mixed, 4, "mpich", "launch.train", base, kinds_known=True).argv
