"""Cluster description: nodes (name, device count, device kind), the two link classes, device speeds.

Built from a TOML file (:func:`load_cluster` / :func:`dump_cluster` round-trip), from an MPI
hostfile (:func:`cluster_from_hostfile`: Open MPI ``host slots=N`` and Hydra ``host:N`` lines) or
emulated (:func:`emulated_cluster`, ``--nodes N --devices-per-node G``). Node device counts may
differ. Every bad field raises ValueError naming the field and the fix.

TOML format (all sections but ``[[nodes]]`` optional; defaults below)::

    [intra]                      # link inside a node, per device
    name = "nvlink"
    bandwidth_gbs = 160.0
    latency_us = 3.0
    [inter]                      # link between nodes, per device (one NIC per device: a rail)
    name = "ib"
    bandwidth_gbs = 50.0
    latency_us = 5.0
    [device_speed]               # relative compute speed, overrides or extends DEVICE_SPEEDS
    ascend910c = 0.6
    [[nodes]]
    name = "node0"
    devices = 8
    kind = "h800"
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from topology.kinds import KINDS

__all__ = ["DEVICE_SPEEDS", "LinkClass", "Node", "Cluster", "load_cluster", "dump_cluster", "parse_cluster",
           "cluster_from_hostfile", "emulated_cluster"]

DEVICE_SPEEDS: dict[str, tuple[float, str]] = {k: (spec.speed, spec.speed_source) for k, spec in KINDS.items()}
"""Relative device speed (H100 = 1.0) per device kind *at the precision the kind trains in* (FP8
GEMMs on Hopper, BF16 on Ascend: ``topology.kinds.KIND_PRECISION``), with where each figure comes
from: ``KindSpec.speed`` of :data:`topology.kinds.KINDS`, the one list of known kinds. A cluster
file's ``[device_speed]`` table overrides an entry or adds a kind."""

_NODE_KEYS = ("name", "devices", "kind")
_LINK_KEYS = ("name", "bandwidth_gbs", "latency_us")
_TOP_KEYS = ("intra", "inter", "device_speed", "nodes")


def _positive_number(where: str, value: object, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where}={value!r}: must be a positive number; {fix}")


@dataclass(kw_only=True, slots=True, frozen=True)
class LinkClass:
    """A class of links with one bandwidth and one per-message latency."""

    name: str
    """Label printed in reports (``nvlink``, ``ib``, ``hccs``, ``roce`` ...)."""
    bandwidth_gbs: float
    """Bandwidth per device in GB/s (10^9 bytes per second), each direction."""
    latency_us: float
    """Fixed cost per message in microseconds (set-up, first byte)."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"link name={self.name!r}: must be a non-empty string such as 'nvlink' or 'ib'")
        _positive_number(f"{self.name}.bandwidth_gbs", self.bandwidth_gbs, "give the link's GB/s per device")
        if isinstance(self.latency_us, bool) or not isinstance(self.latency_us, (int, float)) \
                or not math.isfinite(self.latency_us) or self.latency_us < 0:
            raise ValueError(f"{self.name}.latency_us={self.latency_us!r}: must be a number >= 0 (microseconds)")


NVLINK = LinkClass(name="nvlink", bandwidth_gbs=160.0, latency_us=3.0)
"""Intra-node default: 160 GB/s achieved per H800 in V3 (REFERENCE.md); latency an assumption."""
IB = LinkClass(name="ib", bandwidth_gbs=50.0, latency_us=5.0)
"""Inter-node default: 50 GB/s per device in V3 (one 400 Gb/s NIC per GPU); latency an assumption."""


@dataclass(kw_only=True, slots=True, frozen=True)
class Node:
    """One host."""

    name: str
    """Unique host name (as in a hostfile)."""
    num_devices: int
    """Accelerators (or CPU ranks) on this node; nodes may differ."""
    kind: str
    """Device kind, a key of the cluster's speed table (h800, h100, h200, ascend910b, ascend910c, cpu)."""


@dataclass(kw_only=True, slots=True, frozen=True)
class Cluster:
    """Nodes in order (devices are numbered node-major), link classes and the device-speed table."""

    nodes: tuple[Node, ...]
    """The hosts; device ``d`` is on the node whose range of device numbers contains it."""
    intra: LinkClass = NVLINK
    """Link between devices of one node."""
    inter: LinkClass = IB
    """Link between nodes, per device."""
    device_speed: dict[str, float] = field(default_factory=lambda: {k: v for k, (v, _) in DEVICE_SPEEDS.items()})
    """Relative compute speed per device kind (H100 = 1.0); see :data:`DEVICE_SPEEDS` for sources."""

    def __post_init__(self) -> None:
        if not self.nodes:
            raise ValueError("nodes: empty; describe at least one node ([[nodes]] in the cluster file)")
        for kind, speed in self.device_speed.items():
            _positive_number(f"device_speed.{kind}", speed, "give the speed relative to H100 = 1.0")
        seen: dict[str, int] = {}
        for i, n in enumerate(self.nodes):
            if not isinstance(n.name, str) or not n.name:
                raise ValueError(f"nodes[{i}].name={n.name!r}: must be a non-empty string (the host name)")
            if n.name in seen:
                raise ValueError(f"nodes[{i}].name={n.name!r}: duplicate of nodes[{seen[n.name]}]; give each node "
                                 f"a unique name (list a host once, with all its devices)")
            seen[n.name] = i
            if isinstance(n.num_devices, bool) or not isinstance(n.num_devices, int) or n.num_devices < 1:
                raise ValueError(f"nodes[{i}].devices={n.num_devices!r}: must be a positive integer "
                                 f"(drop nodes without devices)")
            if n.kind not in self.device_speed:
                raise ValueError(f"nodes[{i}].kind={n.kind!r}: unknown device kind; use one of "
                                 f"{', '.join(self.device_speed)} or add it to [device_speed]")

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    @property
    def num_devices(self) -> int:
        return sum(n.num_devices for n in self.nodes)

    def device_node(self) -> list[int]:
        """Node index of every device, node-major: ``[num_devices]``."""
        return [i for i, n in enumerate(self.nodes) for _ in range(n.num_devices)]

    def speed(self, node: int) -> float:
        """Relative compute speed of the devices of node ``node``."""
        return self.device_speed[self.nodes[node].kind]


def _link_from(table: object, where: str, default: LinkClass) -> LinkClass:
    if not isinstance(table, dict):
        raise ValueError(f"{where}: must be a table ([{where}] with name, bandwidth_gbs, latency_us)")
    unknown = set(table) - set(_LINK_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; expected {', '.join(_LINK_KEYS)}")
    try:
        return LinkClass(name=table.get("name", default.name),
                         bandwidth_gbs=table.get("bandwidth_gbs", default.bandwidth_gbs),
                         latency_us=table.get("latency_us", default.latency_us))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def parse_cluster(data: dict) -> Cluster:
    """A :class:`Cluster` from the parsed TOML tables (see the module docstring for the format)."""
    unknown = set(data) - set(_TOP_KEYS)
    if unknown:
        raise ValueError(f"cluster: unknown section(s) {sorted(unknown)}; expected {', '.join(_TOP_KEYS)}")
    speeds = {k: v for k, (v, _) in DEVICE_SPEEDS.items()}
    extra = data.get("device_speed", {})
    if not isinstance(extra, dict):
        raise ValueError("device_speed: must be a table of kind = relative speed (H100 = 1.0)")
    speeds.update(extra)
    nodes_raw = data.get("nodes")
    if not isinstance(nodes_raw, list) or not nodes_raw:
        raise ValueError("nodes: missing or empty; add [[nodes]] entries with name, devices, kind")
    nodes = []
    for i, t in enumerate(nodes_raw):
        if not isinstance(t, dict):
            raise ValueError(f"nodes[{i}]: must be a table ([[nodes]] with name, devices, kind)")
        bad = set(t) - set(_NODE_KEYS)
        if bad:
            raise ValueError(f"nodes[{i}]: unknown key(s) {sorted(bad)}; expected {', '.join(_NODE_KEYS)}")
        for key in _NODE_KEYS:
            if key not in t:
                raise ValueError(f"nodes[{i}].{key}: missing; every node needs {', '.join(_NODE_KEYS)}")
        nodes.append(Node(name=t["name"], num_devices=t["devices"], kind=t["kind"]))
    return Cluster(nodes=tuple(nodes), intra=_link_from(data.get("intra", {}), "intra", NVLINK),
                   inter=_link_from(data.get("inter", {}), "inter", IB), device_speed=speeds)


def load_cluster(path: str | Path) -> Cluster:
    """Read a cluster TOML file; a malformed file is a ValueError naming the file."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ValueError(f"cluster file {str(path)!r}: cannot read ({e.strerror}); check the path") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"cluster file {str(path)!r}: not valid TOML ({e})") from None
    try:
        return parse_cluster(data)
    except ValueError as e:
        raise ValueError(f"cluster file {str(path)!r}: {e}") from None


def _toml_value(v: object) -> str:
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, float):
        return repr(v)  # shortest repr: reads back to the same float
    return str(v)


def dump_cluster(cluster: Cluster) -> str:
    """The TOML text that :func:`parse_cluster` reads back to an equal cluster."""
    lines = []
    for section, link in (("intra", cluster.intra), ("inter", cluster.inter)):
        lines += [f"[{section}]", f"name = {_toml_value(link.name)}",
                  f"bandwidth_gbs = {_toml_value(float(link.bandwidth_gbs))}",
                  f"latency_us = {_toml_value(float(link.latency_us))}", ""]
    lines.append("[device_speed]")
    lines += [f"{_toml_value(k)} = {_toml_value(float(v))}" for k, v in cluster.device_speed.items()]
    for n in cluster.nodes:
        lines += ["", "[[nodes]]", f"name = {_toml_value(n.name)}", f"devices = {n.num_devices}",
                  f"kind = {_toml_value(n.kind)}"]
    return "\n".join(lines) + "\n"


def cluster_from_hostfile(text: str, *, kind: str = "h800") -> Cluster:
    """Nodes from an MPI hostfile: Open MPI ``host slots=N`` or Hydra ``host:N`` lines (a bare ``host``
    is one slot; ``#`` starts a comment). All devices get ``kind``; links are the defaults."""
    nodes = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"hostfile line {lineno}"
        parts = line.split()
        host, slots = parts[0], "1"
        if ":" in host:  # Hydra: host:N
            host, _, slots = host.partition(":")
            if len(parts) > 1:
                raise ValueError(f"{where}: {line!r}: write either 'host:N' (Hydra) or 'host slots=N' (Open MPI)")
        for opt in parts[1:]:  # Open MPI: slots=N [max_slots=M]; max_slots only caps oversubscription
            key, eq, value = opt.partition("=")
            if not eq or key not in ("slots", "max_slots"):
                raise ValueError(f"{where}: {opt!r}: expected slots=N (Open MPI) or host:N (Hydra)")
            if key == "slots":
                slots = value
        if not slots.isdigit() or int(slots) < 1:
            raise ValueError(f"{where}: slots {slots!r} for {host!r}: must be a positive integer")
        nodes.append(Node(name=host, num_devices=int(slots), kind=kind))
    if not nodes:
        raise ValueError("hostfile: no hosts; one line per node, 'host slots=N' or 'host:N'")
    return Cluster(nodes=tuple(nodes))


def emulated_cluster(num_nodes: int, devices_per_node: int, *, kind: str = "h800") -> Cluster:
    """``num_nodes`` identical nodes ``node0 ..`` (``--nodes N --devices-per-node G``)."""
    for name, v in (("nodes", num_nodes), ("devices_per_node", devices_per_node)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r}: must be a positive integer")
    return Cluster(nodes=tuple(Node(name=f"node{i}", num_devices=devices_per_node, kind=kind)
                               for i in range(num_nodes)))
