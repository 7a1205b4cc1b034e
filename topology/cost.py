"""Link and compute cost model: token counts per link class and device speed -> seconds.

A hop is a ``[senders, receivers]`` matrix of token counts over one link class. Every device has
its own link of that class (V3: one NIC per GPU, NVLink per GPU), full duplex, so a hop takes as
long as its busiest device's side: ``bytes / bandwidth + messages * latency``, the larger of what
it sends and what it receives; the diagonal (a rank to itself) costs nothing. Compute time is
FLOPs over the device's speed times the reference throughput (:data:`topology.kinds.REFERENCE_FLOPS`,
re-exported here), the same figure the full-scale plan uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from topology.cluster import LinkClass
from topology.kinds import REFERENCE_FLOPS

__all__ = ["REFERENCE_FLOPS", "HopCost", "hop_cost", "compute_seconds"]

@dataclass(frozen=True, slots=True)
class HopCost:
    """What one hop moves over one link class, and how long its busiest device takes."""

    link: str
    """Link class name."""
    total_bytes: int
    """Bytes over the link, all devices."""
    max_device_bytes: int
    """Bytes the busiest device sends or receives."""
    max_device_messages: int
    """Messages (non-empty peer pairs) the busiest device sends or receives."""
    seconds: float
    """Time of the busiest device: bytes / bandwidth + messages * latency."""


def hop_cost(counts: np.ndarray, token_bytes: int, link: LinkClass) -> HopCost:
    """counts: ``[ranks, ranks]`` tokens sender -> receiver over ``link`` (diagonal ignored)."""
    c = np.array(counts, dtype=np.int64)
    if c.ndim != 2 or c.shape[0] != c.shape[1] or (c < 0).any():
        raise ValueError(f"counts: shape {c.shape}; expected a square matrix of non-negative token counts")
    np.fill_diagonal(c, 0)
    b = c * token_bytes
    m = (c > 0).astype(np.int64)
    bw = link.bandwidth_gbs * 1e9
    lat = link.latency_us * 1e-6
    send = b.sum(1) / bw + m.sum(1) * lat
    recv = b.sum(0) / bw + m.sum(0) * lat
    return HopCost(link=link.name, total_bytes=int(b.sum()), max_device_bytes=int(max(b.sum(1).max(), b.sum(0).max())),
                   max_device_messages=int(max(m.sum(1).max(), m.sum(0).max())),
                   seconds=float(max(send.max(), recv.max())))


def compute_seconds(flops: np.ndarray, speed: np.ndarray) -> float:
    """Time of the slowest device: ``max(flops / (speed * REFERENCE_FLOPS))`` over ``[devices]``."""
    flops = np.asarray(flops, dtype=np.float64)
    speed = np.asarray(speed, dtype=np.float64)
    if flops.shape != speed.shape or (speed <= 0).any():
        raise ValueError("compute_seconds: flops and speed must be [devices] arrays with positive speeds")
    return float((flops / (speed * REFERENCE_FLOPS)).max())
