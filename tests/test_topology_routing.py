"""topology.select_experts against a float64 loop, plain top-k, and its own invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from topology import select_experts


def _loop64(scores, bias, num_groups, topk_groups, top_k, route_scale, group_score):
    """Token by token in float64, written from the V3 / Megatron-LM description."""
    scores = np.asarray(scores, dtype=np.float64)
    sel = scores + (0.0 if bias is None else np.asarray(bias, dtype=np.float64))
    per = scores.shape[1] // num_groups
    n = 2 if group_score == "top2" else top_k // topk_groups
    out_i, out_w = [], []
    for t in range(scores.shape[0]):
        gscore = [sum(sorted(sel[t, g * per:(g + 1) * per], reverse=True)[:n]) for g in range(num_groups)]
        groups = sorted(range(num_groups), key=lambda g: -gscore[g])[:topk_groups]
        eligible = [e for e in range(scores.shape[1]) if e // per in groups]
        chosen = sorted(eligible, key=lambda e: -sel[t, e])[:top_k]
        w = scores[t, chosen]
        out_i.append(chosen)
        out_w.append(w / w.sum() * route_scale)
    return np.array(out_i), np.array(out_w)


CASES = [  # experts, groups, topk_groups, top_k, group_score
    (8, 4, 2, 3, "top2"), (32, 8, 4, 8, "top2"), (32, 8, 4, 8, "topk"), (24, 4, 2, 6, "topk"),
    (12, 3, 1, 2, "top2"), (16, 4, 4, 4, "top2"),
]


@pytest.mark.parametrize("num_experts,num_groups,topk_groups,top_k,group_score", CASES)
def test_matches_float64_loop_and_invariants(num_experts, num_groups, topk_groups, top_k, group_score):
    gen = torch.Generator().manual_seed(num_experts * 7 + top_k)
    # float64 inputs: no ties to break differently, so the comparison is exact in indices
    scores = torch.rand(300, num_experts, generator=gen, dtype=torch.float64)
    bias = torch.randn(num_experts, generator=gen, dtype=torch.float64) * 0.05
    w, idx = select_experts(scores, bias, num_groups=num_groups, topk_groups=topk_groups, top_k=top_k,
                            route_scale=2.5, group_score=group_score)
    ref_i, ref_w = _loop64(scores.numpy(), bias.numpy(), num_groups, topk_groups, top_k, 2.5, group_score)
    assert np.array_equal(idx.numpy(), ref_i)
    np.testing.assert_allclose(w.numpy(), ref_w, rtol=1e-12)
    per = num_experts // num_groups
    for row in idx.tolist():
        assert len(set(row)) == top_k  # distinct experts
        assert len({e // per for e in row}) <= topk_groups


def test_all_groups_kept_is_plain_topk():
    gen = torch.Generator().manual_seed(1)
    scores = torch.rand(400, 64, generator=gen)
    bias = torch.randn(64, generator=gen) * 0.1
    w, idx = select_experts(scores, bias, num_groups=8, topk_groups=8, top_k=6, route_scale=1.0)
    plain = (scores + bias).topk(6, dim=-1).indices
    assert torch.equal(idx, plain)
    g = scores.gather(1, plain)
    assert torch.equal(w, g / g.sum(-1, keepdim=True))


def test_bias_changes_selection_not_weight_source():
    gen = torch.Generator().manual_seed(2)
    scores = torch.rand(500, 32, generator=gen, requires_grad=True)
    bias = torch.zeros(32)
    bias[:4] = 0.5  # favour group 0's first experts
    w0, i0 = select_experts(scores, None, num_groups=4, topk_groups=2, top_k=4, route_scale=2.0)
    w1, i1 = select_experts(scores, bias, num_groups=4, topk_groups=2, top_k=4, route_scale=2.0)
    assert not torch.equal(i0, i1)
    assert (i1 < 4).float().mean() > (i0 < 4).float().mean()
    for w, i in ((w0, i0), (w1, i1)):  # weights = unbiased scores of the chosen, normalised, scaled
        g = scores.detach().gather(1, i)
        torch.testing.assert_close(w.detach(), g / g.sum(-1, keepdim=True) * 2.0, rtol=0, atol=0)
    # gradients reach the scores (the gate learns through the weights), never the bias
    w1.sum().backward()
    assert scores.grad is not None and scores.grad.abs().sum() > 0


def test_topk_group_score_differs_from_top2_when_quotient_is_not_2():
    gen = torch.Generator().manual_seed(3)
    scores = torch.rand(2000, 32, generator=gen)
    kw = dict(num_groups=4, topk_groups=2, route_scale=1.0)
    # top_k // topk_groups == 2: the two rules are the same rule
    assert torch.equal(select_experts(scores, None, top_k=4, group_score="top2", **kw)[1],
                       select_experts(scores, None, top_k=4, group_score="topk", **kw)[1])
    # == 3: different group scores, so some tokens keep different groups
    assert not torch.equal(select_experts(scores, None, top_k=6, group_score="top2", **kw)[1],
                           select_experts(scores, None, top_k=6, group_score="topk", **kw)[1])


@pytest.mark.parametrize("kw,field", [
    (dict(num_groups=3), "num_groups"), (dict(topk_groups=5), "topk_groups"), (dict(top_k=17), "top_k"),
    (dict(group_score="top3"), "group_score"), (dict(top_k=1, group_score="topk"), "group_score"),
])
def test_bad_arguments_name_the_field(kw, field):
    args = dict(num_groups=4, topk_groups=2, top_k=4, route_scale=1.0) | kw
    with pytest.raises(ValueError, match=field):
        select_experts(torch.rand(3, 16), None, **args)
    with pytest.raises(ValueError, match="bias"):
        select_experts(torch.rand(3, 16), torch.zeros(15), num_groups=4, topk_groups=2, top_k=4, route_scale=1.0)
