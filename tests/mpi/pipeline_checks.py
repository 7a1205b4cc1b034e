"""Pipeline exactness checks: each case trains the tiny model with a schedule on all ranks of the
job and compares with the single-process reference (:mod:`actors.reference`), which rank 0 runs
and broadcasts (gradients, logits) to the others.

Run: python -m launch.local -n PP tests.mpi.pipeline_checks LOG_DIR CASE [CASE ...]
with CASE = ``schedule:microbatches[:steps][@precision]`` (steps >= 2 adds the loss-curve check
over that many optimizer steps; precision fp32 by default, bf16 or fp8 run both sides on that
backend: the CPU emulation is deterministic, so exactness holds at every precision). Per case:

1. a forward-only step at the initial parameters: logits of every microbatch bit-identical to
   the reference's;
2. step 0: per-microbatch losses bit-identical to the reference (rank 0); every parameter's
   gradient, after the mirrored-copy sum, within calc_diff < 1e-13 of the reference's (each rank
   checks its chunks; the counts over ranks must cover every parameter once per copy); the global
   gradient norm within 1e-6 relative;
3. DualPipe: the two copies of every stage hold bit-identical parameters after the step;
4. steps 1..S-1: losses within 1e-6 relative of the reference's curve (rank 0).

Rank 0 appends one JSON line per case to ``LOG_DIR/case-results.jsonl``; any failed check aborts the job.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
from mpi4py import MPI

from actors.data import SyntheticTokens
from actors.model import ModelConfig
from actors.optim import OptimConfig
from actors.pipeline import StageActor
from actors.reference import Reference
from kernels.testing import calc_diff
from runtime import log
from runtime.schedules import build

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
SEED, MICRO_BATCH = 3, 2
# Gradients are float32 sums over microbatches taken in schedule order, not the reference's order:
# ~1e-7 relative noise per element, which calc_diff squares (~1e-14) and the norm sees linearly.
GRAD_TOL, NORM_TOL, CURVE_TOL = 1e-13, 1e-6, 1e-6


def _grad_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    if not (x.any() or y.any()):
        return 0.0  # both exactly zero: equal (calc_diff would divide 0 by 0)
    return calc_diff(x, y)


def _check_mirror_copies(actor: StageActor) -> None:
    """DualPipe: rank r's chunk c and rank pp-1-r's chunk 1-c are the same stage; after the step
    they must hold the same bits."""
    if actor.mirror is None:
        return
    for c in (0, 1):
        mine = torch.cat([p.detach().reshape(-1) for p in actor.chunks[c].parameters()]).numpy()
        theirs = np.empty(sum(p.numel() for p in actor.chunks[1 - c].parameters()), np.float32)
        # I send my chunk c and receive the mirror's chunk c, which is the same stage as my chunk 1-c.
        comm.Sendrecv(mine, dest=actor.mirror, sendtag=30 + c, recvbuf=theirs, source=actor.mirror, recvtag=30 + c)
        ours = torch.cat([p.detach().reshape(-1) for p in actor.chunks[1 - c].parameters()]).numpy()
        assert np.array_equal(ours, theirs), f"rank {rank}: chunk {1 - c} differs from its mirror on rank {actor.mirror}"


def run_case(spec: str) -> dict:
    body, _, precision = spec.partition("@")
    name, m, *rest = body.split(":")
    microbatches, steps = int(m), int(rest[0]) if rest else 1
    schedule = build(name, size, microbatches)
    model = ModelConfig.tiny(num_layers=max(8, schedule.num_stages), precision=precision or "fp32")
    optim = OptimConfig(lr=1e-2, warmup_steps=2)
    data = SyntheticTokens(model.vocab_size, model.seq_len, SEED)
    ref = Reference(model=model, optim=optim, data=data, microbatches=microbatches, micro_batch=MICRO_BATCH, seed=SEED)
    # Forward-only first: both sides hold the same initial parameters, so the logits must match
    # bit for bit (after a step the parameters differ in the last bits: gradient sums are
    # taken in another order).
    ref_grads = {n: torch.zeros_like(p) for n, p in ref.model.named_parameters()}
    logits_shape = (microbatches, MICRO_BATCH, model.seq_len, model.vocab_size)
    ref_logits = torch.zeros(logits_shape)
    ref0 = None
    if rank == 0:
        ref_logits = torch.stack([y for _, y in sorted(ref.forward_step(0).items())])
        ref0 = ref.train_step(0, inspect=lambda r: ref_grads.update({n: g.clone() for n, g in r.named_grads().items()}))
    # The reference is deterministic, so one rank computes it and the others receive its bits.
    flat = torch.cat([g.reshape(-1) for g in ref_grads.values()])
    comm.Bcast(flat.numpy(), root=0)
    comm.Bcast(ref_logits.numpy(), root=0)
    ref_norm = comm.bcast(ref0.grad_norm if rank == 0 else None, root=0)
    offset = 0
    for g in ref_grads.values():
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
    out: dict = {"case": spec, "pp": size, "stages": schedule.num_stages}

    def program(actor: StageActor) -> None:
        diffs: list[float] = []

        def inspect(a: StageActor) -> None:
            for chunk in a.chunks.values():
                for pname, p in chunk.named_parameters():
                    d = _grad_diff(p.grad, ref_grads[pname])
                    assert d < GRAD_TOL, f"rank {rank} {spec}: grad of {pname} differs: calc_diff {d:.3e}"
                    diffs.append(d)

        logits = actor.forward_step(0)
        for gmb, y in logits.items():
            assert torch.equal(y, ref_logits[gmb]), f"rank {rank} {spec}: forward-only logits of microbatch {gmb} differ"
        assert comm.allreduce(len(logits)) == microbatches, f"{spec}: forward-only did not cover every microbatch"

        r0 = actor.train_step(0, inspect=inspect)
        compared = comm.allreduce(len(diffs))
        copies = 2 if schedule.name == "dualpipe" else 1
        assert compared == copies * len(ref_grads), f"{spec}: compared {compared} grads, expected {copies}x{len(ref_grads)}"
        out["max_grad_calc_diff"] = comm.allreduce(max(diffs, default=0.0), op=MPI.MAX)
        assert abs(r0.grad_norm - ref_norm) <= NORM_TOL * ref_norm, (r0.grad_norm, ref_norm)
        if rank == 0:
            assert r0.losses == ref0.losses, f"{spec}: step-0 losses differ:\n{r0.losses}\n{ref0.losses}"
        _check_mirror_copies(actor)

        worst = 0.0
        for step in range(1, steps):
            r = actor.train_step(step)
            if rank == 0:
                expect = ref.train_step(step).losses
                rel = max(abs(a - b) / abs(b) for a, b in zip(r.losses, expect))
                assert rel <= CURVE_TOL, f"{spec}: step {step} losses off by {rel:.3e} relative"
                worst = max(worst, rel)
        out["curve_steps"], out["curve_max_rel"] = steps, worst
        out["losses_bit_identical"], out["forward_bit_identical"] = True, True

    StageActor(schedule=schedule, model=model, optim=optim, data=data, micro_batch=MICRO_BATCH, seed=SEED,
               program=program, trace=False).run()
    return out


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    log_dir, *cases = argv
    log.configure(run_id="pipeline-checks", rank=rank, role="stage", log_dir=log_dir)
    for spec in cases:
        result = run_case(spec)
        if rank == 0:
            # a file, not stdout: mpiexec interleaves the ranks' output mid-line
            with open(f"{log_dir}/case-results.jsonl", "a") as fh:
                fh.write(json.dumps(result) + "\n")
    print(f"rank {rank}: all pipeline checks ok", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
