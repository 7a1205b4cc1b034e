"""One job, two device kinds: a cluster file with emulated h800 and ascend910c nodes; launch.cluster
gives each rank its kind's precision (FP8 on h800 -- the CPU emulation here -- and BF16 on 910C).
pp=2 x ep=2 on DualPipeV, kinds h800, ascend910c | ascend910c, h800: both pipeline boundaries join
an FP8 and a BF16 rank, and each stage's EP group holds one FP8 and one BF16 rank. The job runs
under real mpiexec and its loss stays within 0.25% of an all-BF16 run (the single-process
reference at BF16), and each rank's dispatch bytes show the receiver's wire format."""

from __future__ import annotations

import json

import pytest

from actors.data import SyntheticTokens
from actors.reference import Reference
from launch.cluster import launch_plan
from launch.train import parse_config
from tests.mpirun import mpirun
from topology import load_cluster, token_bytes

pytestmark = pytest.mark.mpi

KINDS = ["h800", "ascend910c", "ascend910c", "h800"]
ARGS = ["--pp", "2", "--ep", "2", "--nodes", "2", "--schedule", "dualpipev", "--microbatches", "8", "--model", "tiny",
        "--steps", "12", "--device", "cpu", "--no-trace", "--seed", "3"]


def test_mixed_fp8_bf16_job_tracks_all_bf16(tmp_path):
    toml = tmp_path / "mixed.toml"
    toml.write_text("".join(f'[[nodes]]\nname = "n{i}"\ndevices = 1\nkind = "{k}"\n\n' for i, k in enumerate(KINDS)))
    plan = launch_plan(load_cluster(toml), 4, "mpich", "launch.train", ARGS, kinds_known=True)
    args = list(plan.argv[plan.argv.index("launch.train") + 1:])
    assert args[-2:] == ["--rank-precision", "fp8,bf16,bf16,fp8"]
    mpirun(4, "launch.train", *args, "--log-dir", str(tmp_path), "--run-id", "mixed", timeout=400)

    backends, losses, sent = {}, {}, {r: {"dispatch_inter": 0, "combine-bwd_inter": 0} for r in range(4)}
    for r in range(4):
        for line in (tmp_path / "mixed" / f"rank-{r}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if rec.get("event") == "backend":
                backends[r] = rec
            elif rec.get("event") == "step" and "loss" in rec:
                losses[rec["step"]] = rec["loss"]
            elif rec.get("event") == "ep_step":
                for key in sent[r]:
                    sent[r][key] += rec["bytes"].get(key, 0)
    assert [backends[r]["backend"] for r in range(4)] == ["fp8", "bf16", "bf16", "fp8"], backends
    # the EP boundary converts where actors/ep_wire.py says: a rank's tokens leave for the other node
    # in that node's format (FP8 + scales to an FP8 rank, BF16 to a BF16 one) whatever its own
    # precision, while dy (combine-bwd, the same rows) always travels BF16
    hidden = parse_config(ARGS).model.hidden
    for r, peer_precision in enumerate(["bf16", "fp8", "fp8", "bf16"]):
        ratio = sent[r]["dispatch_inter"] / sent[r]["combine-bwd_inter"]
        assert ratio == token_bytes(hidden, peer_precision) / token_bytes(hidden, "bf16"), (r, sent[r])

    cfg = parse_config(ARGS + ["--precision", "bf16"])
    m = cfg.model
    ref = Reference(model=m, optim=cfg.optim, data=SyntheticTokens(m.vocab_size, m.seq_len, cfg.seed),
                    microbatches=cfg.pipeline.microbatches, micro_batch=cfg.pipeline.micro_batch, seed=cfg.seed)
    bf16 = {}
    for step in range(cfg.steps):
        out = ref.train_step(step)
        bf16[step] = sum(out.losses) / len(out.losses)
    steps = sorted(losses)
    assert steps == sorted(bf16), (steps, sorted(bf16))
    tail = steps[-4:]
    mixed_end = sum(losses[s] for s in tail) / len(tail)
    bf16_end = sum(bf16[s] for s in tail) / len(tail)
    assert bf16_end < 0.97 * bf16[0], "the model did not learn"
    rel = abs(mixed_end - bf16_end) / bf16_end
    print(f"end loss (mean of last {len(tail)} steps): mixed fp8/bf16 {mixed_end:.5f}, all-bf16 {bf16_end:.5f}, "
          f"rel {rel:.4%}")
    assert rel <= 0.0025, (mixed_end, bf16_end)
    # at one precision a pipeline equals the reference bit for bit, so equal losses would mean the
    # FP8 ranks silently ran BF16
    assert any(losses[s] != bf16[s] for s in steps), "mixed run identical to all-BF16: FP8 not in effect"
