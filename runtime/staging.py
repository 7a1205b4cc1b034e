"""Device tensors across a host-memory transport: staged through reused pinned host buffers.

MPI is handed host memory only. A device tensor is copied into a page-locked host buffer before it
is sent (the copy is synchronous, so MPI never reads memory that a device stream is still
producing), and a received host tensor is copied onto the device before use. Buffers are pooled
per (shape, dtype) and reused once the send that read one is done: no allocation per message.

Device buffers handed to MPI directly (CUDA-aware MPI) are not used: mpi4py exposes no
``MPIX_Query_cuda_support``, the transport posts host addresses only, and the pipeline's messages
are small enough here that the staging copy is not the bottleneck. On the CPU every method is the
identity, so the CPU path (and its tests) is unchanged.
"""

from __future__ import annotations

from collections import defaultdict

import torch

__all__ = ["HostStaging"]


class HostStaging:
    """Per-actor pool of pinned host buffers for one compute device."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self._free: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        self._busy: list[tuple[torch.Tensor, object]] = []  # (buffer, send handle with .done)

    @property
    def active(self) -> bool:
        """False on the CPU: tensors are already in host memory and pass through untouched."""
        return self.device.type != "cpu"

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        """A host copy of ``t`` in a pooled pinned buffer (``t`` itself on the CPU). Pass the send
        that reads it to :meth:`hold` so the buffer returns to the pool when that send is done."""
        if t.is_cpu:
            return t
        self._reclaim()
        key = (tuple(t.shape), t.dtype)
        pool = self._free[key]
        buf = pool.pop() if pool else torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        buf.copy_(t)  # synchronous: the producing stream has finished when this returns
        return buf

    def hold(self, buf: torch.Tensor, send) -> None:
        """Keep ``buf`` out of the pool until ``send.done`` (no-op for a tensor not from the pool)."""
        if self.active and buf.is_pinned():
            self._busy.append((buf, send))

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (received in host memory) on this device; synchronous, so the host buffer may be
        reused by the transport as soon as this returns."""
        return t if not self.active else t.to(self.device)

    def _reclaim(self) -> None:
        still = []
        for buf, send in self._busy:
            if send.done:
                self._free[(tuple(buf.shape), buf.dtype)].append(buf)
            else:
                still.append((buf, send))
        self._busy = still
