"""Cluster description, rank layout, node-limited routing, expert placement, dispatch plans and link
costs. Pure (torch / numpy): nothing here touches MPI."""

from topology.cluster import (DEVICE_SPEEDS, Cluster, LinkClass, Node, cluster_from_hostfile, dump_cluster,
                              emulated_cluster, load_cluster, parse_cluster)
from topology.cost import REFERENCE_FLOPS, HopCost, compute_seconds, hop_cost
from topology.dispatch import TOKEN_DTYPES, DispatchPlan, plan_dispatch, token_bytes
from topology.layout import AXES, EPGroup, Layout, RankPlace
from topology.placement import Migration, choose_replicas, expert_state_bytes, group_home_nodes, imbalance, rebalance
from topology.predict import TrafficPrediction, expected_nodes_per_token, predict_traffic
from topology.routing import GROUP_SCORES, select_experts

__all__ = ["DEVICE_SPEEDS", "Cluster", "LinkClass", "Node", "cluster_from_hostfile", "dump_cluster",
           "emulated_cluster", "load_cluster", "parse_cluster", "REFERENCE_FLOPS", "HopCost", "compute_seconds",
           "hop_cost", "TOKEN_DTYPES", "DispatchPlan", "plan_dispatch", "token_bytes", "AXES", "EPGroup", "Layout",
           "RankPlace", "Migration", "choose_replicas", "expert_state_bytes", "group_home_nodes", "imbalance",
           "rebalance", "TrafficPrediction", "expected_nodes_per_token", "predict_traffic", "GROUP_SCORES",
           "select_experts"]
