"""What a rank's executor needs to know about its action list before walking it: pure functions of
the list, computed once when the :class:`~actors.pipeline.StageActor` is built (plans are data)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from runtime.schedules import FB, Action, Compute, Recv, Send

__all__ = ["early_sends", "ring_sizes", "grads_final", "data_draws"]


def _computes(a: Action) -> tuple[Compute, ...]:
    return (a.f, a.b) if isinstance(a, FB) else (a,) if isinstance(a, Compute) else ()


def _ends_grads(c: Compute) -> bool:
    """Whether ``c`` is the last gradient-producing pass of its microbatch: a full B or a W."""
    return c.op == "W" or (c.op == "B" and not c.split)


def early_sends(actions: Sequence[Action]) -> dict[int, list[int]]:
    """For each FB at index i: indices of the Sends of its forward's output listed after the pair
    (before the next compute). The executor posts them between the two halves so the activation
    travels while the backward computes."""
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


def ring_sizes(actions: Sequence[Action]) -> dict[tuple[int, int], int]:
    """(peer, tag) of every receive channel -> the most receive buffers it holds at once.

    A received activation is the input leaf of its F and a received gradient feeds its B; the
    backward (and a deferred W, whose closures may keep either) reads their storage, so both stay
    held from their Recv until the last B/W of the same (dir, mb, chunk) (forward-only steps hold
    less: they release after F).
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
        b = a.b if isinstance(a, FB) else a
        if isinstance(b, Compute) and _ends_grads(b):
            for ch in by_key.pop((b.dir, b.mb, b.chunk), ()):
                held[ch] -= 1
    return peak


def grads_final(actions: Sequence[Action]) -> dict[int, list[int]]:
    """Action index -> chunks whose last gradient-producing action (a full B or a W) it is."""
    last: dict[int, int] = {}
    for i, a in enumerate(actions):
        for c in _computes(a):
            if _ends_grads(c):
                last[c.chunk] = i
    plan: dict[int, list[int]] = {}
    for chunk, i in sorted(last.items()):
        plan.setdefault(i, []).append(chunk)
    return plan


def data_draws(actions: Sequence[Action], stage_of: Mapping[int, int], data_stages: tuple[int, ...],
               global_mb: Callable[[int, int], int]) -> list[int]:
    """Global microbatches whose data (tokens, targets) this rank reads, in the order its forwards
    first need them: every F (alone or an FB's half) of a chunk whose stage (``stage_of[chunk]``)
    is in ``data_stages`` (the first and the last), each microbatch once. The executor draws them
    ahead, in this order, while it waits for messages."""
    seen: dict[int, None] = {}
    for a in actions:
        for c in _computes(a):
            if c.op == "F" and stage_of[c.chunk] in data_stages:
                seen.setdefault(global_mb(c.dir, c.mb))
    return list(seen)
