"""The five thesis tasks: label rules, label-bearing tags (removed from the input), zero-label subsampling.

Per tile, from its own entity pieces (shard rows):

- ``building_count``: pieces with a tag key containing "building".
- ``traffic_signals``: point pieces with "traffic_signals" in a key or a value, or the key
  ``crossing:signals``.
- ``max_speed``: the largest parsed ``maxspeed`` (km/h) over pieces with a ``highway`` tag.
  Tiles without a highway are excluded; tiles with highways but no parsable maxspeed would
  have label 0 and are pruned (excluded), as in the reference.
- ``bridge``: 1 if "bridge" appears in any key or value, else 0.
- ``car_bridge``: 1 if a piece with ``highway`` in motorway, motorway_link, primary,
  secondary, tertiary, unclassified or service carries a bridge tag, else 0.

Masked protocol: ``is_label_tag(task, key, value)`` says which tags carry the label; they are
removed from the input of that task (building: keys containing "building"; traffic: tags
with "traffic_signals" in key or value and ``crossing:signals``; max_speed: keys starting
with "maxspeed"; bridge and car_bridge: tags with "bridge" in key or value, and ``layer``).

Zero-label tiles are subsampled with a seed, keeping 10 % (building_count), 5 %
(traffic_signals), 25 % (bridge) and 10 % (car_bridge), as in the reference.
"""

from __future__ import annotations

import re

import numpy as np

TASKS = ("building_count", "traffic_signals", "max_speed", "bridge", "car_bridge")
BINARY_TASKS = ("bridge", "car_bridge")
ZERO_KEEP = {"building_count": 0.10, "traffic_signals": 0.05, "bridge": 0.25, "car_bridge": 0.10}
CAR_HIGHWAYS = {"motorway", "motorway_link", "primary", "secondary", "tertiary", "unclassified", "service"}

# implicit limits "CC:zone" (km/h) for the zones OSM documents most; others are unparsed
IMPLICIT_MAXSPEED = {
    "urban": 50, "rural": 90, "motorway": 130, "trunk": 100, "living_street": 7, "walk": 7, "school": 30,
    "zone30": 30, "zone:30": 30, "zone20": 20, "bicycle_road": 30, "pedestrian_zone": 7,
}
COUNTRY_RURAL = {"DE": 100, "AT": 100, "CH": 80, "LI": 80, "FI": 80, "GB": 96.6, "US": 88.5, "RU": 90, "FR": 80, "IT": 90}
COUNTRY_MOTORWAY = {"DE": 130, "AT": 130, "CH": 120, "FI": 120, "GB": 112.7, "RU": 110, "FR": 130, "IT": 130}
_NUMBER = re.compile(r"^\s*(\d+(?:[.,]\d+)?)\s*(km/h|kmh|kph|mph|knots)?\s*$", re.IGNORECASE)


def parse_maxspeed(value: str) -> float | None:
    """A ``maxspeed`` value in km/h, or None when it states no number.

    - ``"50"``, ``"50 km/h"`` -> 50; ``"30 mph"`` -> 48.28; ``"10 knots"`` -> 18.52;
    - several values ``"50;30"`` or ``"50|30"`` (lanes, conditions) -> the largest;
    - ``"walk"`` -> 7; ``"CC:zone"`` implicit limits -> the table above (``"DE:urban"`` -> 50,
      ``"DE:rural"`` -> 100, ``"RU:urban"`` -> 50, ``"DE:zone30"`` -> 30, ``"CC:motorway"`` ->
      the country's motorway limit where known);
    - ``"none"`` (no limit), ``"signals"`` / ``"variable"`` (set by signs), anything else -> None.
    """
    if value is None:
        return None
    parts = [p for p in re.split(r"[;|]", str(value)) if p.strip()]
    if len(parts) > 1:
        vals = [v for v in (parse_maxspeed(p) for p in parts) if v is not None]
        return max(vals) if vals else None
    v = str(value).strip()
    m = _NUMBER.match(v)
    if m:
        speed = float(m.group(1).replace(",", "."))
        unit = (m.group(2) or "").lower()
        return round(speed * (1.609344 if unit == "mph" else 1.852 if unit == "knots" else 1.0), 2)
    low = v.lower()
    if low in ("walk",):
        return 7.0
    if ":" in v:
        country, zone = v.split(":", 1)
        country, zone = country.upper(), zone.lower()
        if zone == "rural" and country in COUNTRY_RURAL:
            return float(COUNTRY_RURAL[country])
        if zone == "motorway" and country in COUNTRY_MOTORWAY:
            return float(COUNTRY_MOTORWAY[country])
        if zone in IMPLICIT_MAXSPEED:
            return float(IMPLICIT_MAXSPEED[zone])
    return None


def is_label_tag(task: str, key: str, value: str) -> bool:
    """Does (key, value) carry the label of ``task``? Such tags are removed from that task's input."""
    if task == "building_count":
        return "building" in key
    if task == "traffic_signals":
        return "traffic_signals" in key or "traffic_signals" in value or key == "crossing:signals"
    if task == "max_speed":
        return key.startswith("maxspeed")
    if task in ("bridge", "car_bridge"):
        return "bridge" in key or "bridge" in value or key == "layer"
    raise ValueError(f"unknown task {task!r}")


def tile_labels(tile_ids: list[str], piece_tile: list[str], piece_tags: list[list[tuple[str, str]]],
                piece_geom_type: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per task: (labels (T,) float, defined (T,) bool) for the tiles ``tile_ids`` from their pieces."""
    index = {t: i for i, t in enumerate(tile_ids)}
    n = len(tile_ids)
    buildings = np.zeros(n)
    signals = np.zeros(n)
    speed = np.zeros(n)
    has_highway = np.zeros(n, bool)
    bridge = np.zeros(n)
    car_bridge = np.zeros(n)
    for tid, tags, gtype in zip(piece_tile, piece_tags, piece_geom_type):
        i = index[tid]
        keys = [k for k, _ in tags]
        if any("building" in k for k in keys):
            buildings[i] += 1
        if gtype in ("Point", "MultiPoint") and any(is_label_tag("traffic_signals", k, v) for k, v in tags):
            signals[i] += 1
        d = dict(tags)
        if "highway" in d:
            has_highway[i] = True
            s = parse_maxspeed(d["maxspeed"]) if "maxspeed" in d else None
            if s is not None:
                speed[i] = max(speed[i], s)
        has_bridge = any("bridge" in k or "bridge" in v for k, v in tags)
        if has_bridge:
            bridge[i] = 1
            if d.get("highway") in CAR_HIGHWAYS:
                car_bridge[i] = 1
    everywhere = np.ones(n, bool)
    return {
        "building_count": (buildings, everywhere),
        "traffic_signals": (signals, everywhere),
        "max_speed": (speed, has_highway & (speed > 0)),  # no highway: excluded; highway without maxspeed: pruned
        "bridge": (bridge, everywhere),
        "car_bridge": (car_bridge, everywhere),
    }


def subsample_zero_labels(task: str, labels: np.ndarray, defined: np.ndarray, seed: int) -> np.ndarray:
    """(T,) bool: the tiles used for ``task``: defined, with zero-label tiles kept at the task's rate."""
    rate = ZERO_KEEP.get(task)
    keep = defined.copy()
    if rate is not None:
        rng = np.random.default_rng([seed, TASKS.index(task)])
        zero = defined & (labels == 0)
        keep[zero] = rng.random(int(zero.sum())) < rate
    return keep
