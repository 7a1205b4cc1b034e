"""Cluster description, rank layout, node-limited routing, expert placement, dispatch plans and link
costs. Pure (torch / numpy): nothing here touches MPI."""

from topology.routing import GROUP_SCORES, select_experts

__all__ = ["GROUP_SCORES", "select_experts"]
