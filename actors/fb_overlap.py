"""The overlapped F&B program: one microbatch's forward and another's backward, interleaved so that
each one's exchanges travel while the other computes (DeepSeek-V3's pairing, report Fig. 4).

A chunk's forward or backward is a *steps* generator: it computes until it has posted an exchange
(:class:`~runtime.exchange.ExchangeOp`), yields it, and is resumed once the op is done; its return
value is the result. :func:`drive` runs one alone (each op waited for at once).
:func:`run_pair` interleaves two: the forward computes to its first exchange, the backward to its
first, then whichever one's exchange completes first computes its next segment while the other's
travels, and so on; when one ends the other runs alone. Which one resumes first depends on arrival
times, so the two must post on *separate* exchange streams (:class:`~runtime.exchange.Exchange`
objects; the EP executor gives forwards and backwards one each): each stream's posting order is
then still the program's, the same on every rank of an EP group.

:class:`WaitClock` adds up the time spent blocked on exchanges (the *exposed* communication) and,
with ``trace``, logs every finished exchange as an ``exchange`` span (:mod:`runtime.spans`: post to
completion, the time blocked on it, its labels, bytes sent). :func:`progress_hooks` lets the
exchanges advance *during* a chunk's compute: hooks on every block's attention and feed-forward
call the engine's progress in the forward and, through a gradient hook, in the backward, so one
microbatch's exchange moves while the other microbatch computes between two of its own exchanges.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterable

import torch

from runtime import log, spans
from runtime.exchange import ExchangeOp, wait_any

__all__ = ["Steps", "WaitClock", "drive", "run_pair", "progress_hooks"]

Steps = Generator[ExchangeOp, None, object]


class WaitClock:
    """Nanoseconds blocked in exchange waits, by label (e.g. ``fb`` / ``other``); with ``trace``,
    one ``exchange`` span per finished op (:meth:`finished`)."""

    def __init__(self, *, trace: bool = False) -> None:
        self.ns: dict[str, int] = {}
        self.trace = trace

    def wait(self, op: ExchangeOp, label: str) -> None:
        t0 = time.perf_counter_ns()
        op.wait()
        blocked = time.perf_counter_ns() - t0
        self.add(label, blocked)
        self.finished(op, label, blocked)

    def add(self, label: str, ns: int) -> None:
        self.ns[label] = self.ns.get(label, 0) + ns

    def finished(self, op: ExchangeOp, label: str, blocked_ns: int) -> None:
        """``op`` is done and its steps resume; ``blocked_ns`` of this rank's time went to waiting
        for it (0 when it had landed while the rank computed). Logs its span when tracing."""
        if self.trace and op.t_done != op.t_post:  # else it posted nothing (rows to itself only)
            log.record_span(spans.EXCHANGE, op.t_post, op.t_done, exchange=op.exchange_name, **op.labels,
                            nbytes=sum(sum(b) for b in op.sent_bytes.values()), peers=len(op.sent_bytes),
                            context=label, wait_us=blocked_ns / 1e3)

    def take(self) -> dict[str, float]:
        """Seconds per label since the last call (and reset)."""
        out = {k: v / 1e9 for k, v in self.ns.items()}
        self.ns = {}
        return out


def drive(steps: Steps, clock: WaitClock | None = None, label: str = "other") -> object:
    """Run ``steps`` alone, waiting for each exchange at once; returns its result."""
    while True:
        try:
            op = next(steps)
        except StopIteration as stop:
            return stop.value
        clock.wait(op, label) if clock is not None else op.wait()


def run_pair(first: Steps, second: Steps, *, after_first: Callable[[], None] | None = None,
             clock: WaitClock | None = None, label: str = "fb") -> tuple[object, object]:
    """Run ``first`` and ``second`` interleaved (module docstring); ``after_first`` runs as soon as
    ``first`` has returned (e.g. post the send of the forward's output). Returns both results."""
    gens, ops, out = [first, second], [None, None], [None, None]
    live = [True, True]

    def resume(i: int) -> None:
        try:
            ops[i] = next(gens[i])
        except StopIteration as stop:
            live[i], out[i] = False, stop.value
            if i == 0 and after_first is not None:
                after_first()

    resume(0)
    resume(1)
    while live[0] and live[1]:
        t0 = time.perf_counter_ns()
        i = wait_any(ops)
        if clock is not None:
            blocked = time.perf_counter_ns() - t0
            clock.add(label, blocked)
            clock.finished(ops[i], label, blocked)
        resume(i)
    for i in (0, 1):
        while live[i]:
            clock.wait(ops[i], label) if clock is not None else ops[i].wait()
            resume(i)
    return out[0], out[1]


def progress_hooks(blocks: Iterable[torch.nn.Module], progress: Callable[[], object]) -> list:
    """Call ``progress()`` after the attention and the feed-forward of every block in ``blocks``
    (those with ``attn`` / ``ffn`` submodules) and again when the gradient of each one's output
    arrives in the backward. The hooks sit on the submodules, not the block, because an expert-
    parallel chunk calls them one by one (its MoE feed-forward is cut into segments, whose own
    exchanges progress the engine). Returns the hook handles."""

    def forward_hook(_mod, _inp, out):
        progress()
        if torch.is_tensor(out) and out.requires_grad:
            out.register_hook(lambda g: (progress(), g)[1])

    return [getattr(b, name).register_forward_hook(forward_hook) for b in blocks for name in ("attn", "ffn")
            if isinstance(getattr(b, name, None), torch.nn.Module)]
