"""actors.fb_overlap without MPI: exchanges are stand-ins that complete in a scripted order (what
the network would decide), so the interleaving run_pair produces can be checked step by step."""

from __future__ import annotations

import json

import torch

from actors.fb_overlap import WaitClock, drive, progress_hooks, run_pair
from runtime import log


class FakeEngine:
    """Completes ops in ``order`` (names), one per step of a wait, like a network delivering them."""

    def __init__(self, order: list[str]):
        self.order = list(order)
        self.ops: dict[str, FakeOp] = {}

    def wait(self, done, what, timeout=None):
        while not done():
            assert self.order, f"deadlock: {what()}"
            self.ops[self.order.pop(0)].finish()


class FakeOp:
    def __init__(self, engine: FakeEngine, name: str, nbytes: int = 8):
        self._ex = type("Ex", (), {"engine": engine, "name": "fake"})()
        self.name, self.done = name, False
        self.t_post, self.t_done = 1_000, None
        self.exchange_name, self.labels = "fake", {"phase": name, "link": "inter-node", "layer": 1, "mb": [0, 0, 0]}
        self.sent_bytes = {1: [nbytes]} if nbytes else {}
        engine.ops[name] = self

    def finish(self):
        self.done, self.t_done = True, 2_000

    def wait(self, timeout=None):
        self._ex.engine.wait(lambda: self.done, lambda: self.name, timeout)


def steps(engine: FakeEngine, name: str, n: int, trail: list[str]):
    """A chunk's steps: compute, post ``name0``, ... ``name{n-1}``; records each resume in ``trail``."""
    for k in range(n):
        trail.append(f"{name} computes {k}")
        yield FakeOp(engine, f"{name}{k}")
    trail.append(f"{name} ends")
    return name


def test_run_pair_resumes_whichever_exchange_lands_first():
    """Catches: strict alternation (or posting order) instead of completion order, the result of
    either half lost, ``after_first`` run late (after the backward's next segment) or not at all."""
    trail: list[str] = []
    eng = FakeEngine(["b0", "b1", "f0", "f1"])  # the backward's exchanges land first, twice
    out = run_pair(steps(eng, "f", 2, trail), steps(eng, "b", 2, trail),
                   after_first=lambda: trail.append("send forward output"))
    assert out == ("f", "b")
    assert trail == ["f computes 0", "b computes 0", "b computes 1", "b ends", "f computes 1", "f ends",
                     "send forward output"]
    trail.clear()
    eng = FakeEngine(["f0", "f1", "b0"])
    run_pair(steps(eng, "f", 2, trail), steps(eng, "b", 1, trail), after_first=lambda: trail.append("send"))
    assert trail == ["f computes 0", "b computes 0", "f computes 1", "f ends", "send", "b ends"]


def test_wait_clock_counts_blocked_time_and_logs_spans(tmp_path):
    """Catches: blocked time not counted under its label, a span for an exchange that posted nothing
    (rows to itself only), spans logged without ``trace``, and wrong span fields."""
    log.configure(run_id="fb", rank=0, role="test", log_dir=tmp_path)
    eng = FakeEngine(["f0"])
    clock = WaitClock(trace=True)
    trail: list[str] = []
    assert drive(steps(eng, "f", 1, trail), clock, "other") == "f"
    local = FakeOp(FakeEngine([]), "local", nbytes=0)
    local.done, local.t_done = True, local.t_post
    clock.finished(local, "fb", 0)
    WaitClock().finished(FakeOp(FakeEngine([]), "untraced"), "fb", 0)
    log.flush()
    assert set(clock.take()) == {"other"} and clock.take() == {}
    recs = [json.loads(x) for x in (tmp_path / "fb" / "rank-0.jsonl").read_text().splitlines()]
    ex = [r for r in recs if r.get("span") == "exchange"]
    assert len(ex) == 1, ex
    assert {k: ex[0][k] for k in ("t0", "t1", "phase", "link", "nbytes", "peers", "context")} == \
        {"t0": 1_000, "t1": 2_000, "phase": "f0", "link": "inter-node", "nbytes": 8, "peers": 1, "context": "other"}


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.ffn = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)


def test_progress_hooks_fire_in_forward_and_backward_when_submodules_are_called():
    """Catches: hooks on the block (which an EP chunk never calls as a whole) instead of its attention
    / ffn, and no progress during the backward."""
    calls = []
    blocks = [Block(), Block()]
    handles = progress_hooks(blocks, lambda: calls.append(1))
    assert len(handles) == 4
    x = torch.randn(2, 4, requires_grad=True)
    for b in blocks:
        x = x + b.ffn(b.attn(x))
    assert len(calls) == 4
    x.sum().backward()
    assert len(calls) == 8
    for h in handles:
        h.remove()
