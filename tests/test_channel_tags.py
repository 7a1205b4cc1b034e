"""Transport's tag layout for schedule-known channels, on this MPI and on one with the standard's
lowest tag bound (32767): blocks never overlap the dynamic tags or each other, stay under the
bound, keep at least 2 position and 4 microbatch bits, and a bound too low is refused."""

from __future__ import annotations

import pytest
from mpi4py import MPI

from runtime.transport import Transport, TransportConfig


class _TagBound:
    """COMM_SELF with another TAG_UB (what Transport reads of the communicator's limits)."""

    def __init__(self, tag_ub: int):
        self.tag_ub = tag_ub

    def Get_rank(self) -> int:
        return 0

    def Get_size(self) -> int:
        return 1

    def Get_attr(self, key):
        return self.tag_ub if key == MPI.TAG_UB else MPI.COMM_SELF.Get_attr(key)


@pytest.mark.parametrize("tag_ub,max_channels,bits", [(MPI.COMM_SELF.Get_attr(MPI.TAG_UB), 1024, (4, 6)),
                                                      (32767, 400, (2, 4)), (32767, 16, (4, 6)),
                                                      ((1 << 23) - 1, 1024, (4, 6))])
def test_blocks_fit_under_the_bound_apart_from_the_dynamic_tags(tag_ub, max_channels, bits):
    tp = Transport(_TagBound(tag_ub), TransportConfig(max_channels=max_channels))
    try:
        assert tp.channel_tag_bits == bits
        block = 1 << sum(bits)
        starts = [tp.channel_tag(0, c) for c in range(max_channels)]
        assert starts[0] >= 2 * max_channels  # above every dynamic channel's two tags
        assert all(b - a == block for a, b in zip(starts, starts[1:]))  # adjacent, not overlapping
        assert starts[-1] + block - 1 <= tag_ub
    finally:
        tp.engine.close()


def test_a_bound_too_low_for_max_channels_is_refused_naming_the_fix():
    with pytest.raises(ValueError, match=r"max_channels=1024 .* lower max_channels to 496 or less"):
        Transport(_TagBound(32767), TransportConfig(max_channels=1024))
    Transport(_TagBound(32767), TransportConfig(max_channels=496)).engine.close()  # the fix named works
