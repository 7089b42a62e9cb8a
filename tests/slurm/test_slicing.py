"""Node slicing: head first, whole nodes for big groups, packed GPU ranges for small ones."""

from __future__ import annotations

import itertools

import pytest

from slurm.slicing import GroupNeed, SlicingError, nodes_needed, slice_nodes


def hosts(count: int) -> list[str]:
    return [f"n{i}" for i in range(1, count + 1)]


# (id, hostnames, groups, gpus_per_node, head_hosts_workers, ranks_per_node,
#  expected {group: (nodes, ranks_per_node, gpus)}, expected unused)
CASES = [
    (
        "one-group-one-node",
        hosts(2),
        [("agg", 4)],
        4,
        False,
        None,
        {"agg": (("n2",), 4, (0, 1, 2, 3))},
        (),
    ),
    (
        "small-groups-share-a-node",
        hosts(2),
        [("a", 2), ("b", 4)],
        8,
        False,
        None,
        {"a": (("n2",), 2, (0, 1)), "b": (("n2",), 4, (2, 3, 4, 5))},
        (),
    ),
    (
        "group-spans-two-nodes",
        hosts(3),
        [("decode", 16)],
        8,
        False,
        None,
        {"decode": (("n2", "n3"), 8, tuple(range(8)))},
        (),
    ),
    (
        "mixed-first-fit-keeps-node-order",
        hosts(5),
        [("p0", 2), ("decode", 16), ("p1", 2), ("agg", 4)],
        8,
        False,
        None,
        {
            "p0": (("n2",), 2, (0, 1)),
            "decode": (("n3", "n4"), 8, tuple(range(8))),
            "p1": (("n2",), 2, (2, 3)),
            "agg": (("n2",), 4, (4, 5, 6, 7)),
        },
        ("n5",),
    ),
    (
        "small-group-too-big-for-the-gap-opens-a-node",
        hosts(3),
        [("a", 3), ("b", 2)],
        4,
        False,
        None,
        {"a": (("n2",), 3, (0, 1, 2)), "b": (("n3",), 2, (0, 1))},
        (),
    ),
    (
        "head-hosts-workers",
        hosts(1),
        [("a", 1), ("b", 1)],
        4,
        True,
        None,
        {"a": (("n1",), 1, (0,)), "b": (("n1",), 1, (1,))},
        (),
    ),
    (
        "head-hosts-workers-then-more-nodes",
        hosts(3),
        [("a", 4), ("b", 4)],
        4,
        True,
        None,
        {"a": (("n1",), 4, (0, 1, 2, 3)), "b": (("n2",), 4, (0, 1, 2, 3))},
        ("n3",),
    ),
    (
        "uneven-but-evenly-spreadable",
        hosts(3),
        [("tp6", 6)],
        4,
        False,
        None,
        {"tp6": (("n2", "n3"), 3, (0, 1, 2))},
        (),
    ),
    (
        "cpu-one-rank-per-node",
        hosts(4),
        [("tp3", 3)],
        0,
        False,
        None,
        {"tp3": (("n2", "n3", "n4"), 1, ())},
        (),
    ),
    (
        "cpu-ranks-per-node-packs",
        hosts(4),
        [("a", 1), ("b", 1), ("c", 4)],
        0,
        False,
        2,
        {"a": (("n2",), 1, ()), "b": (("n2",), 1, ()), "c": (("n3", "n4"), 2, ())},
        (),
    ),
    (
        "unused-nodes-listed",
        hosts(4),
        [("agg", 1)],
        0,
        False,
        None,
        {"agg": (("n2",), 1, ())},
        ("n3", "n4"),
    ),
]


@pytest.mark.parametrize(
    ("hostnames", "groups", "gpus", "head_workers", "rpn", "expected", "unused"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_slice_nodes(hostnames, groups, gpus, head_workers, rpn, expected, unused) -> None:
    needs = [GroupNeed(*group) for group in groups]
    slicing = slice_nodes(hostnames, needs, gpus, head_workers, ranks_per_node=rpn)
    assert slicing.head == hostnames[0]
    assert [group.name for group in slicing.groups] == [need.name for need in needs]
    got = {g.name: (g.nodes, g.ranks_per_node, g.gpus) for g in slicing.groups}
    assert got == expected
    assert slicing.unused == unused
    for need in needs:
        assert slicing.group(need.name).ranks == need.ranks


def test_slots_and_cuda_visible_devices() -> None:
    slicing = slice_nodes(hosts(2), [GroupNeed("a", 2), GroupNeed("b", 2)], 4, False)
    assert slicing.group("b").cuda_visible_devices == "2,3"
    assert slicing.group("b").slots == (2, 3)
    cpu = slice_nodes(hosts(2), [GroupNeed("a", 2), GroupNeed("b", 1)], 0, False, 3)
    assert cpu.group("b").cuda_visible_devices is None
    assert cpu.group("b").slots == (2,)
    with pytest.raises(KeyError):
        slicing.group("nope")


# (id, groups, gpus_per_node, head_hosts_workers, ranks_per_node, expected --nodes)
NODES_NEEDED = [
    ("no-groups", [], 8, False, None, 1),
    ("no-groups-head-workers", [], 8, True, None, 1),
    ("one-small", [("a", 1)], 8, False, None, 2),
    ("one-small-on-head", [("a", 1)], 8, True, None, 1),
    ("packed", [("a", 2), ("b", 2), ("c", 4)], 8, False, None, 2),
    ("spanning", [("d", 16), ("p", 4)], 8, False, None, 4),
    ("cpu", [("a", 3), ("b", 1)], 0, False, None, 5),
    ("cpu-rpn", [("a", 3), ("b", 1)], 0, False, 4, 2),
    ("cpu-rpn-head", [("a", 3), ("b", 1)], 0, True, 4, 1),
]


@pytest.mark.parametrize(
    ("groups", "gpus", "head_workers", "rpn", "expected"),
    [case[1:] for case in NODES_NEEDED],
    ids=[case[0] for case in NODES_NEEDED],
)
def test_nodes_needed(groups, gpus, head_workers, rpn, expected) -> None:
    needs = [GroupNeed(*group) for group in groups]
    assert nodes_needed(needs, gpus, head_workers, rpn) == expected


@pytest.mark.parametrize("head_workers", [False, True])
@pytest.mark.parametrize("gpus", [0, 1, 4, 8])
def test_nodes_needed_is_exactly_enough(gpus: int, head_workers: bool) -> None:
    """For many group mixes, nodes_needed nodes slice and one fewer does not."""
    sizes = [1, 2, 4, 8, 16]
    for combo in itertools.combinations_with_replacement(sizes, 3):
        needs = [GroupNeed(f"g{i}", ranks) for i, ranks in enumerate(combo)]
        try:
            count = nodes_needed(needs, gpus, head_workers)
        except SlicingError:
            continue  # not evenly spreadable: checked elsewhere
        slice_nodes(hosts(count), needs, gpus, head_workers)
        if count > 1:
            with pytest.raises(SlicingError):
                slice_nodes(hosts(count - 1), needs, gpus, head_workers)


# (id, hostnames, groups, gpus_per_node, head_hosts_workers, ranks_per_node, words in message)
ERRORS = [
    (
        "too-few-nodes",
        hosts(2),
        [("agg", 4), ("big", 8)],
        4,
        False,
        None,
        ["'big'", "8 ranks", "slurm.nodes", "slurm.gpus_per_node", "raise slurm.nodes to 4"],
    ),
    (
        "head-only",
        hosts(1),
        [("agg", 1)],
        0,
        False,
        None,
        ["'agg'", "slurm.nodes", "slurm.head_hosts_workers", "raise slurm.nodes to 2"],
    ),
    ("no-nodes", [], [("agg", 1)], 4, False, None, ["slurm.nodes"]),
    ("duplicate-hosts", ["n1", "n1"], [("agg", 1)], 4, False, None, ["duplicate"]),
    ("duplicate-group", hosts(3), [("a", 1), ("a", 1)], 4, False, None, ["'a'", "twice"]),
    ("zero-ranks", hosts(3), [("a", 0)], 4, False, None, ["'a'", "at least 1 rank"]),
    ("uneven", hosts(3), [("tp5", 5)], 4, False, None, ["'tp5'", "evenly", "slurm.gpus_per_node"]),
    ("negative-gpus", hosts(3), [("a", 1)], -1, False, None, ["slurm.gpus_per_node"]),
    ("rpn-with-gpus", hosts(3), [("a", 1)], 4, False, 2, ["slurm.ranks_per_node"]),
    ("rpn-zero", hosts(3), [("a", 1)], 0, False, 0, ["slurm.ranks_per_node"]),
]


@pytest.mark.parametrize(
    ("hostnames", "groups", "gpus", "head_workers", "rpn", "words"),
    [case[1:] for case in ERRORS],
    ids=[case[0] for case in ERRORS],
)
def test_slice_errors(hostnames, groups, gpus, head_workers, rpn, words) -> None:
    needs = [GroupNeed(*group) for group in groups]
    with pytest.raises(SlicingError) as caught:
        slice_nodes(hostnames, needs, gpus, head_workers, ranks_per_node=rpn)
    for word in words:
        assert word in str(caught.value)
