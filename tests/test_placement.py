"""topology.placement: EPLB-compatible expert placement, checked against loops, brute force and bounds."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from topology.placement import (Migration, choose_replicas, expert_state_bytes, group_home_nodes, imbalance,
                                moved_replicas, rebalance)

V3 = (320, 8, 8, 64)  # num_replicas, num_groups, num_nodes, num_devices for 256 experts
SMALL = (48, 4, 2, 8)  # 32 experts in 4 groups, 2 nodes x 4 devices, 6 slots each


def lognormal(sigma: float, seed: int, layers: int, experts: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.exp(torch.randn(layers, experts, generator=g, dtype=torch.float64) * sigma)


def max_over_mean_loop(load_row, phy2log_row, num_devices: int, speed=None) -> float:
    """EPLB's measure as a float64 loop (independent of topology.placement.imbalance)."""
    counts: dict[int, int] = {}
    for e in phy2log_row:
        counts[e] = counts.get(e, 0) + 1
    per_device = len(phy2log_row) // num_devices
    speed = [1.0] * num_devices if speed is None else speed
    dev = [sum(load_row[e] / counts[e] for e in phy2log_row[d * per_device:(d + 1) * per_device]) / speed[d]
           for d in range(num_devices)]
    mean = sum(load_row) / sum(speed)
    return max(dev) / mean if mean > 0 else 1.0


def check_rules(load: torch.Tensor, out, num_replicas: int, num_groups: int, num_nodes: int, num_devices: int):
    """Every rule of the placement contract, checked with loops."""
    phy2log, log2phy, logcnt = out
    layers, experts = load.shape
    assert phy2log.shape == (layers, num_replicas) and logcnt.shape == (layers, experts)
    assert log2phy.shape[:2] == (layers, experts) and log2phy.shape[2] == int(logcnt.max())
    per_device = num_replicas // num_devices
    per_node_slots = num_replicas // num_nodes
    group_size = experts // num_groups
    homes = group_home_nodes(phy2log, num_groups, num_nodes, num_devices)
    for i in range(layers):
        p2l = phy2log[i].tolist()
        assert sorted(set(p2l)) == list(range(experts)), "every expert needs a replica"
        assert logcnt[i].sum() == num_replicas
        for e in range(experts):
            slots = [p for p, x in enumerate(p2l) if x == e]
            assert logcnt[i, e] == len(slots)
            row = log2phy[i, e].tolist()
            assert sorted(row[:len(slots)]) == slots and all(v == -1 for v in row[len(slots):])
        for d in range(num_devices):
            on_d = p2l[d * per_device:(d + 1) * per_device]
            assert len(set(on_d)) == len(on_d), f"device {d} holds two replicas of one expert"
        for g in range(num_groups):
            holders = [n for n in range(num_nodes)
                       if all(e in p2l[n * per_node_slots:(n + 1) * per_node_slots]
                              for e in range(g * group_size, (g + 1) * group_size))]
            assert homes[i, g].item() == (holders[0] if holders else -1)
            if num_groups % num_nodes == 0:
                assert holders, f"group {g} has no home node"


@pytest.mark.parametrize("shape,experts,sigma", [(V3, 256, 1.0), (SMALL, 32, 1.5), ((40, 3, 2, 4), 24, 0.5),
                                                 ((64, 2, 4, 16), 32, 1.0)])
def test_rules_and_measure_on_random_loads(shape, experts, sigma):
    load = lognormal(sigma, 0, 2, experts)
    out = rebalance(load, *shape)
    check_rules(load, out, *shape)
    for i in range(load.shape[0]):
        want = max_over_mean_loop(load[i].tolist(), out[0][i].tolist(), shape[3])
        assert imbalance(load, out[0], shape[3])[i].item() == pytest.approx(want, rel=1e-12)


def test_adversarial_loads():
    experts = 256
    hot = torch.full((1, experts), 0.1 / (experts - 1), dtype=torch.float64)
    hot[0, 7] = 0.9
    equal = torch.ones(1, experts, dtype=torch.float64)
    zeros = torch.zeros(1, experts, dtype=torch.float64)
    for load in (hot, equal, zeros):
        check_rules(load, rebalance(load, *V3), *V3)
    # one expert with 90%: it must be spread over (nearly) every device; the lower bound is 1.0
    # (64 replicas of 0.9/64 each leave 0.1 for 256 light replicas): a placement that keeps it on
    # a few devices scores >= 0.9 / 64 devices' share, i.e. far above 1.
    p, _, cnt = rebalance(hot, *V3)
    assert cnt[0, 7] == 64 and imbalance(hot, p, 64).item() < 1.01
    # all equal: 64 experts doubled -> 128 half replicas + 192 whole; 2 halves + 3 wholes per device
    # is exactly the mean, so the optimum is 1.0 and nothing less is acceptable
    assert imbalance(equal, rebalance(equal, *V3)[0], 64).item() == pytest.approx(1.0, abs=1e-12)
    # no load at all: defined as balanced, every expert still placed
    assert imbalance(zeros, rebalance(zeros, *V3)[0], 64).item() == 1.0


def _brute_force_optimum(load_row: list[float], num_replicas: int, num_groups: int, num_nodes: int,
                         num_devices: int, speed: list[float] | None = None) -> float:
    """Min max/mean (device load / speed over total load / total speed) over every phy2log that keeps the rules (distinct experts per device, every
    expert placed, and when there are as many groups as nodes each group wholly on its own node,
    as rebalance homes them), enumerated with numpy."""
    experts = len(load_row)
    w = np.asarray(load_row)
    p2l = np.array(list(itertools.product(range(experts), repeat=num_replicas)))
    onehot = p2l[:, :, None] == np.arange(experts)  # [plans, slots, experts]
    cnt = onehot.sum(1)
    ok = (cnt > 0).all(1)
    per_device = onehot.reshape(len(p2l), num_devices, -1, experts).sum(2)
    ok &= (per_device <= 1).all((1, 2))
    if num_groups == num_nodes:
        on_node = onehot.reshape(len(p2l), num_nodes, -1, experts).any(2)  # [plans, nodes, experts]
        whole = on_node.reshape(len(p2l), num_nodes, num_groups, -1).all(3)  # group entirely on node
        ok &= np.any([whole[:, list(perm), range(num_groups)].all(1)
                      for perm in itertools.permutations(range(num_nodes))], axis=0)
    sp = np.ones(num_devices) if speed is None else np.asarray(speed)
    dev = (w / np.maximum(cnt, 1))[np.arange(len(p2l))[:, None], p2l].reshape(len(p2l), num_devices, -1).sum(2) / sp
    return float((dev.max(1) / (w.sum() / sp.sum()))[ok].min())


# homed: 2 groups on 2 nodes; global: 1 group, no homes. Slack: the search is a local one; on the
# global tiny case seed 3 it stops 8.8% above the optimum (counts 3,1,3,1 where 3,3,1,1 is best:
# two re-pointings, each alone worse). A broken measure, count rule or move shows up as far more.
@pytest.mark.parametrize("shape,slack", [((8, 2, 2, 4), 1e-9), ((8, 1, 2, 4), 0.10)])
def test_tiny_cases_against_the_brute_force_optimum(shape, slack):
    for seed in range(4):
        load = lognormal(1.5, seed, 1, 4)
        ours = imbalance(load, rebalance(load, *shape)[0], shape[3]).item()
        best = _brute_force_optimum(load[0].tolist(), *shape)
        assert best - 1e-12 <= ours <= best * (1 + slack), (seed, ours, best)


# Speeds: the optimum minimises the largest load / speed. Measured gaps over these 24 cases: 0 in 15,
# at most 10.6% (homed, speeds 1/0.5/0.25/1, seed 3); a placement blind to speed scores 1.68 where
# 1.004 is possible (speeds 1/0.3/1/0.3, seed 0), and so did the speed-blind replica counts.
@pytest.mark.parametrize("shape", [(8, 2, 2, 4), (8, 1, 2, 4)])
@pytest.mark.parametrize("speed", [[1, 0.3, 1, 0.3], [1, 1, 0.3, 0.3], [1, 0.5, 0.25, 1]])
def test_device_speeds_against_the_brute_force_optimum(shape, speed):
    sp = torch.tensor(speed, dtype=torch.float64)
    for seed in range(4):
        load = lognormal(1.5, seed, 1, 4)
        ours = imbalance(load, rebalance(load, *shape, device_speed=sp)[0], 4, sp).item()
        best = _brute_force_optimum(load[0].tolist(), *shape, speed)
        assert best - 1e-12 <= ours <= best * 1.12, (seed, ours, best)


def test_uniform_speeds_give_todays_placement():
    # the placement depends on speeds only through their ratios: equal speeds, whatever the value,
    # must give exactly the placement without speeds
    for shape, experts in ((V3, 256), (SMALL, 32), ((40, 3, 2, 4), 24)):
        load = lognormal(1.0, 0, 2, experts)
        base = rebalance(load, *shape)
        for c in (1.0, 0.3, 2.0):
            got = rebalance(load, *shape, device_speed=torch.full((shape[3],), c))
            assert all(torch.equal(x, y) for x, y in zip(got, base)), (shape, c)


def _greedy_lpt(load_row: np.ndarray, num_replicas: int, num_devices: int) -> float:
    """A simple independent baseline: extra replicas to the heaviest replica load, then LPT
    packing with equal slot counts (EPLB's global policy without the distinctness rule)."""
    cnt = np.ones(len(load_row))
    for _ in range(num_replicas - len(load_row)):
        cnt[np.argmax(load_row / cnt)] += 1
    items = sorted(((load_row[e] / cnt[e]) for e in range(len(load_row)) for _ in range(int(cnt[e]))), reverse=True)
    dev, room = np.zeros(num_devices), np.full(num_devices, num_replicas // num_devices)
    for r in items:
        d = min((d for d in range(num_devices) if room[d]), key=lambda d: dev[d])
        dev[d] += r
        room[d] -= 1
    return dev.max() / dev.mean()


def test_never_worse_than_greedy_lpt_or_the_group_packing_bound():
    # global shape (4 groups on 8 nodes: no homes): against greedy counts + LPT
    for seed in range(3):
        load = lognormal(1.0, seed, 1, 64)
        ours = imbalance(load, rebalance(load, 80, 4, 8, 16)[0], 16).item()
        assert ours <= _greedy_lpt(load[0].numpy(), 80, 16) + 1e-12
    # V3 shape (one group per node): EPLB's hierarchical policy keeps each group's load on one node,
    # so it cannot go below max/mean of the group loads; ours must beat that on every layer
    load = lognormal(1.0, 7, 3, 256)
    ours = imbalance(load, rebalance(load, *V3)[0], 64)
    groups = load.view(3, 8, 32).sum(-1)
    bound = groups.max(-1).values / groups.mean(-1)
    assert (ours < bound).all(), (ours, bound)


def test_device_speed_gets_proportional_load():
    speed = torch.tensor([1.0, 1.0, 0.5, 0.5, 1.0, 1.0, 0.5, 0.5])
    load = lognormal(0.5, 3, 2, 32)
    phy2log, _, cnt = rebalance(load, *SMALL, device_speed=speed)
    for i in range(2):
        assert imbalance(load[i:i + 1], phy2log[i:i + 1], 8, speed).item() == pytest.approx(
            max_over_mean_loop(load[i].tolist(), phy2log[i].tolist(), 8, speed.tolist()), rel=1e-12)
    assert (imbalance(load, phy2log, 8, speed) < 1.1).all()
    per = (load / cnt).gather(1, phy2log).view(2, 8, 6).sum(-1)
    ratio = per[:, speed == 0.5].mean() / per[:, speed == 1.0].mean()
    assert 0.4 < ratio < 0.6  # a half-speed device carries about half


def _group_limited_indices(num_tokens: int, experts: int, num_groups: int, topk_groups: int, top_k: int, seed: int):
    """Random node-limited routing built independently of topology.routing."""
    rng = np.random.default_rng(seed)
    size = experts // num_groups
    out = np.empty((num_tokens, top_k), dtype=np.int64)
    for t in range(num_tokens):
        groups = rng.choice(num_groups, topk_groups, replace=False)
        pool = np.concatenate([np.arange(g * size, (g + 1) * size) for g in groups])
        out[t] = rng.choice(pool, top_k, replace=False)
    return torch.from_numpy(out)


@pytest.mark.parametrize("shape,experts", [(V3, 256), (SMALL, 32), ((48, 4, 1, 8), 32)])
def test_choose_replicas_stays_on_home_nodes(shape, experts):
    num_replicas, num_groups, num_nodes, num_devices = shape
    load = lognormal(1.0, 1, 1, experts)
    p2l, l2p, cnt = (t[0] for t in rebalance(load, *shape))
    idx = _group_limited_indices(2000, experts, num_groups, min(2, num_groups), 4, 0)
    kw = dict(num_groups=num_groups, num_nodes=num_nodes, num_devices=num_devices)
    phys = choose_replicas(idx, p2l, l2p, cnt, **kw)
    assert torch.equal(p2l[phys], idx), "a replica of another expert"
    assert torch.equal(phys, choose_replicas(idx, p2l, l2p, cnt, **kw)), "not deterministic"
    home = group_home_nodes(p2l[None], num_groups, num_nodes, num_devices)[0]
    node = phys // (num_replicas // num_nodes)
    for t in range(idx.shape[0]):
        allowed = {home[e // (experts // num_groups)].item() for e in idx[t].tolist()}
        assert set(node[t].tolist()) <= allowed, "token crossed to a node its routing did not choose"
    # every replica eligible (one node): each expert's tokens split evenly over its replicas
    if num_nodes == 1:
        used = torch.bincount(phys.view(-1), minlength=num_replicas)
        for e in range(experts):
            per = used[l2p[e, :cnt[e]]]
            assert per.max() - per.min() <= 1


# the first implementation, kept only here as the reference (group_home_nodes is the library's)
def _choose_replicas_loop(indices: torch.Tensor, phy2log: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor, *,
                    num_groups: int, num_nodes: int, num_devices: int) -> torch.Tensor:
    """The placement's replica rule as it was written first, one Python loop over the groups: the
    reference the vectorised ``choose_replicas`` must equal exactly."""
    if indices.dim() != 2:
        raise ValueError(f"indices: shape {tuple(indices.shape)}; expected [tokens, top_k]")
    num_replicas = phy2log.shape[0]
    per_device = num_replicas // num_devices
    home = group_home_nodes(phy2log[None], num_groups, num_nodes, num_devices)[0].numpy()
    e = indices.reshape(-1).cpu().numpy()
    num_tokens, top_k = indices.shape
    num_experts = logcnt.shape[0]
    if e.size and (e.min() < 0 or e.max() >= num_experts):
        raise ValueError(f"indices: expert ids must be in 0..{num_experts - 1}")
    tok = np.repeat(np.arange(num_tokens), top_k)
    pair_home = home[e // (num_experts // num_groups)]
    reach = np.zeros((num_tokens, num_nodes), dtype=bool)
    reach[tok[pair_home >= 0], pair_home[pair_home >= 0]] = True
    reps = log2phy.cpu().numpy()[e]  # [pairs, max replicas]
    rep_node = np.where(reps >= 0, reps, 0) // per_device // (num_devices // num_nodes)
    elig = (reps >= 0) & ((pair_home < 0)[:, None] | reach[tok[:, None], rep_node])
    # group pairs by (expert, eligible set), most constrained first, hashed token order inside
    size = elig.sum(1)
    spread = (tok.astype(np.uint64) * np.uint64(2654435761)) % np.uint64(1 << 32)
    order = np.lexsort((spread, *elig.T[::-1], size, e))
    es, el = e[order], elig[order]
    starts = np.flatnonzero(np.r_[True, (es[1:] != es[:-1]) | (el[1:] != el[:-1]).any(1)])
    ends = np.r_[starts[1:], len(order)]
    choice = np.empty(len(order), dtype=np.int64)
    level = np.zeros(reps.shape[1], dtype=np.int64)
    for k, (lo, hi) in enumerate(zip(starts, ends)):
        if k == 0 or es[lo] != es[lo - 1]:
            level[:] = 0  # a new expert
        cols = np.flatnonzero(el[lo])
        add = _water_fill_loop(level[cols], hi - lo)
        level[cols] += add
        choice[lo:hi] = np.repeat(cols, add)
    phys = np.empty(len(order), dtype=np.int64)
    phys[order] = reps[order, choice]
    return torch.from_numpy(phys.reshape(num_tokens, top_k))


def _water_fill_loop(level: np.ndarray, units: int) -> np.ndarray:
    """One row of water-filling, ties to the earlier entries (the first implementation)."""
    order = np.argsort(level, kind="stable")
    s = level[order]
    m = len(s)
    k = m  # how many of the lowest entries the water reaches
    for j in range(1, m):
        if j * s[j] - s[:j].sum() >= units:
            k = j
            break
    total = units + s[:k].sum()
    base, extra = divmod(int(total), k)
    add = np.zeros(m, dtype=np.int64)
    add[:k] = base - s[:k]
    add[:extra] += 1
    out = np.empty(m, dtype=np.int64)
    out[order] = add
    return out


@pytest.mark.parametrize("shape,experts,topk_groups", [(V3, 256, 4), (SMALL, 32, 2), ((48, 4, 1, 8), 32, 2),
                                                        ((40, 3, 2, 4), 24, 3), ((128, 8, 8, 64), 128, 8)])
def test_choose_replicas_equals_the_loop_reference(shape, experts, topk_groups):
    # random loads (so replica counts and eligible sets vary) and one hot expert (as many replicas as
    # devices), node-limited and unlimited routing, groups with and without home nodes; any change of
    # order, tie or fill rule shows as a mismatch
    num_replicas, num_groups, num_nodes, num_devices = shape
    kw = dict(num_groups=num_groups, num_nodes=num_nodes, num_devices=num_devices)
    hot = torch.full((1, experts), 1.0, dtype=torch.float64)
    hot[0, 3] = experts / 2.0  # half the load on one expert: replicas on (nearly) every device
    for seed in (0, 1, 3):
        load = hot if seed == 3 else lognormal(1.5, seed, 1, experts)
        p2l, l2p, cnt = (t[0] for t in rebalance(load, *shape))
        for tokens in (1, 37, 1000):
            idx = _group_limited_indices(tokens, experts, num_groups, topk_groups, 8 if experts >= 64 else 4, seed)
            assert torch.equal(choose_replicas(idx, p2l, l2p, cnt, **kw), _choose_replicas_loop(idx, p2l, l2p, cnt, **kw))


def test_coselect_improves_the_balance_real_routing_reaches():
    """With the groups' co-selection, off-home replicas go only where tokens reach them; on sampled
    node-limited routing (popularity ~ lognormal load, M = 4 of 8 groups) the per-device token
    counts after choose_replicas must then be better balanced than without it."""
    from topology.routing import select_experts
    g = torch.Generator().manual_seed(0)
    load = torch.exp(torch.randn(256, generator=g, dtype=torch.float64))
    u = torch.rand(8192, 256, generator=g, dtype=torch.float64).clamp_(1e-12, 1 - 1e-12)
    _, idx = select_experts(torch.sigmoid(load.log() - (-u.log()).log()).float(), None, num_groups=8,
                            topk_groups=4, top_k=8, route_scale=1.0)
    counts = torch.bincount(idx.view(-1), minlength=256).double()[None]
    groups = torch.zeros(8192, 8, dtype=torch.float64).scatter_(1, idx // 32, 1.0)
    coselect = ((groups.T @ groups) / groups.sum(0)[:, None])[None]
    real = []
    for kw in ({}, {"coselect": coselect}):
        out = rebalance(counts, *V3, **kw)
        check_rules(counts, out, *V3)
        phys = choose_replicas(idx, *(t[0] for t in out), num_groups=8, num_nodes=8, num_devices=64)
        tokens = torch.bincount((phys // 5).view(-1), minlength=64).double()
        real.append((tokens.max() / tokens.mean()).item())
    assert real[1] < real[0], real


def test_migration_moves_fewer_bytes_than_a_fresh_plan():
    load = lognormal(1.0, 4, 2, 32)
    prev = rebalance(load, *SMALL)[0]
    drifted = load * lognormal(0.3, 5, 2, 32)
    fresh = rebalance(drifted, *SMALL)[0]

    def moved(new):  # replicas on a device that did not hold that expert before
        return sum(len(set(new[i].view(8, 6)[d].tolist()) - set(prev[i].view(8, 6)[d].tolist()))
                   for i in range(2) for d in range(8))

    per_replica = expert_state_bytes(3 * 7168 * 2048)
    assert per_replica == 3 * 7168 * 2048 * 14  # bf16 weights + fp32 master + two fp32 moments
    cheap = rebalance(drifted, *SMALL, migration=Migration(previous=prev, bytes_per_replica=per_replica,
                                                           price_per_gib=0.01))
    check_rules(drifted, cheap, *SMALL)
    assert moved(cheap[0]) < moved(fresh)
    assert moved_replicas(fresh, prev, 8).sum().item() == moved(fresh)
    assert (imbalance(drifted, cheap[0], 8) < imbalance(drifted, prev, 8)).all(), "the re-plan must help"
    # nothing is worth an infinite price: the previous placement comes back unchanged
    frozen = rebalance(drifted, *SMALL, migration=Migration(previous=prev, bytes_per_replica=per_replica,
                                                            price_per_gib=1e9))
    assert torch.equal(frozen[0], prev)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_replicas=50), "num_replicas=50"),          # not a multiple of the 8 devices
    (dict(num_replicas=24), "num_replicas=24"),          # fewer slots than experts
    (dict(num_replicas=8 * 40), "num_replicas=320"),     # 40 slots per device > 32 experts
    (dict(num_groups=5), "num_groups=5"),
    (dict(num_devices=6, num_nodes=4), "num_devices=6"),  # not a multiple of the nodes
    (dict(device_speed=torch.ones(3)), "device_speed"),
    (dict(load=-torch.ones(1, 32)), "load"),
])
def test_bad_input_names_the_field(kwargs, match):
    args = dict(load=torch.ones(1, 32), num_replicas=48, num_groups=4, num_nodes=2, num_devices=8)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        rebalance(**args)
    with pytest.raises(ValueError, match="price_per_gib"):
        Migration(previous=torch.zeros(1, 48, dtype=torch.long), bytes_per_replica=1, price_per_gib=-1.0)


def test_speed_fillers_fit_the_node_limits():
    """Two groups homed on two one-device nodes, one fast and one slow device, 8 experts in 12 slots:
    the per-speed filler counts once gave every extra replica to one group's experts, more than the
    other node's free slots, and rebalance stopped on an internal assertion (seen through
    launch.train --rank-kind h800,ascend910c,... --redundant-experts 4 --experts 8)."""
    speed = torch.tensor([1.0, 0.3])
    phy2log, log2phy, logcnt = rebalance(torch.ones(1, 8), 12, 2, 2, 2, device_speed=speed)
    slots = phy2log.reshape(2, 6)
    assert all(len(set(row.tolist())) == 6 for row in slots), "two replicas of one expert on a device"
    assert sorted(phy2log[0].tolist()) == sorted(e for e in range(8) for _ in range(int(logcnt[0, e])))
    assert (logcnt >= 1).all() and int(logcnt.sum()) == 12
