"""actors.action_plan.data_draws against what the schedules' actions say, rank by rank."""

from __future__ import annotations

import pytest

from actors.action_plan import data_draws
from runtime.schedules import FB, Compute, build


@pytest.mark.parametrize("name,pp,num_mb", [("dualpipe", 2, 8), ("dualpipev", 2, 8), ("1f1b", 2, 8),
                                             ("zb1p", 4, 8), ("dualpipe", 4, 8), ("dualpipev", 4, 12)])
def test_every_data_stage_forward_draws_once_in_first_need_order(name, pp, num_mb):
    sched = build(name, pp, num_mb)
    last = sched.num_stages - 1
    first_stage_mbs: list[int] = []
    for rank in range(len(sched.ranks)):
        stage_of = {c: sched.stage_of(rank, c) for c in sched.chunks(rank)}
        got = data_draws(sched.ranks[rank], stage_of, (0, last), sched.global_mb)
        # reference: walk the actions, every F half included, and note the data-stage forwards
        needs = []
        for a in sched.ranks[rank]:
            for c in ((a.f, a.b) if isinstance(a, FB) else (a,) if isinstance(a, Compute) else ()):
                if c.op == "F" and stage_of[c.chunk] in (0, last):
                    needs.append((stage_of[c.chunk], sched.global_mb(c.dir, c.mb)))
        assert len(got) == len(set(got)), got  # each microbatch drawn once, even where two stages read it
        assert set(got) == {g for _, g in needs}
        assert got == sorted(got, key=[g for _, g in needs].index)  # in the order a forward first needs it
        first_stage_mbs += [g for s, g in needs if s == 0]
    # every microbatch enters the pipeline exactly once: drawn by the rank(s) holding stage 0
    assert sorted(first_stage_mbs) == list(range(num_mb)), first_stage_mbs
    if name == "dualpipev":  # rank 0 holds the first and the last stage: one draw serves both
        stage_of = {c: sched.stage_of(0, c) for c in sched.chunks(0)}
        assert set(stage_of.values()) == {0, last}
        assert sorted(data_draws(sched.ranks[0], stage_of, (0, last), sched.global_mb)) == list(range(num_mb))
