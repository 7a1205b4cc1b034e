"""Walking one rank's action list for a step: the pipeline executor proper.

* ``Recv``: post a receive on its schedule-known channel into a ring buffer
  ``[micro_batch, seq, hidden]``, at once; the buffer goes back after the microbatch's last B/W.
* ``F``: take the input (tokens at stage 0, else the posted receive or the local hand-off from this
  rank's other chunk), run the chunk, keep the graph; the last stage computes the loss.
* ``B``: take the output gradient (from the loss, a receive or a local hand-off) and run backward
  for the chunk's inputs; a ``split`` B defers the weight GEMMs (:mod:`kernels.wgrad`) to ``W``.
* ``FB``: the forward of one direction, then the backward of the other; the forward's send is
  posted before the backward starts so it travels while the backward computes.
* ``Send``: post the activation / input gradient to the peer; it completes during later work.

Every decision about order lives in the schedule (data); this only walks it. What the walk needs
to know about the list ahead of time is planned once (:mod:`actors.action_plan`); what actions hand
each other during a step lives in a :class:`~actors.step_state.StepState`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping

import torch

from actors import action_plan
from actors.chunk_exec import ChunkExecutor
from actors.data import TokenSource
from actors.fb_overlap import Steps
from actors.model import loss_fn
from actors.step_state import StepState
from kernels import WeightGradDeferral
from runtime import log, spans
from runtime.flight import FlightRecorder
from runtime.schedules import FB, Action, Compute, Recv, Schedule, Send
from runtime.staging import HostStaging
from runtime.transport import Transport

__all__ = ["ActionWalker"]


class ActionWalker:
    """Walks ``schedule.ranks[rank]`` once per step over the chunks ``exec`` runs."""

    def __init__(self, *, schedule: Schedule, rank: int, stage_ids: Mapping[int, int], exec: ChunkExecutor,
                 transport: Transport, staging: HostStaging, data: TokenSource, micro_batch: int,
                 act_shape: tuple[int, int, int], device: torch.device, wgrad_deferral: WeightGradDeferral,
                 flight: FlightRecorder, trace: bool, status: Callable[[Action], None]):
        """``stage_ids``: chunk -> global stage; ``act_shape``: ``[micro_batch, seq, hidden]`` of every
        activation and gradient message; ``status(action)``: told before each action (the actor's
        progress report for the supervisor)."""
        self.schedule, self.rank, self.stage_ids, self.exec = schedule, rank, stage_ids, exec
        self.tp, self.staging, self.data, self.micro_batch, self.device = transport, staging, data, micro_batch, device
        self.wgrad_deferral, self.flight, self.trace, self.status = wgrad_deferral, flight, trace, status
        self.actions = schedule.ranks[rank]
        self.last_stage = schedule.num_stages - 1
        self._early_sends = action_plan.early_sends(self.actions)
        # drawn ahead, in this order, while the rank waits for a message
        self._draws = action_plan.data_draws(self.actions, stage_ids, (0, self.last_stage), schedule.global_mb)
        # Activations and gradients travel on schedule-known channels (no per-message header);
        # each receive channel has as many ring buffers as the schedule ever holds at once.
        self._send_chs = {(a.peer, a.tag): transport.send_channel(
            a.peer, a.tag, shape=act_shape, dtype=torch.float32, kind=a.kind, dir=a.dir)
            for a in self.actions if isinstance(a, Send)}
        kinds = {(a.peer, a.tag): (a.kind, a.dir) for a in self.actions if isinstance(a, Recv)}
        self._recv_chs = {key: transport.recv_channel(
            key[0], key[1], shape=act_shape, dtype=torch.float32, kind=kinds[key][0], dir=kinds[key][1],
            ring=ring) for key, ring in action_plan.ring_sizes(self.actions).items()}
        self.st = StepState(step=-1)

    def walk(self, step: int, *, forward_only: bool,
             after: Mapping[int, Callable[[], None]] | None = None) -> StepState:
        """Run every action for step ``step``; ``after[i]()`` runs right after action ``i``. Returns
        the step's state (losses, logits, compute time; the rest must be empty)."""
        st = self.st = StepState(step=step)
        after = after or {}
        done_early: set[int] = set()
        for i, a in enumerate(self.actions):
            if i in done_early:
                continue
            self.status(a)
            if isinstance(a, FB):
                early = self._early_sends.get(i, ())
                done_early.update(early)

                def send_output(early=early) -> None:
                    for j in early:
                        self._do(self.actions[j], forward_only)

                if forward_only:
                    self.exec.run(self._forward(a.f, True))
                    send_output()
                else:  # the executor may interleave the two (actors/fb_overlap.py)
                    self.exec.run_pair(self._forward(a.f, False), self._backward(a.b), after_first=send_output)
            else:
                self._do(a, forward_only)
            hook = after.get(i)
            if hook is not None:
                hook()
        return st

    def _do(self, a: Action, forward_only: bool) -> None:
        st = self.st
        if isinstance(a, Compute):
            if a.op == "F":
                self.exec.run(self._forward(a, forward_only))
            elif not forward_only:
                self.exec.run(self._backward(a)) if a.op == "B" else self._weight_grad(a)
        elif isinstance(a, Recv):
            if forward_only and a.kind == "grad":
                return
            ch = self._recv_chs[(a.peer, a.tag)]
            st.recvs[(a.kind, a.dir, a.mb, a.chunk)] = (ch, ch.post(mb=a.mb))
        elif isinstance(a, Send):
            if forward_only and a.kind == "grad":
                return
            src = st.acts if a.kind == "act" else st.grads
            out = self.staging.to_host(src.pop((a.dir, a.mb, a.chunk)))
            self.staging.hold(out, self._send_chs[(a.peer, a.tag)].send(out, mb=a.mb, chunk=a.chunk))
            self.tp.progress()  # start the transfer now, not at the next layer hook
        else:
            raise TypeError(f"rank {self.rank}: unknown action {a!r}")

    def _take(self, kind: str, a: Compute, neighbour_stage: int) -> torch.Tensor:
        """Input (``act``) or output gradient (``grad``) of action ``a``: a posted receive, or the
        local hand-off from this rank's chunk that runs ``neighbour_stage``."""
        st = self.st
        posted = st.recvs.pop((kind, a.dir, a.mb, a.chunk), None)
        if posted is not None:
            ch, op = posted
            if not op.done and st.num_drawn < len(self._draws):
                self._batch(self._draws[st.num_drawn])  # draw ahead: the message is not here yet
            t0 = time.monotonic_ns()
            out = self.staging.to_device(ch.wait(op))
            # a view of a ring buffer: held until this microbatch's last B / W (or its F, forward-only)
            st.held.setdefault((a.dir, a.mb, a.chunk), []).append(posted)
            if self.trace:
                log.record_span(spans.WAIT, t0, time.monotonic_ns(), kind=kind, dir=a.dir, mb=a.mb, chunk=a.chunk)
            return out
        rank, local = self.schedule.place(a.dir, neighbour_stage)
        store = st.acts if kind == "act" else st.grads
        key = (a.dir, a.mb, local)
        if rank != self.rank or key not in store:
            raise RuntimeError(f"rank {self.rank}: {a} needs its {kind} from stage {neighbour_stage}, which the "
                               f"schedule neither receives nor computes on this rank first")
        return store.pop(key)

    def _forward(self, a: Compute, forward_only: bool) -> Steps:
        st = self.st
        stage = self.stage_ids[a.chunk]
        gmb = self.schedule.global_mb(a.dir, a.mb)
        key = (a.dir, a.mb, a.chunk)
        last = stage == self.last_stage
        if stage == 0 or last:
            tokens, targets = self._batch(gmb)
        if stage == 0:
            x = tokens
        else:
            x = self._take("act", a, stage - 1)
            if not forward_only:
                # a leaf per chunk: each chunk's backward stops at its own input
                x = x.detach().requires_grad_()
                st.inputs[key] = x
        t0 = time.monotonic_ns()
        y, aux = yield from self.exec.forward_steps(a.chunk, key, x)
        if last:
            if forward_only:
                st.logits[gmb] = y
            else:
                loss = loss_fn(y, targets)
                st.losses[gmb] = value = loss.item()
                if not math.isfinite(value):  # free check: the loss is on the host already
                    st.bad_losses[gmb] = value
                scale = self.exec.loss_scale / self.schedule.microbatches
                total = loss * scale
                if aux.requires_grad:
                    total = total + aux * scale
                st.graph[key] = ((total,), (None,))
        else:
            st.acts[key] = y.detach()
            if not forward_only:
                roots, grads = (y,), [None]
                if aux.requires_grad:
                    roots = (y, aux)
                    grads.append(torch.tensor(1.0 / self.schedule.microbatches, device=self.device))
                st.graph[key] = (roots, grads)
        if forward_only:
            self._release(key)
        self._compute_done("F", a, t0)

    def _backward(self, a: Compute) -> Steps:
        st = self.st
        stage = self.stage_ids[a.chunk]
        key = (a.dir, a.mb, a.chunk)
        roots, grads = st.graph.pop(key)
        if stage != self.last_stage:
            grads = [self._take("grad", a, stage + 1), *grads[1:]]
        t0 = time.monotonic_ns()
        if a.split:
            with self.wgrad_deferral.capture() as pending:
                yield from self.exec.backward_steps(a.chunk, key, roots, grads)
            st.wgrads[key] = pending
        else:
            yield from self.exec.backward_steps(a.chunk, key, roots, grads)
        if stage != 0:
            st.grads[key] = st.inputs.pop(key).grad
        # Free the graph inside the span: tearing down a microbatch's autograd graph is part of
        # B's cost (about a millisecond here), not idle time between actions.
        del roots, grads
        if not a.split:
            self._release(key)
        self._compute_done("B", a, t0)

    def _weight_grad(self, a: Compute) -> None:
        pending = self.st.wgrads.pop((a.dir, a.mb, a.chunk))
        t0 = time.monotonic_ns()
        for fn in pending:
            fn()
            self.tp.progress()  # W has no layer hooks: move posted transfers between its GEMMs
        pending.clear()  # release the saved activations inside the span (part of W's cost)
        self._release((a.dir, a.mb, a.chunk))
        self._compute_done("W", a, t0)

    def _batch(self, gmb: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Global microbatch ``gmb``'s (tokens, targets) on this rank's device, drawn once per step."""
        st = self.st
        got = st.batches.get(gmb)
        if got is None:
            got = st.batches[gmb] = tuple(t.to(self.device) for t in self.data.batch(st.step, gmb, self.micro_batch))
            while st.num_drawn < len(self._draws) and self._draws[st.num_drawn] in st.batches:
                st.num_drawn += 1
        return got

    def _release(self, key: tuple) -> None:
        """Give the receive buffers microbatch ``key`` read back to their rings: nothing reads them now."""
        for ch, op in self.st.held.pop(key, ()):
            ch.release(op)

    def _compute_done(self, op: str, a: Compute, t0: int) -> None:
        t1 = time.monotonic_ns()
        self.st.compute_ns += t1 - t0
        self.flight.record("compute", t1, op=op, mb=a.mb, chunk=a.chunk, dur_us=(t1 - t0) // 1000)
        if self.trace:
            log.record_span(spans.COMPUTE, t0, t1, op=op, dir=a.dir, mb=a.mb, chunk=a.chunk,
                            stage=self.stage_ids[a.chunk], step=self.st.step)
