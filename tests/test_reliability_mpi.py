"""Reliability under real mpiexec: faults named by the supervisor, resume bit for bit, one-line errors.

Faults (tests/mpi/faults.py) are injected on rank 1 (pipeline stage 1 of 2, 1F1B) at step 3 with
short deadlines (heartbeat 0.5 s, liveness 3 s, progress 5 s) to stay fast; each job must end
non-zero with the supervisor naming rank 1, its role and the verdict, within the deadline plus a
margin for this shared 2-core machine (seconds from the FAULT line to the verdict, both wall clock).
The frozen-rank case goes through ``launch.cluster`` as on a cluster (2 emulated one-slot nodes,
Hydra's fork launcher standing in for ssh): the supervisor and collector run as the head node's
commands and the ranks reach them at tcp://127.0.0.1:PORT passed by ``-genv``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from actors.model import ModelConfig, layer_split
from launch.local import LaunchTimeout, find_mpiexec, mpi_flavor, run_local
from launch.supervisor import EXIT_CODE, SupervisorConfig
from tests.mpirun import mpirun

pytestmark = pytest.mark.mpi

FAST = SupervisorConfig(heartbeat_s=0.5, liveness_s=3.0, progress_s=5.0, startup_s=90.0)
TRAIN = ["--schedule", "1f1b", "--pp", "2", "--microbatches", "2", "--model", "tiny", "--steps", "40", "--no-trace"]


def _supervised(n: int, args: list[str], fault_file, timeout: float = 150) -> tuple[int, str]:
    try:
        res = run_local(n, "tests.mpi.faults", args, timeout=timeout, capture=True, supervise=FAST,
                        env={"OMP_NUM_THREADS": "1", "FAULT_TIME_FILE": str(fault_file)})
    except LaunchTimeout as exc:
        pytest.fail(f"supervised job hung past {timeout} s; output:\n{exc.output[-6000:]}")
    return res.returncode, res.stdout


def _free_port_pair() -> int:
    """A port P with P and P + 1 free now (supervisor, collector)."""
    for _ in range(50):
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            try:
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    pytest.fail("no two adjacent free ports")


def _cluster_supervised(n: int, args: list[str], fault_file, tmp_path, timeout: float = 150) -> tuple[int, str]:
    """``launch.cluster`` on ``n`` emulated one-slot nodes of this machine (Hydra -launcher fork)."""
    mpiexec = find_mpiexec()
    if mpi_flavor(mpiexec) != "mpich":
        return _supervised(n, args, fault_file, timeout)  # the emulation needs Hydra's fork launcher
    (tmp_path / "hosts").write_text("".join(f"node{i}:1\n" for i in range(n)))
    argv = [sys.executable, "-m", "launch.cluster", "-f", str(tmp_path / "hosts"), "-n", str(n), "--mpi", "mpich",
            "--mpirun", mpiexec, "--mpi-args", "-launcher fork", "--python", sys.executable, "--head", "127.0.0.1",
            "--port", str(_free_port_pair()), "--supervise", "--heartbeat-s", str(FAST.heartbeat_s),
            "--liveness-s", str(FAST.liveness_s), "--progress-s", str(FAST.progress_s), "--startup-s",
            str(FAST.startup_s), "--kill-grace-s", "0.5", "--", "tests.mpi.faults", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FAULT_TIME_FILE": str(fault_file),
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # the supervisor ends the job (its own session) on SIGTERM
        out, _ = proc.communicate(timeout=15)
        pytest.fail(f"cluster-style supervised job hung past {timeout} s; output:\n{out[-6000:]}")
    return proc.returncode, out


def _report_delay(out: str, fault_file) -> tuple[dict, float]:
    """The supervisor's JSON report and the seconds from the injected fault to its verdict."""
    fault_t = float(fault_file.read_text())
    path = re.search(r"full report: (\S+)", out).group(1)
    report = json.loads(open(path).read())
    return report, report["t_wall"] - fault_t


# fault -> (verdict, seconds allowed from fault to verdict: the deadline plus margin). A rank that
# raises is the NaN test's "stop" case below; a SIGKILLed one (died, within 3 s) the checkpoint test's.
FAULTS = {"stop": ("silent", FAST.liveness_s + 3.0), "mute": ("stuck", FAST.progress_s + 3.0)}
KILL_ALLOWED_S = 3.0


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_fault_is_named_with_rank_and_role_within_the_deadline(fault, tmp_path):
    verdict, allowed = FAULTS[fault]
    args = [fault, "1", "3", *TRAIN, "--log-dir", str(tmp_path)]
    if fault == "stop":  # on a cluster: supervisor and collector on the head node, reached over TCP
        rc, out = _cluster_supervised(2, args, tmp_path / "fault-time", tmp_path)
        # heartbeats and telemetry came over TCP: the verdict below, and the collector's step lines
        assert "supervisor: 2 ranks report to tcp://127.0.0.1:" in out and "slowest rank" in out, out[-3000:]
    else:
        rc, out = _supervised(2, args, tmp_path / "fault-time")
    assert rc == EXIT_CODE, out[-3000:]  # the supervisor ended the job
    head = "supervisor: rank 1 (pipeline stage 1 of 2 (1f1b), pid "
    assert head in out and f") {verdict}: " in out, out[-3000:]
    report, delay = _report_delay(out, tmp_path / "fault-time")
    assert report["rank"] == 1 and report["verdict"] == verdict and report["step"] is not None
    assert delay < allowed, f"{fault}: named after {delay:.1f} s (allowed {allowed} s)"
    print(f"{fault}: named as {verdict} {delay:.2f} s after the fault")
    assert "    rank 0 (pipeline stage 0 of 2 (1f1b)" in out  # what the other rank was doing
    if fault == "mute":
        assert "rank 0 waits on it" in report["why"] and "waiting for rank 1" in out
    if fault == "stop":
        assert "process stopped" in report["why"]


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nan_gradient_is_located_and_the_policy_applied(policy, tmp_path):
    """A NaN put into one gradient of rank 1's last layer after the backward of step 3: the norm
    check finds it, the report names rank, stage and layer; stop ends the job, skip drops the step."""
    layer = layer_split(ModelConfig.tiny(), 2)[1][-1]
    args = ["nan", "1", "3", "--schedule", "1f1b", "--pp", "2", "--microbatches", "2", "--model", "tiny",
            "--steps", "6", "--no-trace", "--log-dir", str(tmp_path), "--run-id", "nan", "--nonfinite", policy]
    rc, out = _supervised(2, args, tmp_path / "fault-time")
    found = f"rank 1 stage 1: non-finite gradients in layer {layer} (first in the backward: layer {layer})"
    if policy == "stop":  # a rank that raises: named with its error at once
        assert rc != 0 and "supervisor: rank 1 (pipeline stage 1 of 2 (1f1b)" in out and ") failed: " in out
        report, delay = _report_delay(out, tmp_path / "fault-time")
        assert report["rank"] == 1 and report["error"].startswith(f"NonFiniteError: step 3: gradient norm nan; {found}")
        assert delay < 3.0, f"raise: named after {delay:.1f} s"
        print(f"raise (NonFiniteError): named as failed {delay:.2f} s after the fault")
        return
    assert rc == 0, out[-3000:]
    events = [json.loads(x) for x in (tmp_path / "nan" / "rank-1.jsonl").read_text().splitlines()]
    hits = [e for e in events if e["event"] == "nonfinite"]
    assert len(hits) == 1 and hits[0]["step"] == 3 and found in hits[0]["message"]
    steps = _losses(tmp_path, "nan")
    assert sorted(steps) == list(range(6)) and all(math.isfinite(steps[s][1]) for s in (4, 5))


def _losses(log_dir, run_id: str) -> dict[int, tuple[float, float]]:
    run = next(p for p in log_dir.iterdir() if p.name.startswith(run_id))
    events = [json.loads(x) for x in (run / "rank-0.jsonl").read_text().splitlines()]
    return {e["step"]: (e["loss"], e["grad_norm"]) for e in events if e["event"] == "step"}


def test_resume_is_bit_exact_and_survives_a_kill_during_the_checkpoint_write(tmp_path):
    """20 steps checkpointing every 5, rank 1 killed half-way through writing checkpoint 15 (the
    supervisor names it died, with its role, within 3 s: a SIGKILL); then --resume without
    checkpointing: it must start from checkpoint 10 (15 has no manifest) and log the very same losses
    and gradient norms as the killed run did for steps 10-14, bit for bit. The killed run is the
    reference: a state the checkpoint misses (AdamW moments or step, RNG, balancing biases) or one
    that writing a checkpoint disturbs changes step 10 already."""
    common = ["--schedule", "dualpipe", "--pp", "2", "--microbatches", "4", "--model", "tiny", "--steps", "20",
              "--no-trace", "--log-dir", str(tmp_path / "logs")]
    ck = str(tmp_path / "ck")
    rc, out = _supervised(2, ["ckpt-kill", "1", "15", *common, "--run-id", "killed", "--checkpoint-every", "5",
                              "--checkpoint-dir", ck], tmp_path / "fault-time")
    assert rc != 0 and "supervisor: rank 1 (pipeline stages 1+0 of 2 (dualpipe), pid " in out, out[-3000:]
    report, delay = _report_delay(out, tmp_path / "fault-time")
    assert report["rank"] == 1 and report["verdict"] == "died" and report["step"] is not None, out[-3000:]
    assert delay < KILL_ALLOWED_S, f"kill: named after {delay:.1f} s (allowed {KILL_ALLOWED_S} s)"
    print(f"kill: named as died {delay:.2f} s after the fault")
    assert "    rank 0 (pipeline stages 0+1 of 2 (dualpipe)" in out  # what the other rank was doing
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["step-00000005", "step-00000010", "step-00000015"]
    assert not (tmp_path / "ck" / "step-00000015" / "manifest.json").exists()
    assert (tmp_path / "ck" / "step-00000010" / "manifest.json").exists()
    _, out, _ = mpirun(2, "launch.train", *common, "--run-id", "resumed", "--checkpoint-dir", ck, "--resume",
                       timeout=150)
    assert "continuing at step 11" in out
    killed, resumed = (_losses(tmp_path / "logs", r) for r in ("killed", "resumed"))
    assert sorted(killed) == list(range(15)) and sorted(resumed) == list(range(10, 20))
    assert all(resumed[s] == killed[s] for s in range(10, 15)), (resumed, killed)


def test_resume_is_bit_exact_under_expert_parallelism(tmp_path):
    """pp=2 x ep=2 over 2 emulated nodes: 8 steps checkpointing every 4 (the uninterrupted run);
    its last checkpoint removed, --resume continues from step 4 (every rank loads its own expert
    slots) and logs the same losses and norms as steps 4..7 of the uninterrupted run."""
    common = ["--pp", "2", "--ep", "2", "--nodes", "2", "--schedule", "1f1b", "--microbatches", "2", "--model", "tiny",
              "--steps", "8", "--no-trace", "--log-dir", str(tmp_path / "logs"), "--checkpoint-dir", str(tmp_path / "ck")]
    mpirun(4, "launch.train", *common, "--run-id", "straight", "--checkpoint-every", "4", timeout=200)
    assert len(list((tmp_path / "ck" / "step-00000004").glob("rank-*.pt"))) == 4
    shutil.rmtree(tmp_path / "ck" / "step-00000008")
    mpirun(4, "launch.train", *common, "--run-id", "resumed", "--resume", timeout=200)
    straight, resumed = (_losses(tmp_path / "logs", r) for r in ("straight", "resumed"))
    assert sorted(resumed) == [4, 5, 6, 7] and all(resumed[s] == straight[s] for s in resumed), (resumed, straight)


def test_missing_config_prints_one_line_per_job(tmp_path):
    rc, out, _ = mpirun(2, "launch.train", "--config", str(tmp_path / "missing.toml"), timeout=60, expect_ok=False)
    assert rc == 2
    assert out.strip() == f"launch.train: bad configuration: config '{tmp_path / 'missing.toml'}': no such file " \
                          f"(check the --config path)", out
