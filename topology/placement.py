"""Expert placement: which devices hold which replicas of the routed experts (EPLB's interface).

``rebalance`` returns DeepSeek EPLB's three tensors with EPLB's meaning: ``phy2log[layer, p]`` is
the logical expert in physical slot ``p``, slot ``p`` lives on device ``p // (num_replicas //
num_devices)`` (devices node-major: device ``d`` is on node ``d // (num_devices // num_nodes)``),
``log2phy[layer, e, :logcnt[layer, e]]`` are expert ``e``'s slots (ascending, padded with -1) and
``logcnt`` its replica count. Beyond EPLB it guarantees

* no device holds two replicas of one expert (possible whenever ``num_replicas // num_devices <=
  experts``; otherwise ``rebalance`` refuses),
* node-limited routing survives replication: when ``num_nodes`` divides ``num_groups`` every group
  has a *home node* holding at least one replica of each of its experts (``group_home_nodes``),
  as EPLB's hierarchical policy has. Unlike EPLB, the remaining replicas may sit on any node; a
  replica off its group's home node serves only tokens whose routing already reaches that node
  (``choose_replicas``), so no token reaches more nodes than its routing chose. This freedom is
  what lets the node loads differ from the group loads: EPLB's hierarchical policy cannot go below
  the node-level packing of whole groups (max/mean ~1.37 for 8 lognormal(sigma=1) groups of 32).

Quality is EPLB's measure (``imbalance``): a replica carries its expert's load / replica count, a
device the sum over its replicas divided by its relative speed, and a layer scores max / mean.

EPLB's measure assumes every replica gets its share; under node-limited routing a replica off its
home node only gets the tokens that reach its node anyway. Given the groups' co-selection
(``coselect``, counted by the runtime like the loads), an expert's off-home replicas go only where
they can get their share (``_Fits``); the bench reports both the planned and the sampled balance.

Algorithm, per layer (float64 numpy; 61 layers x 256 experts take a few seconds of CPU):

1. Homes: groups packed onto nodes, ``num_groups // num_nodes`` each, heaviest first onto the node
   with the least load per unit of speed (LPT with a cardinality limit, as EPLB packs).
2. Counts: each extra replica goes to the expert whose replicas carry the most (load / count; ties
   round-robin over groups), at most ``num_devices`` per expert; if that plan ends more than 1%
   above the mean, a second candidate ("filler": just enough replicas that none exceeds a device's
   share, spare slots to the lightest experts) is planned too and the better plan kept.
3. Node level (with homes): every expert's first replica on its home node, the other replicas
   packed LPT-style onto nodes (an expert's off-home replicas on distinct nodes), then the local
   search of step 5 on nodes. Then each node's replicas are packed LPT-style onto its devices.
   Without homes: all replicas LPT-packed onto the devices directly.
4. LPT: replicas in descending load order, each onto the container whose load per speed stays
   lowest among those with room and not yet holding that expert.
5. Local search on the most loaded container: the best of (swap one of its replicas with any
   other), (re-point one of its slots to another expert: one replica fewer for the old, one more
   for the new) and (grow: one of its experts takes over a slot elsewhere from an expert with
   spare replicas), taken only if every container it changes ends below the old maximum (so the
   sorted load vector falls and the search terminates); it stops when nothing helps.

With a ``Migration`` the search also starts from the previous placement and charges every replica
that lands on a device which did not hold that expert before; the cheaper plan (max/mean plus the
price of the bytes moved) wins against the fresh plan relabelled to overlap the previous one.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Migration", "choose_replicas", "expert_state_bytes", "group_home_nodes", "imbalance", "moved_replicas",
           "rebalance"]

_GIB = float(1 << 30)
_TOL = 1e-9  # relative to the mean device load: moves must gain more than rounding noise
_GOOD_ENOUGH = 0.01  # a plan within 1% of the mean is kept; otherwise the second count candidate is tried


def expert_state_bytes(num_params: int, weight_bytes: int = 2) -> int:
    """Bytes that move with one expert replica: its weights (``weight_bytes`` per parameter, bf16
    by default) plus the fp32 master copy and AdamW's two fp32 moments."""
    return num_params * (weight_bytes + 4 + 4 + 4)


@dataclass(kw_only=True, slots=True)
class Migration:
    """A previous placement and the price of moving away from it."""

    previous: torch.Tensor
    """[layers, num_replicas] the current ``phy2log`` (same shape as the new plan's)."""
    bytes_per_replica: int
    """Bytes one replica carries when it moves: ``expert_state_bytes(params per expert)``."""
    price_per_gib: float
    """Max/mean (per layer) worth one GiB of moved expert state: a re-plan moves a replica only
    if the balance it buys pays for its bytes. 0 = plan fresh, but relabel to move little."""

    def __post_init__(self):
        if self.previous.dim() != 2:
            raise ValueError(f"Migration.previous: shape {tuple(self.previous.shape)}; expected "
                             "[layers, num_replicas] (the phy2log rebalance returned)")
        if self.bytes_per_replica <= 0:
            raise ValueError(f"Migration.bytes_per_replica={self.bytes_per_replica}: must be positive; "
                             "use expert_state_bytes(params per expert)")
        if not self.price_per_gib >= 0:
            raise ValueError(f"Migration.price_per_gib={self.price_per_gib}: must be >= 0 "
                             "(0 = balance only)")


def imbalance(load: torch.Tensor, phy2log: torch.Tensor, num_devices: int,
              device_speed: torch.Tensor | None = None) -> torch.Tensor:
    """EPLB's quality figure per layer: max / mean device load, each replica carrying its expert's
    load / replica count and each device's sum divided by its relative speed.

    load: [layers, experts]; phy2log: [layers, num_replicas]. Returns [layers] (1.0 = perfect;
    a layer without load scores 1.0).
    """
    w = load.double()
    cnt = torch.zeros_like(w).scatter_add_(1, phy2log, torch.ones_like(phy2log, dtype=w.dtype))
    per_slot = (w / cnt.clamp(min=1)).gather(1, phy2log)
    dev = per_slot.view(w.shape[0], num_devices, -1).sum(-1)
    speed = torch.ones(num_devices, dtype=w.dtype) if device_speed is None else device_speed.double()
    mean = dev.sum(-1, keepdim=True) / speed.sum()
    ratio = (dev / speed).max(-1, keepdim=True).values / mean
    return torch.where(mean > 0, ratio, torch.ones_like(ratio)).squeeze(-1)


def moved_replicas(phy2log: torch.Tensor, previous: torch.Tensor, num_devices: int) -> torch.Tensor:
    """Replicas per layer that land on a device which did not hold that expert before (each one
    moves ``expert_state_bytes`` over the network). phy2log, previous: [layers, num_replicas]."""
    new = phy2log.cpu().numpy().reshape(phy2log.shape[0], num_devices, -1)
    old = previous.cpu().numpy().reshape(new.shape)
    num_experts = int(max(new.max(), old.max())) + 1
    return torch.tensor([_moved(n, o, num_experts) for n, o in zip(new, old)])


def group_home_nodes(phy2log: torch.Tensor, num_groups: int, num_nodes: int, num_devices: int) -> torch.Tensor:
    """For each group the lowest node holding a replica of every one of its experts, else -1.

    phy2log: [layers, num_replicas] (experts = its largest id + 1, in ``num_groups`` equal
    consecutive groups). Returns [layers, num_groups] int64. A token routed to groups G reaches
    the nodes {home(g) : g in G}; ``choose_replicas`` keeps it there.
    """
    layers, num_replicas = phy2log.shape
    num_experts = int(phy2log.max()) + 1
    if num_experts % num_groups or num_replicas % num_devices or num_devices % num_nodes:
        raise ValueError(f"group_home_nodes: {num_experts} experts / {num_groups} groups, {num_replicas} "
                         f"slots / {num_devices} devices, {num_devices} devices / {num_nodes} nodes must divide")
    slot_node = torch.arange(num_replicas) // (num_replicas // num_nodes)
    present = torch.zeros(layers, num_nodes, num_experts, dtype=torch.bool)
    present[torch.arange(layers)[:, None], slot_node[None, :], phy2log] = True
    full = present.view(layers, num_nodes, num_groups, -1).all(-1)  # [layers, nodes, groups]
    first = full.int().argmax(1)  # argmax returns the first maximal index
    return torch.where(full.any(1), first, torch.full_like(first, -1))


def rebalance(load: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_devices: int, *,
              device_speed: torch.Tensor | None = None, migration: Migration | None = None,
              coselect: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Place ``num_replicas`` replicas of the experts on ``num_devices`` devices (module docstring).

    load: [layers, experts] non-negative load per expert (e.g. tokens routed to it).
    num_groups: expert groups of node-limited routing (consecutive ids); home nodes are guaranteed
        when ``num_nodes`` divides it (otherwise, like EPLB's global policy, groups have none).
    device_speed: [num_devices] relative speeds (> 0); a device gets load in proportion.
    migration: previous placement and the price of moving expert state (``Migration``).
    coselect: [layers, num_groups, num_groups] fraction of the tokens routed to group g that are
        also routed to group g' (diagonal 1), as a runtime counts it. With it, a replica goes off
        its home node only where enough of its expert's tokens reach that node for its share
        (module docstring); without it the plan balances EPLB's measure alone.
    Returns phy2log [layers, num_replicas], log2phy [layers, experts, max replicas] (-1 padded),
    logcnt [layers, experts], all int64.
    """
    if load.dim() != 2:
        raise ValueError(f"load: shape {tuple(load.shape)}; expected [layers, experts]")
    w_all = load.detach().double().cpu().numpy()
    layers, num_experts = w_all.shape
    if not (np.isfinite(w_all).all() and (w_all >= 0).all()):
        raise ValueError("load: must be finite and >= 0 (token counts or rates per expert)")
    if num_devices < 1 or num_nodes < 1 or num_devices % num_nodes:
        raise ValueError(f"num_devices={num_devices}: must be a positive multiple of num_nodes={num_nodes}")
    if num_replicas % num_devices:
        raise ValueError(f"num_replicas={num_replicas}: must be a multiple of num_devices={num_devices} "
                         "(every device holds the same number of slots)")
    if not num_experts <= num_replicas <= num_experts * num_devices:
        raise ValueError(f"num_replicas={num_replicas}: must be in {num_experts}..{num_experts * num_devices} "
                         "(every expert needs a slot; more slots per device than experts forces two "
                         "replicas of one expert onto a device)")
    if num_groups < 1 or num_experts % num_groups:
        raise ValueError(f"num_groups={num_groups}: must divide the {num_experts} experts")
    if device_speed is None:
        speed = np.ones(num_devices)
    else:
        speed = device_speed.detach().double().cpu().numpy()
        if speed.shape != (num_devices,) or not (np.isfinite(speed).all() and (speed > 0).all()):
            raise ValueError(f"device_speed: expected [{num_devices}] positive finite relative speeds")
    prev = None
    if migration is not None:
        prev = migration.previous.detach().cpu().numpy()
        if prev.shape != (layers, num_replicas) or prev.min() < 0 or prev.max() >= num_experts:
            raise ValueError(f"Migration.previous: shape {prev.shape} with ids in 0..{num_experts - 1} "
                             f"expected [{layers}, {num_replicas}]")

    co = None
    if coselect is not None:
        co = coselect.detach().double().cpu().numpy()
        if co.shape != (layers, num_groups, num_groups) or not ((co >= 0) & (co <= 1)).all():
            raise ValueError(f"coselect: expected [{layers}, {num_groups}, {num_groups}] fractions in [0, 1]")
    shape = _Shape(num_experts, num_replicas, num_groups, num_nodes, num_devices, speed)
    phy2log = np.empty((layers, num_replicas), dtype=np.int64)
    for layer in range(layers):
        co_layer = None if co is None else co[layer]
        if migration is None:
            phy2log[layer] = _plan_layer(w_all[layer], shape, None, 0.0, co_layer)
        else:
            price = migration.price_per_gib * migration.bytes_per_replica / _GIB  # per replica moved
            phy2log[layer] = _plan_layer(w_all[layer], shape, prev[layer], price, co_layer)

    logcnt = np.zeros((layers, num_experts), dtype=np.int64)
    np.add.at(logcnt, (np.arange(layers)[:, None], phy2log), 1)
    log2phy = np.full((layers, num_experts, int(logcnt.max())), -1, dtype=np.int64)
    order = np.argsort(phy2log, axis=1, kind="stable")  # slots grouped by expert, ascending
    rank = np.arange(num_replicas)[None, :] - np.take_along_axis(
        np.concatenate([np.zeros((layers, 1), np.int64), logcnt.cumsum(1)[:, :-1]], 1),
        np.take_along_axis(phy2log, order, 1), 1)
    log2phy[np.arange(layers)[:, None], np.take_along_axis(phy2log, order, 1), rank] = order
    return torch.from_numpy(phy2log), torch.from_numpy(log2phy), torch.from_numpy(logcnt)


@dataclass(slots=True)
class _Shape:
    num_experts: int
    num_replicas: int
    num_groups: int
    num_nodes: int
    num_devices: int
    speed: np.ndarray

    @property
    def slots(self) -> int:
        return self.num_replicas // self.num_devices

    @property
    def homed(self) -> bool:
        return self.num_groups % self.num_nodes == 0


def _plan_layer(w: np.ndarray, shape: _Shape, prev: np.ndarray | None, price: float,
                co: np.ndarray | None) -> np.ndarray:
    """One layer's phy2log [num_replicas]: the fresh plan, or with a previous placement the cheaper
    of (search from the previous plan) and (fresh plan relabelled to overlap it)."""
    num_devices, num_nodes = shape.num_devices, shape.num_nodes
    per_node = num_devices // num_nodes
    dev_node = np.arange(num_devices) // per_node
    prev_home = _homes_of(prev, shape) if prev is not None else None
    home = _pack_groups(w, shape) if prev_home is None else prev_home
    reach = _reach(co, home, shape)
    one_per_device = np.ones((shape.num_experts, num_devices), dtype=np.int64)
    plans = []
    for cnt in _replica_counts(w, shape.num_replicas, num_devices, shape.num_groups, shape.speed):
        if plans and plans[0][0] <= 1 + _GOOD_ENOUGH:
            break
        node_cap = _node_caps(cnt, home, num_nodes, per_node, reach)
        slots = _fresh_plan(w, cnt, home, shape, node_cap, reach)
        if slots is None:  # these counts do not fit the node limits; another candidate does
            continue
        plans.append((_imbalance_1(w, slots, shape), len(plans), slots, node_cap))
    assert plans, "the greedy counts always fit the plain node limits"
    _, _, slots, node_cap = min(plans)
    if prev is None:
        return slots.ravel()
    prev_slots = prev.reshape(num_devices, shape.slots)
    candidates = [_align(slots, prev_slots, shape)]
    if prev_home is not None and _distinct(prev_slots):
        prev_node_held = np.zeros((shape.num_experts, num_nodes), dtype=np.int64)
        np.add.at(prev_node_held, (prev_slots, dev_node[:, None]), 1)
        candidates.append(_local_search(w, prev_slots.copy(), home, dev_node, shape.speed, one_per_device,
                                        np.maximum(node_cap, prev_node_held), prev_slots, price, reach=reach))
    cost = [_imbalance_1(w, c, shape) + price * _moved(c, prev_slots, shape.num_experts) for c in candidates]
    return candidates[int(np.argmin(cost))].ravel()


def _fresh_plan(w: np.ndarray, cnt: np.ndarray, home: np.ndarray, shape: _Shape, node_cap: np.ndarray,
                reach: np.ndarray | None) -> np.ndarray | None:
    """Steps 3-4 of the module docstring for given counts: slots [num_devices, slots]; None when the
    counts cannot be packed within the node limits."""
    num_devices, num_nodes = shape.num_devices, shape.num_nodes
    per_node = num_devices // num_nodes
    if home[0] >= 0:  # node level first: node loads can differ from group loads only via free replicas
        node_speed = shape.speed.reshape(num_nodes, per_node).sum(1)
        nodes = _node_packing(w, cnt, home, shape, node_speed, node_cap, reach)
        if nodes is None:
            return None
        # a node-level move must not make a replica heavier than a device's share (or than the
        # heaviest one already is): whole nodes balance but a replica cannot be split over devices
        heavy = max((w / cnt).max(), w.sum() / shape.speed.sum() * shape.speed.min())
        nodes = _local_search(w, nodes, home, np.arange(num_nodes), node_speed, node_cap, node_cap, None, 0.0,
                              heavy, reach)
        rl = w / np.bincount(nodes.reshape(-1), minlength=shape.num_experts)
        slots = np.concatenate([
            _lpt(rl, nodes[n], shape.slots, shape.speed[n * per_node:(n + 1) * per_node]) for n in range(num_nodes)])
    else:
        slots = _lpt(w / cnt, np.repeat(np.arange(shape.num_experts), cnt), shape.slots, shape.speed)
    return _local_search(w, slots, home, np.arange(num_devices) // per_node, shape.speed,
                         np.ones((shape.num_experts, num_devices), dtype=np.int64), node_cap, None, 0.0,
                         reach=reach)


def _node_caps(cnt: np.ndarray, home: np.ndarray, num_nodes: int, per_node: int,
               reach: np.ndarray | None) -> np.ndarray:
    """[experts, nodes] replicas an expert may have on a node: one per device on its home node,
    elsewhere as few as its count allows (one, usually). A replica off the home node serves only
    tokens that reach that node anyway, so an expert's off-home replicas are spread over distinct
    nodes: more of its tokens can use one of them; with ``reach``, none where fewer than 1 / count
    of its tokens arrive. Without homes: no limit beyond the devices."""
    if home[0] < 0 or num_nodes == 1:
        return np.full((len(cnt), num_nodes), per_node, dtype=np.int64)
    off = np.maximum(1, -(-(cnt - per_node) // (num_nodes - 1)))
    cap = np.repeat(np.minimum(off, per_node)[:, None], num_nodes, axis=1)
    if reach is not None:
        cap[reach < 1.0 / cnt[:, None]] = 0
    cap[np.arange(len(cnt)), home] = per_node
    return cap


def _reach(co: np.ndarray | None, home: np.ndarray, shape: _Shape) -> np.ndarray | None:
    """[experts, nodes] fraction of an expert's tokens that reach each node anyway (1 on its home
    node): the best co-selection with a group homed there. None without coselect or homes."""
    if co is None or home[0] < 0:
        return None
    per_group = shape.num_experts // shape.num_groups
    group_home = home[::per_group]
    by_node = np.zeros((shape.num_groups, shape.num_nodes))
    for g2, n in enumerate(group_home):
        by_node[:, n] = np.maximum(by_node[:, n], co[:, g2])
    reach = np.repeat(by_node, per_group, axis=0)
    reach[np.arange(shape.num_experts), home] = 1.0
    return reach


def _homes_of(prev: np.ndarray, shape: _Shape) -> np.ndarray | None:
    """The previous plan's home node per expert, if it homes every group the way _pack_groups would
    (groups_per_node on every node); None otherwise (then homes are packed afresh)."""
    if not shape.homed:
        return np.full(shape.num_experts, -1)
    per_node = shape.num_groups // shape.num_nodes
    homes = group_home_nodes(torch.from_numpy(prev)[None], shape.num_groups, shape.num_nodes,
                             shape.num_devices)[0].numpy()
    if (homes < 0).any() or (np.bincount(homes, minlength=shape.num_nodes) != per_node).any():
        return None
    return np.repeat(homes, shape.num_experts // shape.num_groups)


def _pack_groups(w: np.ndarray, shape: _Shape) -> np.ndarray:
    """Home node per expert (-1 everywhere when num_nodes does not divide num_groups)."""
    if not shape.homed:
        return np.full(shape.num_experts, -1)
    per_node = shape.num_groups // shape.num_nodes
    group_load = w.reshape(shape.num_groups, -1).sum(1)
    node_speed = shape.speed.reshape(shape.num_nodes, -1).sum(1)
    node_load = np.zeros(shape.num_nodes)
    node_count = np.zeros(shape.num_nodes, dtype=np.int64)
    home = np.empty(shape.num_groups, dtype=np.int64)
    for g in np.argsort(-group_load, kind="stable"):
        open_nodes = np.flatnonzero(node_count < per_node)
        n = open_nodes[np.argmin((node_load[open_nodes] + group_load[g]) / node_speed[open_nodes])]
        home[g] = n
        node_load[n] += group_load[g]
        node_count[n] += 1
    return np.repeat(home, shape.num_experts // shape.num_groups)


def _replica_counts(w: np.ndarray, num_replicas: int, num_devices: int, num_groups: int,
                    speed: np.ndarray) -> list[np.ndarray]:
    """Candidate replicas per expert (step 2), at most num_devices each. Greedy: each extra replica
    to the expert whose replicas carry the most (ties round-robin over the groups, so that equal
    loads do not pile every extra replica into group 0). Filler: just enough replicas that none
    carries more than a device's share, the remaining slots filled with the lightest experts (a
    slot must hold something; a light replica adds almost nothing where it lands). With devices of
    several speeds, one filler per speed (its devices' share, fastest first): slow devices need light
    replicas, which the greedy, blind to speed, may not make."""
    per_group = len(w) // num_groups
    tie = (np.arange(len(w)) % per_group) * num_groups + np.arange(len(w)) // per_group
    cnt = np.ones(len(w), dtype=np.int64)
    heap = [(-w[e], 1, tie[e], e) for e in range(len(w))]
    heapq.heapify(heap)
    for _ in range(num_replicas - len(w)):
        _, c, t, e = heapq.heappop(heap)
        cnt[e] = c + 1
        if c + 1 < num_devices:  # a device never holds two replicas of one expert
            heapq.heappush(heap, (-w[e] / (c + 1), c + 1, t, e))
    out = [cnt]
    for v in np.unique(speed)[::-1]:
        share = w.sum() * v / speed.sum()
        if share <= 0:
            break
        filler = np.clip(np.ceil(w / share - 1e-9), 1, num_devices).astype(np.int64)
        spare = num_replicas - filler.sum()
        if spare < 0:
            continue
        # lightest first, equal loads round-robin over the groups (as the greedy's ties): extras piled
        # into one group's experts can overflow the other nodes' free slots under node limits
        for e in itertools.islice(itertools.cycle(np.lexsort((tie, w))), None):
            if spare == 0:
                break
            if filler[e] < num_devices:
                filler[e] += 1
                spare -= 1
        if not any(np.array_equal(filler, c) for c in out):
            out.append(filler)
    return out


def _node_packing(w: np.ndarray, cnt: np.ndarray, home: np.ndarray, shape: _Shape,
                  node_speed: np.ndarray, node_cap: np.ndarray, reach: np.ndarray | None) -> np.ndarray | None:
    """Replicas onto nodes: [num_nodes, slots per node] expert ids (None: the counts do not fit the
    node limits). Every expert's first replica sits on its home node; the others are packed
    LPT-style onto the nodes within ``node_cap``.
    With ``reach``, an expert keeps at home the replicas its off-home ones could not relieve
    (``_Fits``: the tokens reaching none of its off-home nodes need its home replicas)."""
    num_nodes = shape.num_nodes
    per_node = shape.num_devices // num_nodes
    at_home = np.ones(shape.num_experts, dtype=np.int64)
    if reach is not None:
        cnt = _fill_unreached(w, cnt, home, reach, shape)
        node_cap = _node_caps(cnt, home, num_nodes, per_node, reach)
        room = shape.num_replicas // num_nodes - np.bincount(home, minlength=num_nodes)
        for e in np.flatnonzero(cnt > 1):
            r = np.sort(np.where(node_cap[e] > 0, reach[e], 0.0))[::-1][1:]  # best off-home nodes first
            k = 0  # off-home replicas this expert can use
            while (k < min(cnt[e] - 1, len(r)) and r[k] >= 1.0 / cnt[e]
                   and np.prod(1 - r[:k + 1]) <= (cnt[e] - k - 1) / cnt[e]):
                k += 1
            extra = min(cnt[e] - 1 - k, per_node - 1, room[home[e]])
            at_home[e] += extra
            room[home[e]] -= extra
        # slots that no other expert's replica may take go to the node's own experts up front
        # (LPT alone would fill the popular nodes first and strand these replicas)
        others = ((cnt - at_home)[:, None] * ((node_cap > 0) & (home[:, None] != np.arange(num_nodes)))).sum(0)
        for n in np.flatnonzero(room > others):
            mine = np.flatnonzero(home == n)
            for _ in range(room[n] - others[n]):
                ok = mine[(at_home[mine] < cnt[mine]) & (at_home[mine] < per_node)]
                if not ok.size:
                    break
                at_home[ok[np.argmax(w[ok] / cnt[ok])]] += 1
                room[n] -= 1
    homes = [np.repeat(np.flatnonzero(home == n), at_home[home == n]) for n in range(num_nodes)]
    rl = w / cnt
    base = np.array([rl[h].sum() for h in homes])
    free = np.repeat(np.arange(shape.num_experts), cnt - at_home)
    free = free[np.argsort(-rl[free], kind="stable")]
    size = shape.num_replicas // num_nodes - np.array([len(h) for h in homes])
    held = np.zeros((shape.num_experts, num_nodes), dtype=np.int64)
    held[np.arange(shape.num_experts), home] = at_home
    where = _assign(rl, free, size, node_speed, base, held, node_cap)
    if where is None:  # LPT found no way within the reach limits: pack within the plain limits instead,
        # accepting that some off-home replicas then get less than their share (seen at sigma 1.5)
        where = _assign(rl, free, size, node_speed, base, held, _node_caps(cnt, home, num_nodes, per_node, None))
    if where is None:
        return None
    return np.stack([np.concatenate([homes[n], free[where == n]]) for n in range(num_nodes)])


def _fill_unreached(w: np.ndarray, cnt: np.ndarray, home: np.ndarray, reach: np.ndarray, shape: _Shape) -> np.ndarray:
    """Counts adjusted so that every node's free slots can be filled: under reach limits a node
    whose groups few tokens pick can take almost no other expert's replica, so its own experts get
    extra (home) replicas instead -- the heaviest replicas first -- taken from the experts whose
    replicas then stay lightest."""
    num_nodes = shape.num_nodes
    per_node = shape.num_devices // num_nodes
    cnt = cnt.copy()
    free_slots = shape.num_replicas // num_nodes - np.bincount(home, minlength=num_nodes)
    own = home[:, None] == np.arange(num_nodes)[None, :]
    for _ in range(shape.num_replicas):
        allowed = (reach >= 1.0 / cnt[:, None]) & ~own
        spare = (cnt - 1)[:, None]
        supply = (np.minimum(spare, per_node - 1) * own).sum(0) + (spare * allowed).sum(0)
        n = int(np.argmax(free_slots - supply))
        if free_slots[n] <= supply[n]:
            break
        gain = np.flatnonzero((home == n) & (cnt < per_node))
        lose = np.flatnonzero((home != n) & (cnt >= 2))
        if not (gain.size and lose.size):
            break
        cnt[gain[np.argmax(w[gain] / (cnt[gain] + 1))]] += 1
        cnt[lose[np.argmin(w[lose] / (cnt[lose] - 1))]] -= 1
    return cnt


def _lpt(rl: np.ndarray, experts: np.ndarray, per_device: int, speed: np.ndarray) -> np.ndarray:
    """Replicas (expert ids, one entry per replica; ``rl`` [experts] the load one replica carries)
    onto len(speed) devices of per_device slots, no expert twice on a device: [devices, per_device]."""
    items = experts[np.argsort(-rl[experts], kind="stable")]
    held = np.zeros((len(rl), len(speed)), dtype=np.int64)
    where = _assign(rl, items, np.full(len(speed), per_device), speed, np.zeros(len(speed)), held,
                    np.ones_like(held))
    assert where is not None, "one replica per device always fits: counts <= devices"
    return np.stack([items[where == d] for d in range(len(speed))])


def _assign(rl: np.ndarray, items: np.ndarray, size: np.ndarray, speed: np.ndarray, load: np.ndarray,
            held: np.ndarray, cap: np.ndarray) -> np.ndarray | None:
    """LPT: items (expert ids, heaviest replica first) each into the container whose load / speed
    stays lowest among those with room and fewer than ``cap[e, c]`` replicas of that expert. ``held``
    [experts, containers] counts replicas already there (not movable). Returns the container per
    item. When every container with room is full of that expert, an earlier item moves into the
    room and the new one takes its place (a swap that keeps the limits); None if none can."""
    load, held, size = load.copy(), held.copy(), size.copy()
    where = np.full(len(items), -1, dtype=np.int64)
    for k, e in enumerate(items):
        room = size > 0
        ok = room & (held[e] < cap[e])
        if ok.any():
            cand = np.flatnonzero(ok)
            c = cand[np.argmin((load[cand] + rl[e]) / speed[cand])]
        else:
            c = int(np.flatnonzero(room)[0])
            movable = [j for j in range(k)
                       if held[e, where[j]] < cap[e, where[j]] and held[items[j], c] < cap[items[j], c]]
            if not movable:
                return None
            j = min(movable, key=lambda j: max((load[c] + rl[items[j]]) / speed[c],
                                               (load[where[j]] - rl[items[j]] + rl[e]) / speed[where[j]]))
            c2, x = where[j], items[j]
            where[j] = c
            held[x, c2] -= 1
            held[x, c] += 1
            load[c2] -= rl[x]
            load[c] += rl[x]
            size[c] -= 1
            size[c2] += 1
            c = c2
        where[k] = c
        held[e, c] += 1
        load[c] += rl[e]
        size[c] -= 1
    return where


def _local_search(w: np.ndarray, slots: np.ndarray, home: np.ndarray, cont_node: np.ndarray, speed: np.ndarray,
                  cap: np.ndarray, node_cap: np.ndarray, prev_slots: np.ndarray | None, price: float,
                  heavy: float = np.inf, reach: np.ndarray | None = None) -> np.ndarray:
    """Improve slots [containers, slots each] (expert ids; containers are devices or nodes) in place
    by swaps / re-pointing on the most loaded container (module docstring, step 4), keeping at most
    ``cap[e, c]`` replicas of expert e in container c and ``node_cap[e, n]`` on node n, and a replica of every
    homed expert on its home node (``cont_node`` maps container -> node), and no replica heavier
    than ``heavy`` after re-pointing; with ``reach`` an expert's off-home replicas must stay
    usable (``_fits``). With prev_slots, a move pays ``price`` (in max/mean) per replica it places
    where that expert was not before."""
    num_cont, per_cont = slots.shape
    num_experts = len(w)
    dev = np.repeat(np.arange(num_cont), per_cont)
    node = cont_node[dev]
    flat = slots.reshape(-1)
    holds = np.zeros((num_experts, num_cont), dtype=np.int64)
    np.add.at(holds, (flat, dev), 1)
    cnt = holds.sum(1)
    node_holds = np.zeros((num_experts, node_cap.shape[1]), dtype=np.int64)
    np.add.at(node_holds, (flat, node), 1)
    new_pay = np.full((num_experts, num_cont), price)  # cost of a replica of e newly in container c
    if prev_slots is not None:
        new_pay[prev_slots.reshape(-1), dev] = 0.0
    mean = w.sum() / speed.sum()
    if mean <= 0:
        return slots
    tol = _TOL * mean
    for _ in range(20 * len(flat)):
        rl = w / cnt
        load = np.bincount(dev, rl[flat], num_cont) / speed
        d = int(np.argmax(load))
        top = load[d]
        mine = np.arange(d * per_cont, (d + 1) * per_cont)
        x = flat[mine]
        home_cnt = np.where(home >= 0, node_holds[np.arange(num_experts), np.maximum(home, 0)], 0)
        # leaving container c's node breaks the home rule for the sole replica on the home node
        pinned = (home >= 0) & (home_cnt == 1)
        fits = _Fits(reach, node_holds, home, cnt, home_cnt)
        # swaps: slot i on d with slot j elsewhere (columns that no row can use are dropped first)
        cross_all = node != cont_node[d]
        cols = np.flatnonzero((dev != d) & (holds[flat, d] < cap[flat, d])
                              & ~(pinned[flat] & (home[flat] == node) & cross_all)
                              & ~(cross_all & (node_holds[flat, cont_node[d]] >= node_cap[flat, cont_node[d]])))
        y, dj, cross = flat[cols], dev[cols], cross_all[cols]
        new_d = top + (rl[y][None, :] - rl[x][:, None]) / speed[d]
        new_j = load[dj][None, :] + (rl[x][:, None] - rl[y][None, :]) / speed[dj][None, :]
        ok = ((x[:, None] != y[None, :]) & (holds[x[:, None], dj[None, :]] < cap[x[:, None], dj[None, :]])
              & ~((pinned[x] & (home[x] == cont_node[d]))[:, None] & cross[None, :])
              & ~(cross[None, :] & (node_holds[x[:, None], node[cols][None, :]]
                                    >= node_cap[x[:, None], node[cols][None, :]])))
        if reach is not None:  # a cross-node swap moves x to dj's node and y to d's
            nd = cont_node[d]
            ok &= ~cross[None, :] | (fits(x[:, None], 0, node[cols][None, :], nd) & fits(y, 0, nd, node[cols])[None, :])
        score = np.maximum(new_d, new_j)
        pay = (new_pay[y, d][None, :] + new_pay[x[:, None], dj[None, :]]
               - new_pay[x, d][:, None] - new_pay[y, dj][None, :])
        gain = np.where(ok & (score < top - tol), (top - score) / mean - pay, -np.inf)
        best = (-np.inf, "swap", 0, 0)
        if gain.size:
            i, j = np.unravel_index(int(np.argmax(gain)), gain.shape)
            best = (gain[i, j], "swap", i, cols[j])
        # re-pointing: slot i on d now holds expert b instead of a (a loses a replica, b gains one)
        delta = w / (cnt + 1) - rl  # each of b's replicas lightens ...
        lighter = load[None, :] + holds * delta[:, None] / speed[None, :]
        lighter[holds == 0] = -np.inf
        lighter[:, d] = -np.inf
        b_side = lighter.max(1)  # ... on every container holding b (d apart): [experts]
        okb0 = (holds[:, d] < cap[:, d]) & (node_holds[:, cont_node[d]] < node_cap[:, cont_node[d]])
        if reach is not None:
            okb0 &= fits(np.arange(num_experts), 1, cont_node[d], -1)
        for i in np.unique(x, return_index=True)[1]:
            a = x[i]
            if (cnt[a] < 2 or w[a] / (cnt[a] - 1) > heavy
                    or (pinned[a] and home[a] == cont_node[d] and holds[a, d] == 1)
                    or (reach is not None and not fits(a, -1, -1, cont_node[d]))):
                continue
            grow = (w[a] / (cnt[a] - 1) - rl[a]) / speed  # per replica of a that stays
            on_a = np.flatnonzero(holds[a] > 0)
            on_a = on_a[on_a != d]
            a_side = (load[on_a] + holds[a, on_a] * grow[on_a])[None, :] + holds[:, on_a] * delta[:, None] / speed[on_a]
            new_d = (top + ((holds[a, d] - 1) * (w[a] / (cnt[a] - 1)) - holds[a, d] * rl[a]) / speed[d]
                     + (holds[:, d] * delta + w / (cnt + 1)) / speed[d])
            sc = np.maximum(np.maximum(new_d, b_side), a_side.max(1) if len(on_a) else -np.inf)
            okb = okb0 & (sc < top - tol)
            okb[a] = False
            g = np.where(okb, (top - sc) / mean - new_pay[:, d] + new_pay[a, d], -np.inf)
            b = int(np.argmax(g))
            if g[b] > best[0]:
                best = (g[b], "point", i, b)
        # growing: one of d's experts b gains a replica in slot j elsewhere (replacing expert a
        # there, which loses one): every container holding b lightens, d included
        a_all = flat
        grow = np.where(cnt >= 2, w / np.maximum(cnt - 1, 1) - rl, 0.0)
        heavier = np.where(holds > 0, load[None, :] + holds * grow[:, None] / speed[None, :], -np.inf)
        first = heavier.argmax(1)
        top1 = heavier[np.arange(num_experts), first]
        heavier[np.arange(num_experts), first] = -np.inf
        a_side = np.where(first[a_all] == dev, heavier.max(1)[a_all], top1[a_all])  # other holders of a
        b_side = np.where(holds > 0, load[None, :] + holds * delta[:, None] / speed[None, :], -np.inf).max(1)
        ok_a = ((dev != d) & (cnt[a_all] >= 2) & (w[a_all] / np.maximum(cnt[a_all] - 1, 1) <= heavy)
                & ~(pinned[a_all] & (home[a_all] == node) & (holds[a_all, dev] == 1)))
        if reach is not None:
            ok_a &= fits(a_all, -1, -1, node)
        base_j = load[dev] + (-rl[a_all] + (holds[a_all, dev] - 1) * grow[a_all]) / speed[dev]
        bs = np.unique(x)[:, None]  # [candidates b, 1] against every slot j
        new_j = base_j + (holds[bs, dev] * delta[bs] + w[bs] / (cnt[bs] + 1)) / speed[dev]
        sc = np.maximum(np.maximum(new_j, a_side), b_side[bs])
        okj = (ok_a & (a_all != bs) & (holds[bs, dev] < cap[bs, dev]) & (node_holds[bs, node] < node_cap[bs, node])
               & (sc < top - tol))
        if reach is not None:
            okj &= fits(bs, 1, node, -1)
        g = np.where(okj, (top - sc) / mean - new_pay[bs, dev] + new_pay[a_all, dev], -np.inf)
        k, j = np.unravel_index(int(np.argmax(g)), g.shape)
        if g[k, j] > best[0]:
            best = (g[k, j], "grow", j, bs[k, 0])
        if not best[0] > _TOL:
            break
        _, kind, i, j = best
        if kind == "swap":
            a, s, b, dj_ = x[i], mine[i], flat[j], dev[j]
            flat[s], flat[j] = b, a
            holds[a, d] -= 1
            holds[b, d] += 1
            holds[b, dj_] -= 1
            holds[a, dj_] += 1
            node_holds[[a, b], [cont_node[d], cont_node[d]]] += [-1, 1]
            node_holds[[b, a], [cont_node[dj_], cont_node[dj_]]] += [-1, 1]
            continue
        s, b = (mine[i], j) if kind == "point" else (i, j)  # slot s now holds expert b
        a, c = flat[s], dev[s]
        flat[s] = b
        holds[a, c] -= 1
        holds[b, c] += 1
        node_holds[[a, b], [cont_node[c], cont_node[c]]] += [-1, 1]
        cnt[a] -= 1
        cnt[b] += 1
    return slots


class _Fits:
    """Whether an expert's off-home replicas stay usable after a change, for node-limited routing
    where a replica on node n gets only the tokens that reach n anyway (``reach`` [experts, nodes]).
    Tokens are assumed to reach nodes independently; water-filling (``choose_replicas``) can then
    give every replica its 1/count share if (a) each off-home node gets >= 1/count of the tokens and
    (b) the tokens reaching none of them, prod(1 - reach), fit on the home replicas: <= home/count."""

    def __init__(self, reach: np.ndarray | None, node_holds: np.ndarray, home: np.ndarray, cnt: np.ndarray,
                 home_cnt: np.ndarray):
        if reach is None:
            return
        self.reach, self.node_holds, self.home, self.cnt, self.home_cnt = reach, node_holds, home, cnt, home_cnt
        self.log_miss = np.log(np.clip(1.0 - reach, 1e-300, None))
        off = (node_holds > 0) & (np.arange(node_holds.shape[1])[None, :] != home[:, None])
        self.log_none = np.where(off, self.log_miss, 0.0).sum(1)
        self.min_reach = np.where(off, reach, np.inf).min(1)

    def __call__(self, e, dcount, add, remove):
        """e gains (dcount = +1), loses (-1) or moves (0) a replica: onto node ``add`` (-1: none)
        and off node ``remove`` (-1: none). Broadcasts over arrays."""
        e, add, remove = np.broadcast_arrays(e, add, remove)
        home = self.home[e]
        has_add, has_rem = add >= 0, remove >= 0
        a, r = np.where(has_add, add, home), np.where(has_rem, remove, home)
        add_off = has_add & (a != home) & (self.node_holds[e, a] == 0)  # a new off-home node
        rem_off = has_rem & (r != home) & (self.node_holds[e, r] == 1)  # an off-home node left
        log_none = (self.log_none[e] + np.where(add_off, self.log_miss[e, a], 0.0)
                    - np.where(rem_off, self.log_miss[e, r], 0.0))
        at_home = self.home_cnt[e] + (has_add & (a == home)) - (has_rem & (r == home))
        cnt = self.cnt[e] + dcount
        min_reach = np.minimum(self.min_reach[e], np.where(add_off, self.reach[e, a], np.inf))
        with np.errstate(divide="ignore", invalid="ignore"):  # cnt 0: a move other checks reject
            return (min_reach * cnt >= 1 - 1e-9) & (log_none <= np.log(at_home / cnt) + 1e-9)


def _imbalance_1(w: np.ndarray, slots: np.ndarray, shape: _Shape) -> float:
    cnt = np.bincount(slots.reshape(-1), minlength=shape.num_experts)
    dev_load = (w / np.maximum(cnt, 1))[slots].sum(1) / shape.speed
    mean = w.sum() / shape.speed.sum()
    return float(dev_load.max() / mean) if mean > 0 else 1.0


def _moved(slots: np.ndarray, prev_slots: np.ndarray, num_experts: int) -> int:
    """Replicas placed on a device that did not hold that expert before."""
    num_devices = slots.shape[0]
    before = np.zeros((num_experts, num_devices), dtype=bool)
    before[prev_slots, np.arange(num_devices)[:, None]] = True
    return int((~before[slots, np.arange(num_devices)[:, None]]).sum())


def _distinct(slots: np.ndarray) -> bool:
    s = np.sort(slots, axis=1)
    return bool((s[:, 1:] != s[:, :-1]).all())


def _align(slots: np.ndarray, prev_slots: np.ndarray, shape: _Shape) -> np.ndarray:
    """Relabel a plan's devices inside each node (among devices of equal speed) so that it keeps as
    many replicas where the previous plan had them as a greedy matching finds. Homes are already
    the previous plan's, so nodes keep their labels."""
    per_node = shape.num_devices // shape.num_nodes
    out = slots.copy()
    for n in range(shape.num_nodes):
        devs = np.arange(n * per_node, (n + 1) * per_node)
        overlap = np.array([[np.isin(slots[a], prev_slots[b]).sum() for b in devs] for a in devs], dtype=float)
        overlap[shape.speed[devs][:, None] != shape.speed[devs][None, :]] = -1.0
        free_new, free_old = set(range(per_node)), set(range(per_node))
        for flat_idx in np.argsort(-overlap, axis=None, kind="stable"):
            a, b = divmod(int(flat_idx), per_node)
            if a in free_new and b in free_old and overlap[a, b] >= 0:
                out[devs[b]] = slots[devs[a]]
                free_new.discard(a)
                free_old.discard(b)
    return out


def choose_replicas(indices: torch.Tensor, phy2log: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor, *,
                    num_groups: int, num_nodes: int, num_devices: int) -> torch.Tensor:
    """Pick for every (token, expert) one physical replica on a node the token already reaches.

    indices: [tokens, top_k] logical experts of one layer; phy2log [num_replicas], log2phy [experts,
    max replicas], logcnt [experts] that layer's placement. Returns phys [tokens, top_k] int64.

    A token's home-node set is {home(g) : g a group of its experts} (``group_home_nodes``). A pair's
    eligible replicas are those of its expert on that set -- the home replica always is -- or all of
    them when the expert's group has no home (no node limit to keep). The rule: pairs are grouped by
    (expert, eligible set); per expert the groups are taken most constrained first (fewest eligible
    replicas, then in replica order) and water-filled onto their eligible replicas, so that the
    replicas' token counts end as equal as the eligibility allows. Inside a group the pairs are
    ordered by a fixed multiplicative hash of the token index, so that consecutive tokens (one
    source rank's) spread over the replicas. Deterministic; vectorised over experts (a loop over an
    expert's groups: at most its distinct eligible sets); only pairs of replicated experts are sorted.
    """
    if indices.dim() != 2:
        raise ValueError(f"indices: shape {tuple(indices.shape)}; expected [tokens, top_k]")
    num_replicas = phy2log.shape[0]
    per_device = num_replicas // num_devices
    e = indices.reshape(-1).cpu().numpy()
    num_tokens, top_k = indices.shape
    num_experts = logcnt.shape[0]
    if e.size and (e.min() < 0 or e.max() >= num_experts):
        raise ValueError(f"indices: expert ids must be in 0..{num_experts - 1}")
    l2p = log2phy.cpu().numpy()
    if num_replicas == num_experts:  # one replica each (no redundant experts): nothing to choose
        return torch.from_numpy(l2p[e, 0].reshape(num_tokens, top_k))
    home = group_home_nodes(phy2log[None], num_groups, num_nodes, num_devices)[0].numpy()
    tok = np.repeat(np.arange(num_tokens), top_k)
    pair_home = home[e // (num_experts // num_groups)]
    reach = np.zeros((num_tokens, num_nodes), dtype=bool)
    reach[tok[pair_home >= 0], pair_home[pair_home >= 0]] = True
    phys = l2p[e, 0].copy()  # an expert with one replica: that one (its home replica, always eligible)
    many = np.flatnonzero(logcnt.cpu().numpy()[e] > 1)
    if many.size == 0:
        return torch.from_numpy(phys.reshape(num_tokens, top_k))
    e, tok, pair_home = e[many], tok[many], pair_home[many]
    node_of = np.where(l2p >= 0, l2p, 0) // per_device // (num_devices // num_nodes)  # [experts, max replicas]
    reps = l2p[e]  # [pairs, max replicas]
    elig = (reps >= 0) & ((pair_home < 0)[:, None] | reach[tok[:, None], node_of[e]])
    # group pairs by (expert, eligible set), most constrained first, hashed token order inside
    size = elig.sum(1)
    spread = (tok.astype(np.uint64) * np.uint64(2654435761)) % np.uint64(1 << 32)
    order = np.lexsort((spread, *elig.T[::-1], size, e))
    es, el = e[order], elig[order]
    starts = np.flatnonzero(np.r_[True, (es[1:] != es[:-1]) | (el[1:] != el[:-1]).any(1)])
    ends = np.r_[starts[1:], len(order)]
    group_expert = es[starts]
    first = np.flatnonzero(np.r_[True, group_expert[1:] != group_expert[:-1]])  # each expert's first group
    turn = np.arange(len(starts)) - np.repeat(first, np.diff(np.r_[first, len(starts)]))
    # an expert's groups water-fill one after another; different experts' groups are independent, so
    # the k-th group of every expert fills at once (turns: at most the distinct eligible sets)
    level = np.zeros((num_experts, reps.shape[1]), dtype=np.int64)
    add = np.empty((len(starts), reps.shape[1]), dtype=np.int64)
    for k in range(int(turn.max()) + 1):
        g = np.flatnonzero(turn == k)
        ex = group_expert[g]
        add[g] = _water_fill(level[ex], el[starts[g]], ends[g] - starts[g])
        level[ex] += add[g]
    # inside a group, pairs (hashed order) take the columns in ascending order, add[c] pairs each
    group = np.repeat(np.arange(len(starts)), ends - starts)
    at = np.arange(len(order)) - starts[group]
    choice = (np.cumsum(add, 1)[group] <= at[:, None]).sum(1)
    phys[many[order]] = reps[order, choice]
    return torch.from_numpy(phys.reshape(num_tokens, top_k))


def _water_fill(level: np.ndarray, eligible: np.ndarray, units: np.ndarray) -> np.ndarray:
    """Per row: integer amounts to add to the eligible entries of ``level`` (summing to ``units``) that
    minimise the largest result; ties go to the earlier entries. level, eligible [rows, entries];
    units [rows]. Returns [rows, entries] (0 where not eligible)."""
    rows, width = level.shape
    big = np.iinfo(np.int64).max // 4
    order = np.argsort(np.where(eligible, level, big), axis=1, kind="stable")
    s = np.take_along_axis(level, order, 1)
    m = eligible.sum(1)
    j = np.arange(width)
    below = np.cumsum(s, 1) - s  # sum of the j lowest
    # the water reaches the lowest k entries: the first j >= 1 whose level the units fill up to, else all m
    reached = (j[None, :] >= 1) & (j[None, :] < m[:, None]) & (j[None, :] * s - below >= units[:, None])
    k = np.where(reached.any(1), reached.argmax(1), m)
    inside = j[None, :] < k[:, None]
    total = units + np.where(inside, s, 0).sum(1)
    base, extra = np.divmod(total, k)
    add_sorted = np.where(inside, base[:, None] - s + (j[None, :] < extra[:, None]), 0)
    out = np.empty_like(add_sorted)
    np.put_along_axis(out, order, add_sorted, 1)
    return out
