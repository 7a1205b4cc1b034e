"""The full-scale plan (topology/plan.py, launch.plan): the V3 setup against the report's GPU-hours,
what-if directions, the speed-aware split, mirror-kind rule, and the simulator's per-rank factors."""

from __future__ import annotations

import itertools
import json
import random
import subprocess
import sys

import pytest

from runtime.schedules import Costs, build, simulate
from topology.cluster import Cluster, Node, emulated_cluster
from topology.plan import (V3_MODEL, PlanConfig, RankMemory, check_mirror_kinds, live_points, model_items, plan_step,
                           split_stages)

V3_CLUSTER = emulated_cluster(256, 8)
FAST = dict(sample_tokens=128)


def _mixed(pp: int, kinds_of_rank: list[str], nodes_per_rank: int = 16) -> Cluster:
    return Cluster(nodes=tuple(Node(name=f"n{r}-{i}", num_devices=8, kind=kinds_of_rank[r])
                               for r in range(pp) for i in range(nodes_per_rank)))


MIRRORED = ["h800" if min(r, 15 - r) % 2 == 0 else "ascend910c" for r in range(16)]


@pytest.fixture(scope="module")
def v3_plan():
    return plan_step(V3_CLUSTER, PlanConfig(**FAST))


@pytest.fixture(scope="module")
def mixed_plan():
    return plan_step(_mixed(16, MIRRORED), PlanConfig(split="speed", **FAST))


def test_model_counts_match_the_report():
    # the report's 671B total / 37B active (embedding and head included)
    assert abs(V3_MODEL.total_params() / 1e9 - 671) < 1
    assert abs(V3_MODEL.active_params() / 1e9 - 37) < 1
    # forward FLOPs of the main model ~ 2 x active + attention scores (published 6N rule, checked by formula)
    items = model_items(V3_MODEL, 4096)
    gemm = sum(i.gemm_flops for i in items if i.name.startswith("layer") or i.name == "head")
    assert gemm == pytest.approx(2 * (V3_MODEL.active_params() - V3_MODEL.vocab * V3_MODEL.hidden), rel=1e-9)


def test_v3_within_1_5x_of_the_published_gpu_hours(v3_plan):
    ratio = v3_plan.device_hours_per_trillion / 180e3
    assert 1 / 1.5 <= ratio <= 1.5, ratio
    assert 0 < v3_plan.bubble_fraction < 0.2 and 0.5 < v3_plan.comm_hidden <= 1.0
    assert len(v3_plan.stage_layers) == 16 and sum(map(len, v3_plan.stage_layers)) == 61 + 1 + 1


def test_split_is_optimal_against_brute_force():
    rng = random.Random(3)
    for _ in range(30):
        n, s = rng.randint(3, 8), rng.randint(1, 3)
        if n < s:
            continue
        costs = [rng.uniform(0.5, 3) for _ in range(n)]
        speeds = [rng.choice([1.0, 0.3, 0.6]) for _ in range(s)]
        best = min(max(sum(costs[a:b]) / v for (a, b), v in zip(zip((0, *cuts), (*cuts, n)), speeds))
                   for cuts in itertools.combinations(range(1, n), s - 1))
        counts = split_stages(costs, speeds)
        assert sum(counts) == n and min(counts) >= 1
        bounds = list(itertools.accumulate(counts, initial=0))
        got = max(sum(costs[a:b]) / v for a, b, v in zip(bounds, bounds[1:], speeds))
        assert got == pytest.approx(best)


def _memories(name: str, pp: int, n: int, rng: random.Random) -> list[RankMemory]:
    sched = build(name, pp, 4 * pp)
    out = []
    for r in range(pp):
        held, live = live_points(sched, r)
        out.append(RankMemory(name=f"r{r}", stages=held, live=live, capacity=rng.uniform(2, 12),
                              state_bytes=tuple(rng.uniform(0, 2) for _ in range(n)),
                              act_bytes=tuple(rng.uniform(0, 1) for _ in range(n))))
    return out


def test_live_points_give_the_simulators_peak():
    # the weighted peak with unit weights is the simulator's count of live stage-microbatches
    # (DualPipe: PP+1); a wrong free rule (W vs B) or a dropped hull vertex changes it
    for name, pp in (("dualpipe", 4), ("dualpipev", 3), ("1f1b", 4), ("zb1p", 3)):
        sched = build(name, pp, 4 * pp)
        sim = simulate(sched, Costs(f=1.0, b=2.0, w=0.7, fb=2.6, comm=0.1))
        for r in range(pp):
            held, live = live_points(sched, r)
            assert max(sum(p) for p in live) == sim.peak_activations[r]
            # any weighting's peak over the hull equals that over every moment (brute force walk)
            weights = [1.0, 7.5][:len(held)]
            moments, cur = [], dict.fromkeys(held, 0)
            for a in sched.ranks[r]:
                halves = (a.f, a.b) if hasattr(a, "f") else (a,) if hasattr(a, "op") else ()
                for c in halves:
                    if c.op == "F":
                        cur[sched.stage_of(r, c.chunk)] += 1
                        moments.append(sum(w * cur[st] for w, st in zip(weights, held)))
                for c in halves:
                    if c.op == "W" or (c.op == "B" and not c.split):
                        cur[sched.stage_of(r, c.chunk)] -= 1
            assert max(sum(w * v for w, v in zip(weights, p)) for p in live) == pytest.approx(max(moments))


def test_split_within_memory_against_brute_force():
    # every split enumerated: ours fits every device, is the fastest that fits, and is refused only
    # when none fits (a coupling of a rank's two stages mishandled, or a wrong range, shows up here)
    rng = random.Random(5)
    seen = {"fit": 0, "constrained": 0, "refused": 0}
    for trial in range(120):
        name, pp = rng.choice([("dualpipe", 2), ("dualpipe", 4), ("dualpipev", 2), ("1f1b", 3), ("zb1p", 2)])
        num = 2 * pp if name == "dualpipev" else pp
        n = rng.randint(num, num + 4)
        mems = _memories(name, pp, n, rng)
        costs = [rng.uniform(0.5, 3) for _ in range(n)]
        speeds = [rng.choice([1.0, 0.3]) for _ in range(num)]

        def slowest(counts):
            b = list(itertools.accumulate(counts, initial=0))
            return max(sum(costs[b[k]:b[k + 1]]) / speeds[k] for k in range(num))

        splits = [[b - a for a, b in zip((0, *cuts), (*cuts, n))] for cuts in itertools.combinations(range(1, n), num - 1)]
        fitting = [c for c in splits if all(m.peak(c) <= m.capacity for m in mems)]
        if not fitting:
            with pytest.raises(ValueError, match=r"no split .* fits every device.*Fix: more pipeline stages"):
                split_stages(costs, speeds, mems)
            seen["refused"] += 1
            continue
        got = split_stages(costs, speeds, mems)
        assert all(m.peak(got) <= m.capacity for m in mems)
        assert slowest(got) == pytest.approx(min(map(slowest, fitting)), rel=1e-12)
        seen["constrained" if slowest(got) > min(map(slowest, splits)) * (1 + 1e-12) else "fit"] += 1
    assert min(seen.values()) >= 10, seen  # all three outcomes exercised


def test_v3_fits_in_80_gb(v3_plan):
    # V3 trained on 80 GB H800s: with its memory savings the estimate must fit, every device
    assert set(v3_plan.memory_capacity_gb.values()) == {80.0}
    assert 40 < max(v3_plan.memory_gb.values()) <= 80
    parts = v3_plan.memory_parts
    assert sum(parts.values()) == pytest.approx(v3_plan.memory_gb[v3_plan.memory_worst])
    # too little memory is refused with the fixes named (a CLI user error, not a traceback)
    run = subprocess.run([sys.executable, "-m", "launch.plan", "--cluster", "v3-2048.toml", "--sample-tokens", "64",
                          "--microbatch-seqs", "4", "--global-batch", "16384"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2 and "no split" in run.stderr and "--pp" in run.stderr and "Traceback" not in run.stderr


def test_rank_scale_equals_stage_scale_where_they_coincide():
    # 1F1B: rank r runs stage r; DualPipe: stage s runs on ranks s and pp-1-s, so mirror-symmetric
    # rank factors equal the same per-stage factors. A rank_scale applied to the wrong rank fails.
    base = dict(f=1.0, b=2.0, w=0.7, fb=2.6, comm=0.1)
    for name, factors in (("1f1b", (1.0, 3.3, 1.0, 2.0)), ("dualpipe", (1.0, 3.3, 3.3, 1.0))):
        s = build(name, 4, 8)
        by_rank = simulate(s, Costs(**base, rank_scale=factors))
        by_stage = simulate(s, Costs(**base, stage_scale=factors))
        assert by_rank.makespan == pytest.approx(by_stage.makespan)
        assert by_rank.busy == pytest.approx(by_stage.busy)
    slow_last = simulate(build("1f1b", 4, 8), Costs(**base, rank_scale=(1, 1, 1, 2)))
    assert slow_last.busy[3] == pytest.approx(2 * slow_last.busy[0])
    with pytest.raises(ValueError, match="rank_scale has 3 entries"):
        simulate(build("1f1b", 4, 8), Costs(**base, rank_scale=(1, 1, 1)))


def test_mirror_ranks_must_be_one_kind():
    check_mirror_kinds("dualpipe", ["h800", "ascend910c", "ascend910c", "h800"])
    check_mirror_kinds("dualpipev", ["h800", "ascend910c", "h800", "h800"])
    with pytest.raises(ValueError, match=r"ranks 1 \(ascend910c\) and 2 \(h800\).*dualpipev"):
        check_mirror_kinds("dualpipe", ["h800", "ascend910c", "h800", "h800"])
    # the plan refuses a 50/50 cluster in plain node order (ranks 0-7 h800, 8-15 910C)
    halves = _mixed(16, ["h800"] * 8 + ["ascend910c"] * 8)
    with pytest.raises(ValueError, match="mirror ranks"):
        plan_step(halves, PlanConfig(**FAST))


def test_speed_aware_split_lowers_the_bubble_of_a_mixed_cluster(mixed_plan):
    kinds = MIRRORED
    speed = mixed_plan
    flops = plan_step(_mixed(16, kinds), PlanConfig(split="flops", **FAST))
    assert speed.bubble_fraction < flops.bubble_fraction
    assert speed.step_seconds < flops.step_seconds
    assert speed.alt_bubble_fraction == pytest.approx(flops.bubble_fraction)
    # fast (h800) stages get more layers than slow ones (in all: the 80 GB of an h800 holding many live
    # early-stage microbatches caps some of them)
    per_rank = [len(s) for s in speed.stage_layers]
    assert sum(n for n, k in zip(per_rank, kinds) if k == "h800") > 1.5 * sum(
        n for n, k in zip(per_rank, kinds) if k != "h800")
    assert all(speed.memory_gb[k] <= speed.memory_capacity_gb[k] for k in speed.memory_gb)


def test_mixed_kinds_in_one_ep_group_are_planned_with_the_speed_aware_placement():
    # every EP group half h800, half ascend910c (nodes interleaved): planned, not refused. With one slot
    # per expert each device holds the same share, so the experts run at the slow kind's speed (0.3);
    # redundant slots let the placement move load to the fast devices: a faster expert part and step
    from topology.plan import expert_speeds
    from topology.layout import Layout
    nodes = tuple(Node(name=f"n{i}", num_devices=8, kind="h800" if i % 2 == 0 else "ascend910c") for i in range(256))
    mixed = Cluster(nodes=nodes)
    layout = Layout(cluster=mixed, pp=16, ep=64)
    plain, spare = (expert_speeds(mixed, layout, 256, slots) for slots in (256, 320))
    assert plain == pytest.approx([0.3] * 16)  # 4 experts on every device, the slowest sets the pace
    mean = (1.0 + 0.3) / 2
    assert all(0.3 < v <= mean for v in spare), spare  # never above the group's mean speed
    assert expert_speeds(V3_CLUSTER, Layout(cluster=V3_CLUSTER, pp=16, ep=64), 256, 320) == [1.0] * 16
    without = plan_step(mixed, PlanConfig(**FAST))
    with_spare = plan_step(mixed, PlanConfig(redundant_experts=64, **FAST))
    assert with_spare.step_seconds < without.step_seconds
    assert max(with_spare.memory_gb.values()) > max(without.memory_gb.values())  # 5 expert slots per device, not 4
    assert "64 ascend910c + 64 h800" in without.pp_kinds[0]
    with pytest.raises(ValueError, match="redundant_experts=10: must be a multiple of ep=64"):
        PlanConfig(redundant_experts=10)


def test_what_if_directions(v3_plan, mixed_plan):
    # a slower device mix: more device-hours and a longer step
    mixed = mixed_plan
    assert mixed.step_seconds > v3_plan.step_seconds
    assert mixed.device_hours_per_trillion > v3_plan.device_hours_per_trillion
    # node limiting off: tokens reach more nodes, more inter-node bytes, longer exchanges
    free = plan_step(V3_CLUSTER, PlanConfig(max_nodes=0, **FAST))
    assert free.comm.mean_nodes_per_token > v3_plan.comm.mean_nodes_per_token
    assert free.comm.inter_bytes_per_device > v3_plan.comm.inter_bytes_per_device
    assert free.comm.forward > v3_plan.comm.forward and free.step_seconds >= v3_plan.step_seconds
    # smaller EP: each device holds more experts (memory up)
    ep32 = plan_step(V3_CLUSTER, PlanConfig(ep=32, **FAST))
    assert max(ep32.memory_gb.values()) > max(v3_plan.memory_gb.values())
    # more microbatches (a bigger batch): a smaller bubble share
    big = plan_step(V3_CLUSTER, PlanConfig(global_batch=2 * 15360, **FAST))
    assert big.bubble_fraction < v3_plan.bubble_fraction
    # deeper pipeline at the same microbatches per pipeline: a larger bubble share. On 141 GB H200s
    # (same speed) nothing binds; on 80 GB H800s pp 8 holds twice the layers per device and the split
    # must leave balance to fit (a larger bubble, a longer step than with room)
    config8 = PlanConfig(pp=8, global_batch=120 * 256, **FAST)
    roomy = plan_step(emulated_cluster(256, 8, kind="h200"), config8)
    assert roomy.microbatches == v3_plan.microbatches and roomy.bubble_fraction < v3_plan.bubble_fraction
    tight = plan_step(V3_CLUSTER, config8)
    assert max(tight.memory_gb.values()) <= 80 < max(roomy.memory_gb.values())
    assert tight.bubble_fraction > roomy.bubble_fraction and tight.step_seconds > roomy.step_seconds


def test_cli_prints_assumptions_and_rejects_bad_input():
    run = lambda *a: subprocess.run([sys.executable, "-m", "launch.plan", *a], capture_output=True, text=True,
                                    timeout=300)
    ok = run("--cluster", "v3-2048.toml", "--sample-tokens", "128", "--json")
    assert ok.returncode == 0, ok.stderr
    out = json.loads(ok.stdout)
    assert out["published_hours_per_trillion"] == 180e3 and any("Megatron-Core" in a for a in out["assumptions"])
    bad = run("--nodes", "256", "--devices-per-node", "8", "--global-batch", "1000")
    assert bad.returncode == 2 and "global_batch=1000" in bad.stderr and "Traceback" not in bad.stderr
