"""Task labels and the masked protocol (the reference's task generator): what is removed, by entity, in every tile."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from geojepa_pipeline.evaluate.labels import (
    TASKS,
    ZERO_KEEP,
    Pieces,
    implausible_maxspeeds,
    parse_maxspeed,
    stripped_pairs,
    subsample_zero_labels,
    task_input,
    tile_labels,
)


@pytest.mark.parametrize("value,kmh", [
    ("50", 50), ("50 km/h", 50), ("30 mph", 48.28), ("10 knots", 18.52), ("50;30", 50), ("30|50", 50),
    ("walk", 7), ("DE:urban", 50), ("RU:urban", 50), ("DE:rural", 100), ("DE:zone30", 30), ("DE:motorway", 130),
    ("none", None), ("signals", None), ("variable", None), ("XX:unknown", None), ("", None), ("fast", None),
    ("9" * 32, None), ("301", None), ("300", 300), ("200 mph", None), ("50;9999", 50),  # above 300 km/h: not a speed
])
def test_parse_maxspeed(value, kmh):
    got = parse_maxspeed(value)
    assert (got is None and kmh is None) or got == pytest.approx(kmh, abs=0.01)


PIECES = [  # (tile, osm type, osm id, tags)
    (0, "way", 1, [("building", "yes")]),
    (0, "way", 2, [("building:part", "yes"), ("height", "9")]),
    (0, "node", 3, [("highway", "traffic_signals")]),
    (0, "way", 4, [("highway", "primary_link"), ("maxspeed", "50"), ("bridge", "yes"), ("layer", "1")]),
    (1, "way", 5, [("highway", "residential")]),
    (1, "node", 6, [("crossing:signals", "yes"), ("highway", "crossing")]),
    (1, "way", 7, [("highway", "traffic_signals")]),  # not a node: not counted, loses the tag, left empty: removed
    (2, "way", 8, [("highway", "footway"), ("bridge", "yes"), ("maxspeed:forward", "30 mph")]),
    (3, "node", 9, [("amenity", "bench")]),
    (3, "way", 1, [("building", "yes")]),  # way 1 again: its piece in another tile
    (3, "relation", 10, [("type", "multipolygon"), ("building", "yes")]),
    (3, "way", 11, []),  # the relation's untagged outer way
    (3, "way", 12, [("landuse", "grass")]),  # a tagged member: its own entity
    (2, "way", 13, [("zone:maxspeed", "DE:30"), ("landuse", "residential")]),  # a maxspeed key off the roads
]
MEMBERS = pa.table({"relation_id": [10, 10], "member_type": ["way", "way"], "member_id": [11, 12], "role": ["outer", "outer"]})


def pieces():
    return Pieces.build([p[0] for p in PIECES], [p[1] for p in PIECES], [p[2] for p in PIECES], [p[3] for p in PIECES], 4)


def test_tile_labels_follow_the_reference_rules():
    labels = tile_labels(pieces())
    assert labels["building_count"][0].tolist() == [2, 0, 0, 2]
    assert labels["traffic_signals"][0].tolist() == [1, 1, 0, 0]
    speed, defined = labels["max_speed"]
    assert speed[0] == 50 and speed[2] == pytest.approx(48.28, abs=0.01)  # maxspeed:forward counts ("contains")
    assert defined.tolist() == [True, False, True, False]  # 1: highways without maxspeed (pruned); 3: no highway
    assert labels["bridge"][0].tolist() == [1, 0, 1, 0]
    assert labels["car_bridge"][0].tolist() == [1, 0, 0, 0]  # primary_link is a car road; a footway bridge is not


def test_each_task_removes_whole_entities_and_leaves_nothing_that_makes_its_label():
    p = pieces()
    expect_removed = {
        "building_count": {(1, "way"), (2, "way"), (10, "relation"), (11, "way")},  # way 1 in both tiles; 11 with 10
        "traffic_signals": {(3, "node"), (6, "node"), (7, "way")},
        "max_speed": set(),
        "bridge": set(),  # ways 4 and 8 keep other tags
        "car_bridge": set(),
    }
    for task in TASKS:
        inp = task_input(task, p, MEMBERS)
        gone = {(PIECES[i][2], PIECES[i][1]) for i in np.flatnonzero(~inp.kept)}
        assert gone == expect_removed[task], task
        for i in np.flatnonzero(inp.kept):  # no stripped tag survives on a kept piece
            kept_tags = inp.tags[int(i)].as_py()
            assert not stripped_pairs(task, pa.array([k for k, _ in kept_tags], pa.string()),
                                      pa.array([v for _, v in kept_tags], pa.string())).any(), (task, kept_tags)
        rest = Pieces.build(p.tile[inp.kept], p.osm_type[inp.kept], p.osm_id[inp.kept], inp.tags.filter(pa.array(inp.kept)), 4)
        label, defined = tile_labels(rest)[task]
        if task == "max_speed":
            assert not (label > 0).any()  # roads stay, their speeds do not
        else:
            assert not label.any(), task
    b = task_input("building_count", p, MEMBERS)
    assert (b.removed_entities, b.removed_members, b.removed_pieces) == (3, 1, 5)
    assert task_input("building_count", p, None).removed_pieces == 4  # without the members table the outer way stays
    assert task_input("bridge", p, MEMBERS).stripped_tags == 3  # bridge and layer of way 4, bridge of way 8
    assert task_input("max_speed", p, MEMBERS).stripped_tags == 3  # maxspeed, maxspeed:forward, zone:maxspeed


def test_zero_labels_are_subsampled_reproducibly():
    labels = np.r_[np.zeros(10_000), np.ones(100)]
    defined = np.ones(len(labels), bool)
    keep = subsample_zero_labels("traffic_signals", labels, defined, seed=3)
    assert keep[-100:].all() and abs(keep[:10_000].mean() - ZERO_KEEP["traffic_signals"]) < 0.01
    assert np.array_equal(keep, subsample_zero_labels("traffic_signals", labels, defined, seed=3))
    assert subsample_zero_labels("max_speed", labels, defined, seed=3).all()  # max_speed zeros are pruned, not sampled


def test_a_relation_piece_that_holds_a_removed_member_goes_in_that_tile_only():
    """A route's piece is the union of its members' pieces in the tile: where a removed signal node is one of them,
    the route's piece would carry it; the route's pieces elsewhere stay."""
    p = Pieces.build([0, 0, 1, 0, 1], ["node", "relation", "relation", "way", "way"], [3, 20, 20, 21, 21],
                     [[("highway", "traffic_signals")], [("type", "route")], [("type", "route")], [("highway", "primary")],
                      [("highway", "primary")]], 2)
    members = pa.table({"relation_id": [20, 20], "member_type": ["node", "way"], "member_id": [3, 21], "role": ["stop", ""]})
    inp = task_input("traffic_signals", p, members)
    assert inp.kept.tolist() == [False, False, True, True, True] and inp.removed_parent_pieces == 1
    assert task_input("max_speed", p, members).kept.all()


def test_implausible_maxspeeds_are_counted_and_give_no_label():
    rows = [(0, "way", 1, [("highway", "primary"), ("maxspeed", "9" * 32)]), (0, "way", 2, [("highway", "primary"), ("maxspeed", "50;999")]),
            (1, "way", 3, [("highway", "primary"), ("maxspeed:forward", "80")])]
    pieces = Pieces.build([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows], 2)
    assert implausible_maxspeeds(pieces) == 2
    speed, has = tile_labels(pieces)["max_speed"]
    assert speed.tolist() == [50.0, 80.0] and has.tolist() == [True, True]
