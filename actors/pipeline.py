"""The pipeline-stage actor: walks its rank's action list and trains its model chunks.

One :class:`StageActor` per pipeline rank. It holds the chunks :class:`~runtime.schedules.Schedule`
assigns to its rank (DualPipe: stages ``r`` and ``pp-1-r``, two copies of the model across the
ranks; DualPipeV: stages ``r`` and ``2pp-1-r``; 1F1B/ZB1P: stage ``r``) and only *walks* the
schedule — every decision about order lives in the schedule, which is data:

* ``Recv``: post a receive on its schedule-known channel into a ring buffer
  ``[micro_batch, seq, hidden]``, at once; the buffer goes back after the microbatch's last B/W.
* ``F``: take the input (tokens at stage 0, else the posted receive or the local hand-off from this
  rank's other chunk), run the chunk, keep the graph; the last stage computes the loss.
* ``B``: take the output gradient (from the loss, a receive or a local hand-off) and run backward
  for the chunk's inputs; a ``split`` B defers the weight GEMMs (:mod:`kernels.wgrad`) to ``W``.
* ``FB``: the forward of one direction, then the backward of the other; the forward's send is
  posted before the backward starts so it travels while the backward computes.
* ``Send``: post the activation / input gradient to the peer; it completes during later work.

The transport is progressed from inside the chunks (a hook per layer), so rendezvous transfers
advance while computing. DualPipe's mirrored copies exchange a chunk's gradients as soon as its
last B/W of the step is done (the transfer overlaps the drain) and add them after the last action,
together with their expert loads (ranks ``r`` and ``pp-1-r`` are data-parallel peers for those
stages), the global gradient norm is summed on rank 0 in rank order and sent back (every rank
clips with the same number), AdamW steps, and the gate biases move by the step's expert load.
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from mpi4py import MPI

from actors import nonfinite as nf
from actors.data import TokenSource
from actors.chunk_exec import ChunkExecutor, LocalExecutor
from actors.fb_overlap import Steps
from actors.model import ModelConfig, Stage, build_stage, loss_fn
from actors.optim import AdamW, OptimConfig
from kernels import WeightGradDeferral
from runtime import log, spans
from runtime.actor import Actor
from runtime.progress import Progress
from runtime.schedules import FB, Compute, Recv, Schedule, Send
from runtime.staging import HostStaging
from runtime.transport import TransportConfig

__all__ = ["StageActor", "StepResult"]

# Control channels between pipeline ranks; the schedule's own tags are small (0..3).
# _CH_MIRROR + c carries the sender's chunk-c gradients (one channel per chunk: the two chunks'
# gradients become final at different points of the step, in either order).
_CH_MIRROR, _CH_LOAD, _CH_NORM_UP, _CH_NORM_DOWN, _CH_LOSS = 16, 18, 19, 20, 21


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
        self.actions = schedule.ranks[self.rank]
        self._early_sends = self._plan_early_sends(self.actions)
        self.stage_ids = {c: schedule.stage_of(self.rank, c) for c in schedule.chunks(self.rank)}
        self.chunks = {c: build_stage(model, s, schedule.num_stages, seed=seed).to(self.device) for c, s in self.stage_ids.items()}
        self.exec = executor(self.chunks, self.transport.engine) if executor else LocalExecutor(self.chunks)
        for mod in self.chunks.values():
            self._install_progress_hooks(mod)
        self.params = [p for c in sorted(self.chunks) for p in self.chunks[c].parameters()]
        # Split B/W: the chunks' weight GEMMs are deferred while this captures (any autograd thread).
        self._wgrad_deferral = WeightGradDeferral(self.params)
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
        # Activations and gradients travel on schedule-known channels (no per-message header);
        # each receive channel has as many ring buffers as the schedule ever holds at once.
        self._send_chs = {(a.peer, a.tag): self.transport.send_channel(
            a.peer, a.tag, shape=self.act_shape, dtype=torch.float32, kind=a.kind, dir=a.dir)
            for a in self.actions if isinstance(a, Send)}
        kinds = {(a.peer, a.tag): (a.kind, a.dir) for a in self.actions if isinstance(a, Recv)}
        self._recv_chs = {key: self.transport.recv_channel(
            key[0], key[1], shape=self.act_shape, dtype=torch.float32, kind=kinds[key][0], dir=kinds[key][1],
            ring=ring) for key, ring in self._plan_rings(self.actions).items()}
        self.trace = trace
        # The rank holding the other copy of my stages (DualPipe: my chunk c is its chunk 1 - c), if any.
        self.mirror = schedule.mirror_of(self.rank)
        # Where each chunk's gradients become final: its exchange with the mirror starts there and
        # travels during the rest of the step instead of after it.
        self._grads_final_after = self._plan_grads_final(self.actions) if self.mirror is not None else {}
        # chunk c -> (send channel of my chunk c's gradients, receive channel of the mirror's chunk c)
        self._mirror_chs = {c: (
            self.transport.send_channel(self.mirror, _CH_MIRROR + c, shape=tuple(self._grad_bufs[c].shape),
                                        dtype=torch.float32, kind="grad"),
            self.transport.recv_channel(self.mirror, _CH_MIRROR + c, shape=tuple(self._grad_bufs[1 - c].shape),
                                        dtype=torch.float32, kind="grad", ring=1))
            for c in (0, 1)} if self.mirror is not None else {}

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _plan_early_sends(actions) -> dict[int, list[int]]:
        """For each FB at index i: indices of the Sends of its forward's output listed after the pair
        (before the next compute). The executor posts them between the two halves so the activation
        travels while the backward computes; a pure function of the list, computed once."""
        plan: dict[int, list[int]] = {}
        for i, a in enumerate(actions):
            if not isinstance(a, FB):
                continue
            for j in range(i + 1, len(actions)):
                b = actions[j]
                if isinstance(b, (Compute, FB)):
                    break
                if isinstance(b, Send) and b.kind == "act" and (b.dir, b.mb, b.chunk) == (a.f.dir, a.f.mb, a.f.chunk):
                    plan.setdefault(i, []).append(j)
        return plan

    @staticmethod
    def _plan_rings(actions) -> dict[tuple[int, int], int]:
        """(peer, tag) of every receive channel -> the most receive buffers it holds at once.

        A received activation is the input leaf of its F and a received gradient feeds its B; the
        backward (and a deferred W, whose closures may keep either) reads their storage, so both
        stay held from their Recv until the last B/W of the same (dir, mb, chunk). A pure function
        of the action list, computed once (forward-only steps hold less: they release after F).
        """
        held: dict[tuple[int, int], int] = {}
        peak: dict[tuple[int, int], int] = {}
        by_key: dict[tuple, list[tuple[int, int]]] = {}
        for a in actions:
            if isinstance(a, Recv):
                ch = (a.peer, a.tag)
                held[ch] = held.get(ch, 0) + 1
                peak[ch] = max(peak.get(ch, 0), held[ch])
                by_key.setdefault((a.dir, a.mb, a.chunk), []).append(ch)
            for c in ((a.b,) if isinstance(a, FB) else (a,) if isinstance(a, Compute) else ()):
                if c.op == "W" or (c.op == "B" and not c.split):
                    for ch in by_key.pop((c.dir, c.mb, c.chunk), ()):
                        held[ch] -= 1
        return peak

    @staticmethod
    def _plan_grads_final(actions) -> dict[int, list[int]]:
        """Action index -> chunks whose last gradient-producing action (a full B or a W) it is."""
        last: dict[int, int] = {}
        for i, a in enumerate(actions):
            for c in ((a.f, a.b) if isinstance(a, FB) else (a,) if isinstance(a, Compute) else ()):
                if c.op == "W" or (c.op == "B" and not c.split):
                    last[c.chunk] = i
        plan: dict[int, list[int]] = {}
        for chunk, i in sorted(last.items()):
            plan.setdefault(i, []).append(chunk)
        return plan

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
        self._step = self.progress_step = step
        if self.heartbeat is not None:
            self.heartbeat.poke()
        self._recvs: dict[tuple, tuple] = {}
        self._held: dict[tuple, list] = {}
        self._inputs: dict[tuple, torch.Tensor] = {}
        self._graph: dict[tuple, tuple] = {}
        self._acts: dict[tuple, torch.Tensor] = {}
        self._grads: dict[tuple, torch.Tensor] = {}
        self._wgrads: dict[tuple, list] = {}
        self._losses: dict[int, float] = {}
        self._bad_losses: dict[int, float] = {}
        self._mirror_recvs: dict[int, object] = {}
        self._mirror_sends: dict[int, object] = {}
        self._compute_ns = 0
        for c, buf in self._grad_bufs.items():
            buf.zero_()
            # autograd accumulates into an existing .grad in place; a replaced one would break the view
            storage = buf.untyped_storage().data_ptr()
            assert all(p.grad is not None and p.grad.untyped_storage().data_ptr() == storage
                       for p in self.chunks[c].parameters()), f"rank {self.rank}: a .grad left chunk {c}'s buffer"
        for mod in self.chunks.values():
            mod.train()
            mod.reset_expert_load()
        self._run_actions(forward_only=False)
        leftovers = [k for d in (self._recvs, self._inputs, self._graph, self._wgrads, self._held) for k in d]
        assert not leftovers, f"rank {self.rank}: schedule left work undone: {leftovers[:8]}"
        t_tail = time.monotonic_ns()
        self.progress_action = "step end: mirror sum, grad norm, optimizer, losses"
        self.progress_count += 1
        self._sync_mirror_grads()
        self.exec.sync_grads()
        if inspect is not None:
            inspect(self)
        t_mirror = time.monotonic_ns()
        loads = self._step_expert_loads()
        norm = self._global_grad_norm()
        t_norm = time.monotonic_ns()
        if math.isfinite(norm):  # the same number on every rank: all ranks take the same branch
            self.optimizer.step(norm)
            for c, mod in self.chunks.items():
                mod.update_gate_bias(loads[c].to(self.device))
        else:
            self._nonfinite_step(step, norm)
        if self._bad_losses and math.isfinite(norm):
            self.log.warning("nonfinite_loss", step=step, microbatches=sorted(self._bad_losses))
        t_optim = time.monotonic_ns()
        losses = self._gather_losses()
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
        self.last_step_s, self.last_compute_s = (t_end - t_start) / 1e9, self._compute_ns / 1e9
        return StepResult(step=step, losses=losses, grad_norm=norm, seconds=(t_end - t_start) / 1e9,
                          compute_seconds=self._compute_ns / 1e9)

    @torch.no_grad()
    def forward_step(self, step: int) -> dict[int, torch.Tensor]:
        """Inference: the schedule's forwards only. Returns logits per global microbatch on the
        rank(s) holding the last stage (empty elsewhere)."""
        self._step = step
        self._recvs, self._acts, self._logits, self._held = {}, {}, {}, {}
        self._inputs, self._graph = {}, {}
        self._compute_ns = 0
        for mod in self.chunks.values():
            mod.eval()
        self._run_actions(forward_only=True)
        assert not self._recvs and not self._held, f"rank {self.rank}: receives left open: {list(self._recvs)[:8]}"
        self.transport.flush()
        return self._logits

    # ------------------------------------------------------------------ actions
    def _run_actions(self, *, forward_only: bool) -> None:
        done_early: set[int] = set()
        for i, a in enumerate(self.actions):
            if i in done_early:
                continue
            self.progress_action = a
            self.progress_count += 1
            if isinstance(a, FB):
                early = self._early_sends.get(i, ())
                done_early.update(early)

                def send_output(early=early) -> None:
                    for j in early:
                        self._do(self.actions[j], forward_only=forward_only)

                if forward_only:
                    self.exec.run(self._forward(a.f, True))
                    send_output()
                else:  # the executor may interleave the two (actors/fb_overlap.py)
                    self.exec.run_pair(self._forward(a.f, False), self._backward(a.b), after_first=send_output)
            else:
                self._do(a, forward_only=forward_only)
            if not forward_only:
                for chunk in self._grads_final_after.get(i, ()):
                    self._post_mirror_grads(chunk)

    def _do(self, a, *, forward_only: bool) -> None:
        if isinstance(a, Compute):
            if a.op == "F":
                self.exec.run(self._forward(a, forward_only))
            elif not forward_only:
                self.exec.run(self._backward(a)) if a.op == "B" else self._weight_grad(a)
        elif isinstance(a, Recv):
            if forward_only and a.kind == "grad":
                return
            ch = self._recv_chs[(a.peer, a.tag)]
            self._recvs[(a.kind, a.dir, a.mb, a.chunk)] = (ch, ch.post(mb=a.mb))
        elif isinstance(a, Send):
            if forward_only and a.kind == "grad":
                return
            src = self._acts if a.kind == "act" else self._grads
            out = self._staging.to_host(src.pop((a.dir, a.mb, a.chunk)))
            self._staging.hold(out, self._send_chs[(a.peer, a.tag)].send(out, mb=a.mb, chunk=a.chunk))
            self.transport.progress()  # start the transfer now, not at the next layer hook
        else:
            raise TypeError(f"rank {self.rank}: unknown action {a!r}")

    def _neighbour_chunk(self, dir: int, stage: int) -> int | None:
        """This rank's chunk that runs ``stage`` for ``dir``, or None if another rank does."""
        rank, chunk = self.schedule.place(dir, stage)
        return chunk if rank == self.rank else None

    def _take(self, kind: str, a: Compute, neighbour_stage: int) -> torch.Tensor:
        """Input (``act``) or output gradient (``grad``) of action ``a``: a posted receive, or the
        local hand-off from this rank's chunk that runs ``neighbour_stage``."""
        posted = self._recvs.pop((kind, a.dir, a.mb, a.chunk), None)
        if posted is not None:
            ch, op = posted
            t0 = time.monotonic_ns()
            out = self._staging.to_device(ch.wait(op))
            # a view of a ring buffer: held until this microbatch's last B / W (or its F, forward-only)
            self._held.setdefault((a.dir, a.mb, a.chunk), []).append(posted)
            if self.trace:
                log.record_span(spans.WAIT, t0, time.monotonic_ns(), kind=kind, dir=a.dir, mb=a.mb, chunk=a.chunk)
            return out
        local = self._neighbour_chunk(a.dir, neighbour_stage)
        store = self._acts if kind == "act" else self._grads
        key = (a.dir, a.mb, local)
        if local is None or key not in store:
            raise RuntimeError(f"rank {self.rank}: {a} needs its {kind} from stage {neighbour_stage}, which the "
                               f"schedule neither receives nor computes on this rank first")
        return store.pop(key)

    def _forward(self, a: Compute, forward_only: bool) -> Steps:
        stage = self.stage_ids[a.chunk]
        gmb = self.schedule.global_mb(a.dir, a.mb)
        key = (a.dir, a.mb, a.chunk)
        last = stage == self.schedule.num_stages - 1
        if stage == 0 or last:
            tokens, targets = (t.to(self.device) for t in self.data.batch(self._step, gmb, self.micro_batch))
        if stage == 0:
            x = tokens
        else:
            x = self._take("act", a, stage - 1)
            if not forward_only:
                # a leaf per chunk: each chunk's backward stops at its own input
                x = x.detach().requires_grad_()
                self._inputs[key] = x
        t0 = time.monotonic_ns()
        y, aux = yield from self.exec.forward_steps(a.chunk, key, x)
        if last:
            if forward_only:
                self._logits[gmb] = y
            else:
                loss = loss_fn(y, targets)
                self._losses[gmb] = value = loss.item()
                if not math.isfinite(value):  # free check: the loss is on the host already
                    self._bad_losses[gmb] = value
                scale = self.exec.loss_scale / self.schedule.microbatches
                total = loss * scale
                if aux.requires_grad:
                    total = total + aux * scale
                self._graph[key] = ((total,), (None,))
        else:
            self._acts[key] = y.detach()
            if not forward_only:
                roots, grads = (y,), [None]
                if aux.requires_grad:
                    roots = (y, aux)
                    grads.append(torch.tensor(1.0 / self.schedule.microbatches, device=self.device))
                self._graph[key] = (roots, grads)
        if forward_only:
            self._release(key)
        self._compute_done("F", a, t0)

    def _backward(self, a: Compute) -> Steps:
        stage = self.stage_ids[a.chunk]
        key = (a.dir, a.mb, a.chunk)
        roots, grads = self._graph.pop(key)
        if stage != self.schedule.num_stages - 1:
            grads = [self._take("grad", a, stage + 1), *grads[1:]]
        t0 = time.monotonic_ns()
        if a.split:
            with self._wgrad_deferral.capture() as pending:
                yield from self.exec.backward_steps(a.chunk, key, roots, grads)
            self._wgrads[key] = pending
        else:
            yield from self.exec.backward_steps(a.chunk, key, roots, grads)
        if stage != 0:
            self._grads[key] = self._inputs.pop(key).grad
        # Free the graph inside the span: tearing down a microbatch's autograd graph is part of
        # B's cost (about a millisecond here), not idle time between actions.
        del roots, grads
        if not a.split:
            self._release(key)
        self._compute_done("B", a, t0)

    def _weight_grad(self, a: Compute) -> None:
        pending = self._wgrads.pop((a.dir, a.mb, a.chunk))
        t0 = time.monotonic_ns()
        for fn in pending:
            fn()
            self.transport.progress()  # W has no layer hooks: move posted transfers between its GEMMs
        pending.clear()  # release the saved activations inside the span (part of W's cost)
        self._release((a.dir, a.mb, a.chunk))
        self._compute_done("W", a, t0)

    def _release(self, key: tuple) -> None:
        """Give the receive buffers microbatch ``key`` read back to their rings: nothing reads them now."""
        for ch, op in self._held.pop(key, ()):
            ch.release(op)

    def _compute_done(self, op: str, a: Compute, t0: int) -> None:
        t1 = time.monotonic_ns()
        self._compute_ns += t1 - t0
        self.flight.record("compute", t1, op=op, mb=a.mb, chunk=a.chunk, dur_us=(t1 - t0) // 1000)
        if self.trace:
            log.record_span(spans.COMPUTE, t0, t1, op=op, dir=a.dir, mb=a.mb, chunk=a.chunk,
                            stage=self.stage_ids[a.chunk], step=self._step)

    # ------------------------------------------------------------------ step end
    def _post_mirror_grads(self, chunk: int) -> None:
        """DualPipe: send chunk ``chunk``'s final gradients to the mirror and post the receive of
        the mirror's chunk ``chunk`` (the same stage as my chunk ``1 - chunk``)."""
        send_ch, recv_ch = self._mirror_chs[chunk]
        self._mirror_recvs[chunk] = recv_ch.post(mb=self._step)
        # sent in place: the buffer is not touched again until this send is done (_sync_mirror_grads)
        out = self._staging.to_host(self._grad_bufs[chunk])
        self._mirror_sends[chunk] = send_ch.send(out, mb=self._step, chunk=chunk)
        self._staging.hold(out, self._mirror_sends[chunk])
        self.transport.progress()

    def _sync_mirror_grads(self) -> None:
        """DualPipe: add the mirrored copy's gradients (both copies end bit-identical: a+b == b+a)."""
        if self.mirror is None:
            return
        if self.mirror == self.rank:
            raise AssertionError("dualpipe needs an even pp, so no rank is its own mirror")
        assert sorted(self._mirror_recvs) == [0, 1], f"rank {self.rank}: mirror exchange not posted for both chunks"
        for c in (0, 1):
            op = self._mirror_recvs.pop(c)
            theirs = self._mirror_chs[c][1].wait(op)  # the mirror's chunk c == my chunk 1 - c
            self._mirror_chs[1 - c][0].wait(self._mirror_sends.pop(1 - c))  # my chunk 1 - c has left: safe to add into it
            self._grad_bufs[1 - c].add_(self._staging.to_device(theirs))
            self._mirror_chs[c][1].release(op)

    def _step_expert_loads(self) -> dict[int, torch.Tensor]:
        """Each chunk's expert load for the step, summed over the mirrored copy under DualPipe."""
        loads = self.exec.expert_loads({c: m.expert_load().to("cpu", torch.float64) for c, m in self.chunks.items()})
        if self.mirror is None:
            return loads
        tp = self.transport
        hs = {c: tp.irecv(self.mirror, channel=_CH_LOAD, shape=tuple(loads[1 - c].shape), dtype=torch.float64,
                          expect={"chunk": c}) for c in (0, 1)}
        for c in (0, 1):
            tp.isend(self.mirror, loads[c].contiguous(), channel=_CH_LOAD, kind="ctrl", chunk=c)
        return {1 - c: loads[1 - c] + tp.wait(hs[c]) for c in (0, 1)}

    def _global_grad_norm(self) -> float:
        """L2 norm of all gradients, each stage counted once; rank 0 sums in rank order."""
        unique = [0] if self.mirror is not None else sorted(self.chunks)
        local = self.exec.grad_sq_sum(unique)
        tp = self.transport
        if self.rank == 0:
            hs = [tp.irecv(r, channel=_CH_NORM_UP, shape=(), dtype=torch.float64) for r in range(1, self.size)]
            total = local.clone()
            for h in hs:
                total += tp.wait(h)
            norm = total.sqrt().reshape(())
            for r in range(1, self.size):
                tp.isend(r, norm, channel=_CH_NORM_DOWN, kind="ctrl")
            return float(norm)
        tp.isend(0, local.reshape(()), channel=_CH_NORM_UP, kind="ctrl")
        return float(tp.recv(0, channel=_CH_NORM_DOWN, shape=(), dtype=torch.float64))

    def _gather_losses(self) -> list[float]:
        """Per-microbatch losses in global order on rank 0 (the last-stage ranks send theirs)."""
        tp = self.transport
        mine = torch.tensor(sorted(self._losses.items()), dtype=torch.float64).reshape(-1, 2)
        if self.rank != 0:
            tp.isend(0, mine, channel=_CH_LOSS, kind="ctrl")
            return []
        rows = [mine] + [tp.recv(r, channel=_CH_LOSS) for r in range(1, self.size)]
        table = torch.cat(rows)
        order = table[:, 0].long()
        if sorted(order.tolist()) != list(range(self.schedule.microbatches)):
            raise RuntimeError(f"losses came back for microbatches {sorted(order.tolist())}, expected "
                               f"0..{self.schedule.microbatches - 1}")
        return self.exec.microbatch_losses(table[order.argsort(), 1]).tolist()

    def _nonfinite_step(self, step: int, norm: float) -> None:
        """The step's gradient norm is NaN/Inf: locate it on this rank, log it, then stop (raise,
        where something was found) or skip the update (policy ``skip``: weights, AdamW state and
        gate biases stay as they were; the next step starts from them)."""
        found = nf.locate(self.chunks, self.stage_ids)
        text = nf.describe(step, norm, self.rank, found, self._bad_losses)
        # a warning (echoed to stderr) where something was found; the other ranks just note the skip
        (self.log.warning if found or self._bad_losses else self.log.info)(
            "nonfinite", step=step, norm=str(norm), policy=self.nonfinite, found=found,
            bad_losses={str(k): str(v) for k, v in self._bad_losses.items()}, message=text)
        for mod in self.chunks.values():
            mod.reset_expert_load()
        if self.nonfinite == "stop" and (found or self._bad_losses):
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
