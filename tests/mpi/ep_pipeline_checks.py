"""Pipeline x expert parallelism (pp = 2 x ep = 2 or 4) against the single-process reference.

Run: python -m launch.local -n 4|8 tests.mpi.ep_pipeline_checks LOG_DIR CASE [CASE ...]
with CASE = ``schedule:microbatches:steps`` (ep = ranks / 2).

Layout (:func:`actors.ep_layout.expert_parallel_job`): 4 emulated nodes of ep / 2 devices, pp 2 x
ep: each stage's EP group spans 2 nodes, so dispatch crosses "nodes" (and, at ep 4, fans out inside
them). Every rank runs a :class:`actors.pipeline.StageActor` over its pipeline communicator with an
:class:`actors.ep_stage.EPExecutor` over its EP group (12 or 16 expert slots for 8 experts:
replicas), and trains on its own 1/ep of each global microbatch (:class:`actors.data.RowShard`). Every rank
also runs :class:`actors.reference.Reference` on the whole global batch and checks:

* step 0: every gradient of its chunks after the mirror sum and the EP sync (expert slots against
  their expert's) calc_diff < 1e-12; the global grad norm <= 1e-6 relative; the per-microbatch
  losses (first-stage rank 0s: the mean over the ep ranks) <= 1e-6 relative;
* steps 1..S-1: the loss curve <= 1e-6 relative;
* after the steps: each MoE layer's gate bias bit-identical on every rank (a stage's ep ranks and
  DualPipe's mirrored copy).

World rank 0 appends one JSON line per case to ``LOG_DIR/ep-pipeline-results.jsonl``.
"""

from __future__ import annotations

import json
import sys

import torch
from mpi4py import MPI

from actors.data import RowShard, SyntheticTokens
from actors.ep_layout import expert_parallel_job
from actors.model import ModelConfig
from actors.optim import OptimConfig
from actors.pipeline import StageActor
from actors.reference import Reference
from kernels.testing import calc_diff
from runtime import log
from runtime.schedules import build

world = MPI.COMM_WORLD
SEED, MICRO_BATCH, PP = 3, 4, 2
EP = world.Get_size() // PP
NUM_REPLICAS = 12 if EP == 2 else 16  # replicas: 12 or 16 slots for 8 experts
GRAD_TOL, REL_TOL = 1e-12, 1e-6


def run_case(spec: str) -> dict:
    name, m, s = spec.split(":")
    microbatches, steps = int(m), int(s)
    schedule = build(name, PP, microbatches)
    model = ModelConfig.tiny(num_layers=4, num_routed_experts=8, num_groups=2, topk_groups=2, top_k=2)
    optim = OptimConfig(lr=1e-2, warmup_steps=2)
    data = SyntheticTokens(model.vocab_size, model.seq_len, SEED)
    ref = Reference(model=model, optim=optim, data=data, microbatches=microbatches, micro_batch=MICRO_BATCH,
                    seed=SEED)
    job = expert_parallel_job(world, pp=PP, ep=EP, nodes=2, model=model, microbatches=microbatches,
                              num_replicas=NUM_REPLICAS)

    out: dict = {"case": spec, "pp": PP, "ep": EP}

    def program(actor: StageActor) -> None:
        ref_grads: dict[str, torch.Tensor] = {}
        diffs: dict[str, float] = {}

        def inspect(a: StageActor) -> None:
            for c, chunk in a.chunks.items():
                for pname, p in chunk.named_parameters():
                    if ".ep." in pname:  # a slot: its expert's full gradient (replicas summed)
                        layer = int(pname.split(".")[1])
                        want = ref_grads[pname.replace(".ep.", ".")][a.exec.chunks[c].moe[layer].slot_experts]
                    else:
                        want = ref_grads[pname]
                    diffs[f"{c}:{pname}"] = calc_diff(p.grad, want) if (p.grad.any() or want.any()) else 0.0

        ref0 = ref.train_step(0, inspect=lambda rf: ref_grads.update({n: g.clone()
                                                                       for n, g in rf.named_grads().items()}))
        r0 = actor.train_step(0, inspect=inspect)
        worst = max(diffs, key=diffs.get)
        if diffs[worst] >= GRAD_TOL:
            raise AssertionError(f"rank {world.Get_rank()} {spec}: grad {worst} calc_diff {diffs[worst]:.3e}")
        if abs(r0.grad_norm - ref0.grad_norm) > REL_TOL * ref0.grad_norm:
            raise AssertionError(f"{spec}: grad norm {r0.grad_norm} vs {ref0.grad_norm}")
        losses = [(r0.losses, ref0.losses)]
        for step in range(1, steps):
            losses.append((actor.train_step(step).losses, ref.train_step(step).losses))
        curve = 0.0
        if actor.rank == 0:
            for got, want in losses:
                if len(got) != microbatches:
                    raise AssertionError(f"{spec}: {len(got)} losses for {microbatches} microbatches")
                curve = max(curve, max(abs(a - b) / abs(b) for a, b in zip(got, want)))
            if curve > REL_TOL:
                raise AssertionError(f"{spec}: losses off by {curve:.3e} relative")
        biases = torch.cat([m.bias for c in sorted(actor.chunks) for m in actor.chunks[c].moe_layers()])
        stage_biases = {actor.stage_ids[c]: torch.stack([m.bias for m in actor.chunks[c].moe_layers()])
                        for c in actor.chunks}
        for other in world.allgather(stage_biases):
            for stage, b in other.items():
                if stage in stage_biases and not torch.equal(b, stage_biases[stage]):
                    raise AssertionError(f"{spec}: gate biases of stage {stage} differ between ranks")
        out["max_grad_calc_diff"] = world.allreduce(diffs[worst], op=MPI.MAX)
        out["grads_compared"] = world.allreduce(len(diffs))
        out["norm_rel"] = abs(r0.grad_norm - ref0.grad_norm) / ref0.grad_norm
        out["curve_max_rel"] = world.allreduce(curve, op=MPI.MAX)
        out["steps"] = steps
        out["bias_values"] = int(biases.numel())

    StageActor(schedule=schedule, model=model, optim=optim,
               data=RowShard(data, part=job.comms.place.ep, parts=EP), micro_batch=MICRO_BATCH // EP, seed=SEED,
               program=program, comm=job.comms.pp, trace=False, executor=job.executor).run()
    return out


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    log_dir, *cases = argv
    log.configure(run_id="ep-pipeline-checks", rank=world.Get_rank(), role="stage", log_dir=log_dir)
    for spec in cases:
        result = run_case(spec)
        if world.Get_rank() == 0:
            with open(f"{log_dir}/ep-pipeline-results.jsonl", "a") as fh:
                fh.write(json.dumps(result) + "\n")
    print(f"rank {world.Get_rank()}: all ep pipeline checks ok", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
