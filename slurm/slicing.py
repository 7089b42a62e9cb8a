"""Which nodes of a Slurm allocation run which worker group: the head node first.

Pure functions of the node list and the groups' sizes, so the sbatch renderer and the tests
agree on one placement. A group that fills a node or more gets whole nodes (its ranks
spread evenly); smaller groups are packed first-fit onto shared nodes, each on a contiguous
range of GPU (or, CPU-only, rank-slot) indices: the `CUDA_VISIBLE_DEVICES` of its step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


class SlicingError(ValueError):
    """The allocation (or the groups asked for) cannot be sliced; the message says why."""


class GroupNeed(NamedTuple):
    """One worker group: its name and its MPI rank count (tp * pp)."""

    name: str
    ranks: int


@dataclass(frozen=True)
class GroupSlice:
    """Where one worker group runs: one srun step over `nodes`, `ranks_per_node` each."""

    name: str
    nodes: tuple[str, ...]
    ranks_per_node: int
    gpus: tuple[int, ...]  # the same indices on every node; () when CPU-only
    slots: tuple[int, ...]  # slot indices on every node: GPUs, or CPU rank slots

    @property
    def ranks(self) -> int:
        return len(self.nodes) * self.ranks_per_node

    @property
    def cuda_visible_devices(self) -> str | None:
        return ",".join(str(gpu) for gpu in self.gpus) if self.gpus else None


@dataclass(frozen=True)
class Slicing:
    head: str
    groups: tuple[GroupSlice, ...]
    unused: tuple[str, ...]  # allocated nodes that run no worker (and are not the head)

    def group(self, name: str) -> GroupSlice:
        for group in self.groups:
            if group.name == name:
                return group
        raise KeyError(name)


class _Placed(NamedTuple):
    first_node: int  # index into the worker node pool
    node_count: int
    ranks_per_node: int
    first_slot: int


def _slots_per_node(gpus_per_node: int, ranks_per_node: int | None) -> int:
    if gpus_per_node < 0:
        raise SlicingError(f"slurm.gpus_per_node must be >= 0, not {gpus_per_node}")
    if gpus_per_node > 0:
        if ranks_per_node is not None:
            raise SlicingError(
                "slurm.ranks_per_node is only for CPU-only workers (slurm.gpus_per_node 0)"
            )
        return gpus_per_node
    if ranks_per_node is None:
        return 1
    if ranks_per_node < 1:
        raise SlicingError(f"slurm.ranks_per_node must be >= 1, not {ranks_per_node}")
    return ranks_per_node


def _pack(groups: list[GroupNeed], slots: int) -> tuple[list[_Placed], int]:
    """Place groups on an unbounded pool of worker nodes; return placements and nodes used."""
    seen: set[str] = set()
    placed: list[_Placed] = []
    used_slots: list[int] = []  # per opened node; whole-node groups fill theirs
    for group in groups:
        if group.name in seen:
            raise SlicingError(f"worker group {group.name!r} appears twice")
        seen.add(group.name)
        if group.ranks < 1:
            raise SlicingError(f"worker group {group.name!r} needs at least 1 rank")
        if group.ranks >= slots:
            count = -(-group.ranks // slots)
            if group.ranks % count:
                raise SlicingError(
                    f"worker group {group.name!r}: {group.ranks} ranks cannot be spread "
                    f"evenly over {count} nodes of {slots} slots (slurm.gpus_per_node or "
                    "slurm.ranks_per_node)"
                )
            placed.append(_Placed(len(used_slots), count, group.ranks // count, 0))
            used_slots.extend([slots] * count)
            continue
        index = next((i for i, used in enumerate(used_slots) if slots - used >= group.ranks), None)
        if index is None:
            index = len(used_slots)
            used_slots.append(0)
        placed.append(_Placed(index, 1, group.ranks, used_slots[index]))
        used_slots[index] += group.ranks
    return placed, len(used_slots)


def nodes_needed(
    groups: list[GroupNeed],
    gpus_per_node: int,
    head_hosts_workers: bool,
    ranks_per_node: int | None = None,
) -> int:
    """The `--nodes` count: the head node plus the worker nodes `slice_nodes` will use."""
    _, worker_nodes = _pack(groups, _slots_per_node(gpus_per_node, ranks_per_node))
    if head_hosts_workers:
        return max(1, worker_nodes)
    return 1 + worker_nodes


def slice_nodes(
    hostnames: list[str],
    groups: list[GroupNeed],
    gpus_per_node: int,
    head_hosts_workers: bool,
    ranks_per_node: int | None = None,
) -> Slicing:
    """Assign the allocation's nodes (in `scontrol show hostnames` order) to worker groups.

    The first host is the head (frontend, etcd, NATS); it also takes workers, first, when
    `head_hosts_workers`. Raises SlicingError naming the group that does not fit.
    """
    if not hostnames:
        raise SlicingError("the allocation has no nodes (slurm.nodes)")
    if len(set(hostnames)) != len(hostnames):
        raise SlicingError(f"duplicate hostnames in the allocation: {hostnames}")
    slots = _slots_per_node(gpus_per_node, ranks_per_node)
    placed, worker_nodes = _pack(groups, slots)
    pool = list(hostnames) if head_hosts_workers else list(hostnames[1:])
    if worker_nodes > len(pool):
        need = next(
            need
            for need, where in zip(groups, placed, strict=True)
            if where.first_node + where.node_count > len(pool)
        )
        enough = nodes_needed(groups, gpus_per_node, head_hosts_workers, ranks_per_node)
        unit = f"{gpus_per_node} GPUs" if gpus_per_node else f"{slots} CPU rank slots"
        head = (
            "the head node hosts workers too"
            if head_hosts_workers
            else "the head node takes none (slurm.head_hosts_workers is false)"
        )
        raise SlicingError(
            f"worker group {need.name!r} ({need.ranks} ranks) does not fit: the groups need "
            f"{worker_nodes} worker node(s) of {unit} each (slurm.gpus_per_node"
            f"{'' if gpus_per_node else ', slurm.ranks_per_node'}), but the allocation has "
            f"{len(hostnames)} node(s) (slurm.nodes) and {head}; "
            f"raise slurm.nodes to {enough}"
        )
    sliced = []
    for need, where in zip(groups, placed, strict=True):
        indices = tuple(range(where.first_slot, where.first_slot + where.ranks_per_node))
        sliced.append(
            GroupSlice(
                name=need.name,
                nodes=tuple(pool[where.first_node : where.first_node + where.node_count]),
                ranks_per_node=where.ranks_per_node,
                gpus=indices if gpus_per_node else (),
                slots=indices,
            )
        )
    used = {node for group in sliced for node in group.nodes} | {hostnames[0]}
    return Slicing(
        head=hostnames[0],
        groups=tuple(sliced),
        unused=tuple(host for host in hostnames if host not in used),
    )
