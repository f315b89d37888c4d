"""Task labels, maxspeed parsing, label-bearing tags, zero-label subsampling."""

from __future__ import annotations

import numpy as np
import pytest

from geojepa_pipeline.evaluate.labels import TASKS, ZERO_KEEP, is_label_tag, parse_maxspeed, subsample_zero_labels, tile_labels


@pytest.mark.parametrize("value,kmh", [
    ("50", 50), ("50 km/h", 50), ("30 mph", 48.28), ("10 knots", 18.52), ("50;30", 50), ("30|50", 50),
    ("walk", 7), ("DE:urban", 50), ("RU:urban", 50), ("DE:rural", 100), ("DE:zone30", 30), ("DE:motorway", 130),
    ("none", None), ("signals", None), ("variable", None), ("XX:unknown", None), ("", None), ("fast", None),
])
def test_parse_maxspeed(value, kmh):
    got = parse_maxspeed(value)
    assert (got is None and kmh is None) or got == pytest.approx(kmh, abs=0.01)


PIECES = [  # (tile, tags, geometry type)
    ("a", [("building", "yes")], "Polygon"),
    ("a", [("building:part", "yes"), ("height", "9")], "Polygon"),
    ("a", [("highway", "traffic_signals")], "Point"),
    ("a", [("highway", "primary"), ("maxspeed", "50"), ("bridge", "yes"), ("layer", "1")], "LineString"),
    ("b", [("highway", "residential")], "LineString"),
    ("b", [("crossing:signals", "yes")], "Point"),
    ("b", [("highway", "traffic_signals")], "LineString"),  # not a point: not counted
    ("c", [("highway", "footway"), ("bridge", "yes"), ("maxspeed", "30 mph")], "LineString"),
    ("d", [("amenity", "bench")], "Point"),
]


def test_tile_labels_follow_the_reference_rules():
    labels = tile_labels(["a", "b", "c", "d"], [p[0] for p in PIECES], [p[1] for p in PIECES], [p[2] for p in PIECES])
    assert labels["building_count"][0].tolist() == [2, 0, 0, 0]
    assert labels["traffic_signals"][0].tolist() == [1, 1, 0, 0]
    speed, defined = labels["max_speed"]
    assert speed[0] == 50 and speed[2] == pytest.approx(48.28, abs=0.01)
    assert defined.tolist() == [True, False, True, False]  # b: highway without maxspeed (pruned); d: no highway
    assert labels["bridge"][0].tolist() == [1, 0, 1, 0]
    assert labels["car_bridge"][0].tolist() == [1, 0, 0, 0]  # a footway bridge is not a car bridge


def test_no_label_bearing_tag_survives_removal():
    for task in TASKS:
        kept = [[(k, v) for k, v in tags if not is_label_tag(task, k, v)] for _, tags, _ in PIECES]
        labels = tile_labels(["a", "b", "c", "d"], [p[0] for p in PIECES], kept, [p[2] for p in PIECES])
        if task == "max_speed":
            assert not labels[task][1].any()  # no maxspeed left anywhere
        else:
            assert not labels[task][0].any(), task  # nothing left that makes the label
    assert is_label_tag("bridge", "layer", "1") and not is_label_tag("building_count", "height", "9")


def test_zero_labels_are_subsampled_reproducibly():
    labels = np.r_[np.zeros(10_000), np.ones(100)]
    defined = np.ones(len(labels), bool)
    keep = subsample_zero_labels("traffic_signals", labels, defined, seed=3)
    assert keep[-100:].all() and abs(keep[:10_000].mean() - ZERO_KEEP["traffic_signals"]) < 0.01
    assert np.array_equal(keep, subsample_zero_labels("traffic_signals", labels, defined, seed=3))
    assert subsample_zero_labels("max_speed", labels, defined, seed=3).all()  # max_speed zeros are pruned, not sampled
