"""The pipeline-stage actor: walks its rank's action list and trains its model chunks.

One :class:`StageActor` per pipeline rank. It holds the chunks :class:`~runtime.schedules.Schedule`
assigns to its rank (DualPipe: stages ``r`` and ``pp-1-r``, two copies of the model across the
ranks; DualPipeV: stages ``r`` and ``2pp-1-r``; 1F1B/ZB1P: stage ``r``), their gradients and
optimizer, and runs a step: the walk over its action list (:mod:`actors.action_walk`), then the
step end. One concern per module:

* :mod:`actors.action_plan`: what the walk needs to know about the list, planned once;
* :mod:`actors.action_walk` and :mod:`actors.step_state`: the walk and what actions hand each other;
* :mod:`actors.mirror_sync`: DualPipe's mirrored copies exchange a chunk's gradients as soon as its
  last B/W of the step is done (the transfer overlaps the drain) and add them after the last
  action, together with their expert loads (ranks ``r`` and ``pp-1-r`` are data-parallel peers);
* :mod:`actors.step_reduce`: the global gradient norm, summed on rank 0 in rank order and sent
  back (every rank clips with the same number), and the losses onto rank 0;
* here: the chunks and their flat gradient buffers, the step's order, AdamW and the gate-bias
  update by the step's expert load, the non-finite policy.

The transport is progressed from inside the chunks (a hook per layer), so rendezvous transfers
advance while computing.
"""

from __future__ import annotations

import functools
import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from mpi4py import MPI

from actors import action_plan
from actors import nonfinite as nf
from actors.action_walk import ActionWalker
from actors.chunk_exec import ChunkExecutor, LocalExecutor
from actors.data import TokenSource
from actors.mirror_sync import MirrorSync
from actors.model import ModelConfig, Stage, build_stage
from actors.optim import AdamW, OptimConfig
from actors.step_reduce import LossGather, global_grad_norm
from kernels import WeightGradDeferral
from runtime import log, spans
from runtime.actor import Actor
from runtime.progress import Progress
from runtime.schedules import Schedule
from runtime.staging import HostStaging
from runtime.transport import TransportConfig

__all__ = ["StageActor", "StepResult"]

@dataclass(slots=True)
class StepResult:
    """What one optimizer step produced (losses only complete on rank 0)."""

    step: int
    losses: list[float]
    """Per-microbatch cross-entropy in global microbatch order (rank 0; empty elsewhere)."""
    grad_norm: float
    seconds: float
    compute_seconds: float
    """Time this rank spent inside F/B/W computations."""


class StageActor(Actor):
    """One pipeline rank: owns its chunks, their optimizer, and walks the schedule each step."""

    role = "stage"

    def __init__(self, *, schedule: Schedule, model: ModelConfig, optim: OptimConfig, data: TokenSource,
                 micro_batch: int, seed: int, program: Callable[[StageActor], object],
                 comm: MPI.Comm = MPI.COMM_WORLD, transport: TransportConfig | None = None, trace: bool = True,
                 nonfinite: str = "stop", device: torch.device | str = "cpu",
                 executor: Callable[[dict[int, Stage], Progress], ChunkExecutor] | None = None):
        """``program(actor)`` is what :meth:`main` runs (e.g. N training steps with progress output).
        ``nonfinite``: a NaN/Inf gradient norm ``stop``s the job (NonFiniteError naming rank, stage,
        layer, microbatch) or ``skip``s the step (no update; logged as ``nonfinite``).
        ``device``: where the chunks, their gradients and optimizer state, activations and received
        tensors live (runtime.device picks it); tensors cross MPI staged through host memory.
        ``executor(chunks, engine)``: how the chunks run and combine gradients with the stage's other
        ranks (default: one rank per stage; ``actors.ep_stage.EPExecutor``: expert parallelism, with
        ``comm`` the pipeline communicator)."""
        super().__init__(comm, transport=transport, trace=trace)
        if nonfinite not in ("stop", "skip"):
            raise ValueError(f"nonfinite={nonfinite!r}: choose stop or skip")
        self.nonfinite = nonfinite
        self.device = torch.device(device)
        self._staging = HostStaging(self.device)
        self.program = program
        if self.size != schedule.pp:
            raise ValueError(f"schedule {schedule.name} has pp={schedule.pp} ranks but the job has {self.size}: "
                             f"launch with -n {schedule.pp} or pass --pp {self.size}")
        self.schedule = schedule
        self.model_config = model
        self.data = data
        self.micro_batch = micro_batch
        self.stage_ids = {c: schedule.stage_of(self.rank, c) for c in schedule.chunks(self.rank)}
        self.chunks = {c: build_stage(model, s, schedule.num_stages, seed=seed).to(self.device) for c, s in self.stage_ids.items()}
        self.exec = executor(self.chunks, self.transport.engine) if executor else LocalExecutor(self.chunks)
        for mod in self.chunks.values():
            self._install_progress_hooks(mod)
        self.params = [p for c in sorted(self.chunks) for p in self.chunks[c].parameters()]
        # One flat gradient buffer per chunk, every param.grad a view into it: zeroing, the mirror
        # exchange and the mirror sum are one op each, with no copy. Zeros, not None: every
        # parameter takes part in every AdamW step (here and in the reference alike).
        self._grad_bufs: dict[int, torch.Tensor] = {}
        for c, mod in self.chunks.items():
            params = list(mod.parameters())
            buf = torch.zeros(sum(p.numel() for p in params), device=self.device)
            offset = 0
            for p in params:
                p.grad = buf[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
            self._grad_bufs[c] = buf
        self.optimizer = AdamW(self.params, optim)
        self.act_shape = (micro_batch, model.seq_len, model.hidden)
        self.trace = trace
        # Split B/W: the chunks' weight GEMMs are deferred while the walker captures (any autograd thread).
        self.walker = ActionWalker(schedule=schedule, rank=self.rank, stage_ids=self.stage_ids, exec=self.exec,
                                   transport=self.transport, staging=self._staging, data=data, micro_batch=micro_batch,
                                   act_shape=self.act_shape, device=self.device,
                                   wgrad_deferral=WeightGradDeferral(self.params), flight=self.flight, trace=trace,
                                   status=self._status)
        # The rank holding the other copy of my stages (DualPipe: my chunk c is its chunk 1 - c), if any.
        self.mirror = schedule.mirror_of(self.rank)
        self._mirror = (MirrorSync(self.transport, self._staging, self.mirror, self._grad_bufs)
                        if self.mirror is not None else None)
        # Where each chunk's gradients become final: its exchange with the mirror starts there and
        # travels during the rest of the step instead of after it.
        self._grads_final_after = action_plan.grads_final(schedule.ranks[self.rank]) if self._mirror else {}
        self._losses = LossGather(self.transport, schedule.microbatches, self.exec.microbatch_losses)

    def _status(self, action: object) -> None:
        """What the supervisor's progress report shows: the action under way and how many ran."""
        self.progress_action = action
        self.progress_count += 1

    def _install_progress_hooks(self, module: Stage) -> None:
        """Progress communication between layers, forward and backward, to overlap it with compute."""
        tp = self.transport

        def fwd_hook(_mod, _inp, out):
            tp.progress()
            t = out[0] if isinstance(out, tuple) else out
            if torch.is_tensor(t) and t.requires_grad:
                t.register_hook(lambda g: (tp.progress(), g)[1])

        for block in module.blocks():
            block.register_forward_hook(fwd_hook)

    # ------------------------------------------------------------------ one step
    def train_step(self, step: int, *, inspect: Callable[[StageActor], None] | None = None) -> StepResult:
        """Run every action of this rank for optimizer step ``step``, then the optimizer.

        ``inspect(self)`` runs once the gradients are final (mirrored copies summed), before
        clipping and AdamW: tests compare them with the reference there.
        """
        t_start = time.monotonic_ns()
        self.progress_step = step
        if self.heartbeat is not None:
            self.heartbeat.poke()
        for c, buf in self._grad_bufs.items():
            buf.zero_()
            # autograd accumulates into an existing .grad in place; a replaced one would break the view
            storage = buf.untyped_storage().data_ptr()
            assert all(p.grad is not None and p.grad.untyped_storage().data_ptr() == storage
                       for p in self.chunks[c].parameters()), f"rank {self.rank}: a .grad left chunk {c}'s buffer"
        for mod in self.chunks.values():
            mod.train()
            mod.reset_expert_load()
        after = {i: functools.partial(self._mirror.post, chunks, step) for i, chunks in self._grads_final_after.items()}
        st = self.walker.walk(step, forward_only=False, after=after)
        leftovers = st.leftovers()
        assert not leftovers, f"rank {self.rank}: schedule left work undone: {leftovers[:8]}"
        t_tail = time.monotonic_ns()
        self._status("step end: mirror sum, grad norm, optimizer, losses")
        self._losses.start(st.losses)  # the losses travel to rank 0 during the rest of the tail
        if self._mirror is not None:
            self._mirror.add_theirs()
        self.exec.sync_grads()
        if inspect is not None:
            inspect(self)
        t_mirror = time.monotonic_ns()
        loads = self.exec.expert_loads({c: m.expert_load().to("cpu", torch.float64) for c, m in self.chunks.items()})
        if self._mirror is not None:
            loads = self._mirror.sum_loads(loads)
        norm = self._global_grad_norm()
        t_norm = time.monotonic_ns()
        if math.isfinite(norm):  # the same number on every rank: all ranks take the same branch
            self.optimizer.step(norm)
            for c, mod in self.chunks.items():
                mod.update_gate_bias(loads[c].to(self.device))
        else:
            self._nonfinite_step(step, norm, st.bad_losses)
        if st.bad_losses and math.isfinite(norm):
            self.log.warning("nonfinite_loss", step=step, microbatches=sorted(st.bad_losses))
        t_optim = time.monotonic_ns()
        losses = self._losses.finish()
        self.transport.flush()
        t_end = time.monotonic_ns()
        if self.trace:
            # the step-end work after the last action, split: mirror sum, loads + norm, AdamW, losses
            log.record_span(spans.TAIL, t_tail, t_end, step=step, mirror_us=(t_mirror - t_tail) / 1e3,
                            norm_us=(t_norm - t_mirror) / 1e3, optim_us=(t_optim - t_norm) / 1e3,
                            gather_us=(t_end - t_optim) / 1e3)
            # ru_maxrss is in KiB on Linux: the rank's peak resident memory so far
            log.record_span(spans.STEP, t_start, t_end, step=step,
                            peak_mem_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        self.progress_action = "step done"
        self.last_step_s, self.last_compute_s = (t_end - t_start) / 1e9, st.compute_ns / 1e9
        return StepResult(step=step, losses=losses, grad_norm=norm, seconds=(t_end - t_start) / 1e9,
                          compute_seconds=st.compute_ns / 1e9)

    @torch.no_grad()
    def forward_step(self, step: int) -> dict[int, torch.Tensor]:
        """Inference: the schedule's forwards only. Returns logits per global microbatch on the
        rank(s) holding the last stage (empty elsewhere)."""
        for mod in self.chunks.values():
            mod.eval()
        st = self.walker.walk(step, forward_only=True)
        assert not st.recvs and not st.held, f"rank {self.rank}: receives left open: {list(st.recvs)[:8]}"
        self.transport.flush()
        return st.logits

    # ------------------------------------------------------------------ step end
    def _global_grad_norm(self) -> float:
        """L2 norm of all gradients, each stage counted once (under a mirror, every rank's chunk 0
        covers every stage once); the same number on every rank."""
        return global_grad_norm(self.transport, self.exec.grad_sq_sum([0] if self._mirror else sorted(self.chunks)))

    def _nonfinite_step(self, step: int, norm: float, bad_losses: dict[int, float]) -> None:
        """The step's gradient norm is NaN/Inf: locate it on this rank, log it, then stop (raise,
        where something was found) or skip the update (policy ``skip``: weights, AdamW state and
        gate biases stay as they were; the next step starts from them)."""
        found = nf.locate(self.chunks, self.stage_ids)
        text = nf.describe(step, norm, self.rank, found, bad_losses)
        # a warning (echoed to stderr) where something was found; the other ranks just note the skip
        (self.log.warning if found or bad_losses else self.log.info)(
            "nonfinite", step=step, norm=str(norm), policy=self.nonfinite, found=found,
            bad_losses={str(k): str(v) for k, v in bad_losses.items()}, message=text)
        for mod in self.chunks.values():
            mod.reset_expert_load()
        if self.nonfinite == "stop" and (found or bad_losses):
            raise nf.NonFiniteError(f"{text} (policy stop; --nonfinite skip drops such steps instead)")

    # ------------------------------------------------------------------ actor loop
    def role_info(self) -> dict:
        """Role, the pipeline stages this rank runs (by chunk), the schedule and, under expert
        parallelism, its place in the stage's expert group — for the supervisor's reports."""
        info = {"role": self.role, "stages": [self.stage_ids[c] for c in sorted(self.stage_ids)],
                "schedule": self.schedule.name, "num_stages": self.schedule.num_stages}
        ep_comm = getattr(self.exec, "comm", None)  # only the expert-parallel executor has a group
        if ep_comm is not None:
            info["expert_group"] = f"rank {ep_comm.Get_rank()} of {ep_comm.Get_size()}"
        return info

    def main(self):
        return self.program(self)
