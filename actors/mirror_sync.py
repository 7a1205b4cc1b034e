"""DualPipe's mirror: the gradients and expert loads of the two copies of every stage, summed.

Under a layout with two model copies (``Schedule.mirror_of``), rank r and its mirror hold the same
two stages with the chunks swapped (my chunk c is the mirror's chunk 1 - c) and are data-parallel
peers for them. Each chunk's gradients leave for the mirror as soon as the chunk's last B/W of the
step is done (:meth:`MirrorSync.post`), travelling during the rest of the step; at the step end
they are added (:meth:`MirrorSync.add_theirs`), so both copies end bit-identical (a+b == b+a).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from runtime.staging import HostStaging
from runtime.transport import Transport

__all__ = ["MirrorSync", "CH_MIRROR", "CH_LOAD"]

# Control channels between pipeline ranks; the schedule's own tags are small (0..3).
# CH_MIRROR + c carries the sender's chunk-c gradients (one channel per chunk: the two chunks'
# gradients become final at different points of the step, in either order).
CH_MIRROR, CH_LOAD = 16, 18


class MirrorSync:
    """The mirror exchange of one rank: ``grad_bufs[c]`` is chunk c's flat gradient buffer."""

    def __init__(self, transport: Transport, staging: HostStaging, mirror: int, grad_bufs: Mapping[int, torch.Tensor]):
        if sorted(grad_bufs) != [0, 1]:
            raise ValueError(f"mirror exchange needs chunks 0 and 1, got {sorted(grad_bufs)}")
        self.tp, self.staging, self.mirror, self.grad_bufs = transport, staging, mirror, grad_bufs
        if mirror == transport.rank:
            raise AssertionError("a rank is never its own mirror (dualpipe needs an even pp)")
        # chunk c -> (send channel of my chunk c's gradients, receive channel of the mirror's chunk c)
        self.chs = {c: (
            transport.send_channel(mirror, CH_MIRROR + c, shape=tuple(grad_bufs[c].shape), dtype=torch.float32,
                                   kind="grad"),
            transport.recv_channel(mirror, CH_MIRROR + c, shape=tuple(grad_bufs[1 - c].shape), dtype=torch.float32,
                                   kind="grad", ring=1))
            for c in (0, 1)}
        self._recvs: dict[int, object] = {}
        self._sends: dict[int, object] = {}

    def post(self, chunks: Sequence[int], step: int) -> None:
        """For each chunk c of ``chunks`` (its gradients are final): send them to the mirror and post
        the receive of the mirror's chunk c (the same stage as my chunk ``1 - c``)."""
        for chunk in chunks:
            send_ch, recv_ch = self.chs[chunk]
            self._recvs[chunk] = recv_ch.post(mb=step)
            # sent in place: the buffer is not touched again until this send is done (add_theirs)
            out = self.staging.to_host(self.grad_bufs[chunk])
            self._sends[chunk] = send_ch.send(out, mb=step, chunk=chunk)
            self.staging.hold(out, self._sends[chunk])
            self.tp.progress()

    def add_theirs(self) -> None:
        """Add the mirror's copy of each of my chunks' gradients into mine."""
        assert sorted(self._recvs) == [0, 1], f"rank {self.tp.rank}: mirror exchange not posted for both chunks"
        for c in (0, 1):
            op = self._recvs.pop(c)
            theirs = self.chs[c][1].wait(op)  # the mirror's chunk c == my chunk 1 - c
            self.chs[1 - c][0].wait(self._sends.pop(1 - c))  # my chunk 1 - c has left: safe to add into it
            self.grad_bufs[1 - c].add_(self.staging.to_device(theirs))
            self.chs[c][1].release(op)

    def sum_loads(self, loads: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Each chunk's expert load (``[moe_layers, experts]`` float64, CPU) plus the mirror's copy's."""
        tp = self.tp
        hs = {c: tp.irecv(self.mirror, channel=CH_LOAD, shape=tuple(loads[1 - c].shape), dtype=torch.float64,
                          expect={"chunk": c}) for c in (0, 1)}
        for c in (0, 1):
            tp.isend(self.mirror, loads[c].contiguous(), channel=CH_LOAD, kind="ctrl", chunk=c)
        return {1 - c: loads[1 - c] + tp.wait(hs[c]) for c in (0, 1)}
