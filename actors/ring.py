"""RingActor: every rank passes tensors around a ring — a live check of the runtime.

Each round, every rank sends a tensor to its right neighbour and receives one from its left
neighbour (receive posted before the send), adds its rank into it and passes it on. After a full
lap a tensor has collected every rank, so its value is checked against the closed form.
"""

from __future__ import annotations

import time

import torch

from runtime.actor import Actor

__all__ = ["RingActor"]


class RingActor(Actor):
    role = "ring"

    def __init__(self, *, laps: int, numel: int, dtype: torch.dtype = torch.float32, **kwargs):
        super().__init__(**kwargs)
        if laps < 1 or numel < 0:
            raise ValueError(f"laps={laps} must be >= 1 and numel={numel} >= 0")
        self.laps, self.numel, self.dtype = laps, numel, dtype

    def main(self) -> dict:
        right, left = (self.rank + 1) % self.size, (self.rank - 1) % self.size
        x = torch.zeros(self.numel, dtype=self.dtype)
        t0 = time.perf_counter()
        for hop in range(self.laps * self.size):
            h = self.transport.irecv(left, channel=0, shape=(self.numel,), dtype=self.dtype, expect={"mb": hop})
            self.transport.isend(right, x, channel=0, mb=hop)
            x = self.transport.wait(h) + self.rank
        secs = time.perf_counter() - t0
        want = float(self.laps * sum(range(self.size)))  # each lap adds every rank once
        ok = bool(self.numel == 0 or torch.all(x == want))
        if not ok:
            raise RuntimeError(f"ring: tensor holds {x[:4].tolist()}..., expected {want}")
        self.log.info("ring_done", laps=self.laps, numel=self.numel, seconds=secs)
        return {"hops": self.laps * self.size, "seconds": secs, "value": want}
