"""Node-limited (group-limited) expert selection, DeepSeek-V3's gate (technical report section 2.1.2).

The experts form ``num_groups`` equal groups (when groups are nodes, a group is the set of experts
homed on one node). A token first keeps its best ``topk_groups`` groups, then takes its top
``top_k`` experts among them, so it reaches at most ``topk_groups`` groups. The balancing bias
steers *selection* only; the gate weights always come from the unbiased scores. This is the one
routing in the project: the model's gate (:meth:`actors.model.MoE.route`) calls it.
"""

from __future__ import annotations

import torch

__all__ = ["GROUP_SCORES", "select_experts"]

GROUP_SCORES = ("top2", "topk")
"""Group score rules: ``top2`` sums a group's two best biased scores (V3's code, hard-coded 2);
``topk`` sums its best ``top_k // topk_groups`` (Megatron-LM). They agree when that quotient is 2."""


def select_experts(scores: torch.Tensor, bias: torch.Tensor | None, *, num_groups: int, topk_groups: int,
                   top_k: int, route_scale: float, group_score: str = "top2") -> tuple[torch.Tensor, torch.Tensor]:
    """Pick ``top_k`` experts per token from at most ``topk_groups`` groups.

    scores: [tokens, experts] sigmoid affinities (gradients flow into the returned weights).
    bias: [experts] balancing bias added for selection only, or None (no bias).
    Returns (weights [tokens, top_k], indices [tokens, top_k]): indices in descending order of the
    biased score; weights = the chosen experts' unbiased scores / their sum * ``route_scale``.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores: shape {tuple(scores.shape)}; expected [tokens, experts]")
    num_experts = scores.shape[1]
    if num_groups < 1 or num_experts % num_groups:
        raise ValueError(f"num_groups={num_groups}: must be a positive divisor of the {num_experts} experts")
    per_group = num_experts // num_groups
    if not 1 <= topk_groups <= num_groups:
        raise ValueError(f"topk_groups={topk_groups}: must be in 1..num_groups={num_groups}")
    if not 1 <= top_k <= topk_groups * per_group:
        raise ValueError(f"top_k={top_k}: must be in 1..{topk_groups * per_group} (topk_groups x experts per "
                         f"group); lower top_k or raise topk_groups")
    if group_score not in GROUP_SCORES:
        raise ValueError(f"group_score={group_score!r}: must be one of {GROUP_SCORES}")
    if group_score == "topk" and top_k < topk_groups:
        raise ValueError(f"group_score='topk' with top_k={top_k} < topk_groups={topk_groups} sums zero scores "
                         f"per group; use group_score='top2' or top_k >= topk_groups")
    if bias is not None and tuple(bias.shape) != (num_experts,):
        raise ValueError(f"bias: shape {tuple(bias.shape)}; expected [{num_experts}] (one per expert) or None")

    biased = scores.detach() if bias is None else scores.detach() + bias
    if topk_groups < num_groups:
        grouped = biased.view(scores.shape[0], num_groups, per_group)
        n = min(2, per_group) if group_score == "top2" else top_k // topk_groups
        group_scores = grouped.topk(n, dim=-1).values.sum(-1)  # [tokens, groups]
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(topk_groups, dim=-1).indices, True)
        biased = grouped.masked_fill(~keep[..., None], float("-inf")).view_as(biased)
    indices = biased.topk(top_k, dim=-1).indices
    w = scores.gather(1, indices)
    return w / w.sum(-1, keepdim=True) * route_scale, indices
