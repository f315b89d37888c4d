"""The five thesis tasks: labels, the masked protocol's removals, zero-label subsampling.

Labels and removals follow the reference's task generator (``data/task_generator/generator.cpp``
of ``theolundqvist/geojepa``), per entity piece (a shard row: one entity in one tile). "Contains"
is a substring match, as there.

Labels, per tile, from its own pieces before anything is removed:

- ``building_count``: pieces with a tag key containing "building".
- ``traffic_signals``: node pieces with "traffic_signals" in a key or a value, or a key
  containing "crossing:signals".
- ``max_speed``: per piece, the largest parsed value over its keys containing "maxspeed";
  else 0 if it has a key containing "highway"; else none. Per tile the largest. A tile with no
  value is excluded (no highway); a tile at 0 (highways, no parsable maxspeed) is pruned.
- ``bridge``: 1 if a piece has "bridge" in a key or a value, else 0.
- ``car_bridge``: 1 if such a piece also has a key containing "highway" whose value contains
  motorway, primary, secondary, tertiary, unclassified or service, else 0.

The masked protocol (``task_input``): each task's input is the tile's pieces with these removals.

- **Stripped tags**: ``building_count``: keys containing "building"; ``traffic_signals``: the
  signal tags above; ``max_speed``: keys containing "maxspeed"; ``bridge`` and ``car_bridge``:
  "bridge" in the key or the value, and keys containing "layer".
- **Removed entities** (every piece, in every tile, so in every modality): ``building_count``:
  any entity with a stripped tag; ``traffic_signals``: nodes with a stripped tag; every task: an
  entity left with no tags by the stripping. With them go the untagged members of a removed
  relation (the outer way of a building multipolygon exists in the shards only as its member),
  following member relations down; and a kept relation's piece in a tile where a removed member
  has a piece (that piece is the union of its members' pieces there, the removed one included).

Zero-label tiles are subsampled with a seed, keeping 10 % (building_count), 5 %
(traffic_signals), 25 % (bridge) and 10 % (car_bridge), as in the reference.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

TASKS = ("building_count", "traffic_signals", "max_speed", "bridge", "car_bridge")
BINARY_TASKS = ("bridge", "car_bridge")
ZERO_KEEP = {"building_count": 0.10, "traffic_signals": 0.05, "bridge": 0.25, "car_bridge": 0.10}
CAR_HIGHWAY_WORDS = ("motorway", "primary", "secondary", "tertiary", "unclassified", "service")  # substrings
LANDUSE_KEYS = ("landuse", "natural", "leisure")  # the kNN panel's land-use label (stripped like a task's tags)
NODE, WAY, RELATION = 0, 1, 2
OSM_TYPES = ("node", "way", "relation")

# implicit limits "CC:zone" (km/h) for the zones OSM documents most; others are unparsed
IMPLICIT_MAXSPEED = {
    "urban": 50, "rural": 90, "motorway": 130, "trunk": 100, "living_street": 7, "walk": 7, "school": 30,
    "zone30": 30, "zone:30": 30, "zone20": 20, "bicycle_road": 30, "pedestrian_zone": 7,
}
COUNTRY_RURAL = {"DE": 100, "AT": 100, "CH": 80, "LI": 80, "FI": 80, "GB": 96.6, "US": 88.5, "RU": 90, "FR": 80, "IT": 90}
COUNTRY_MOTORWAY = {"DE": 130, "AT": 130, "CH": 120, "FI": 120, "GB": 112.7, "RU": 110, "FR": 130, "IT": 130}
_NUMBER = re.compile(r"^\s*(\d+(?:[.,]\d+)?)\s*(km/h|kmh|kph|mph|knots)?\s*$", re.IGNORECASE)


MAX_PLAUSIBLE_KMH = 300.0  # no road limit is higher: a larger number is a typo or vandalism, not a speed


def _stated_kmh(value: str) -> float | None:
    """The number a single maxspeed value states, in km/h (no bound), or None."""
    m = _NUMBER.match(value)
    if not m:
        return None
    unit = (m.group(2) or "").lower()
    return round(float(m.group(1).replace(",", ".")) * (1.609344 if unit == "mph" else 1.852 if unit == "knots" else 1.0), 2)


def implausible_maxspeeds(pieces: "Pieces") -> int:
    """How many maxspeed tag values of ``pieces`` state a speed above ``MAX_PLAUSIBLE_KMH`` (parsed as no number)."""
    keys, values, _ = pieces.pairs()
    ms = np.flatnonzero(_contains(keys, "maxspeed"))
    stated = (_stated_kmh(p.strip()) for v in values.take(pa.array(ms, pa.int64())).to_pylist() for p in re.split(r"[;|]", str(v)))
    return sum(1 for kmh in stated if kmh is not None and kmh > MAX_PLAUSIBLE_KMH)


def parse_maxspeed(value: str) -> float | None:
    """A ``maxspeed`` value in km/h, or None when it states no number.

    - ``"50"``, ``"50 km/h"`` -> 50; ``"30 mph"`` -> 48.28; ``"10 knots"`` -> 18.52;
    - several values ``"50;30"`` or ``"50|30"`` (lanes, conditions) -> the largest;
    - ``"walk"`` -> 7; ``"CC:zone"`` implicit limits -> the table above (``"DE:urban"`` -> 50,
      ``"DE:rural"`` -> 100, ``"RU:urban"`` -> 50, ``"DE:zone30"`` -> 30, ``"CC:motorway"`` ->
      the country's motorway limit where known);
    - ``"none"`` (no limit), ``"signals"`` / ``"variable"`` (set by signs), anything else -> None;
    - a number above ``MAX_PLAUSIBLE_KMH`` (``"9999"``) -> None (``implausible_maxspeeds`` counts them).
    """
    if value is None:
        return None
    parts = [p for p in re.split(r"[;|]", str(value)) if p.strip()]
    if len(parts) > 1:
        vals = [v for v in (parse_maxspeed(p) for p in parts) if v is not None]
        return max(vals) if vals else None
    v = str(value).strip()
    stated = _stated_kmh(v)
    if stated is not None:
        return stated if stated <= MAX_PLAUSIBLE_KMH else None
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


def as_map_array(tags) -> pa.MapArray:
    """``tags`` (a map array, chunked or sliced, or a list of [(key, value), ...]) as one MapArray whose offsets start at 0."""
    if isinstance(tags, pa.ChunkedArray):
        tags = pa.concat_arrays(tags.chunks) if tags.num_chunks else pa.array([], pa.map_(pa.string(), pa.string()))
    if not isinstance(tags, pa.Array):
        return pa.array(tags, pa.map_(pa.string(), pa.string()))
    if tags.offset == 0 and (len(tags) == 0 or tags.offsets[0].as_py() == 0):
        return tags
    return pa.concat_arrays([tags])  # a copy: a slice's offsets do not start at 0


@dataclass(frozen=True)
class Pieces:
    """Entity pieces (shard rows) of ``n_tiles`` tiles, as arrays.

    tile (P,) int64 row of each piece's tile; osm_type (P,) int8 ``NODE`` / ``WAY`` / ``RELATION``;
    osm_id (P,) int64; tags (P,) map<string, string> with offsets from 0.
    """

    tile: np.ndarray
    osm_type: np.ndarray
    osm_id: np.ndarray
    tags: pa.MapArray
    n_tiles: int

    @staticmethod
    def build(tile, osm_type, osm_id, tags, n_tiles: int) -> "Pieces":
        """``osm_type`` may be the names (node / way / relation) or the int8 codes."""
        osm_type = np.asarray(osm_type)
        if osm_type.dtype.kind in "OUS":
            osm_type = np.select([osm_type == n for n in OSM_TYPES], [NODE, WAY, RELATION], -1)
        return Pieces(np.asarray(tile, np.int64), osm_type.astype(np.int8), np.asarray(osm_id, np.int64),
                      as_map_array(tags), int(n_tiles))

    def __len__(self) -> int:
        return len(self.tile)

    @property
    def entity_key(self) -> np.ndarray:
        """(P,) int64, one per entity (OSM type and id): pieces of one entity share it."""
        return entity_key(self.osm_type, self.osm_id)

    def pairs(self) -> tuple[pa.Array, pa.Array, np.ndarray]:
        """(keys (Q,), values (Q,), piece (Q,) int64): every tag pair and the piece it belongs to."""
        offsets = np.asarray(self.tags.offsets, np.int64)
        piece = np.repeat(np.arange(len(self)), np.diff(offsets))
        n = int(offsets[-1]) if len(offsets) else 0
        return self.tags.keys.slice(0, n), self.tags.items.slice(0, n), piece


def entity_key(osm_type: np.ndarray, osm_id: np.ndarray) -> np.ndarray:
    """(N,) int64 ``id * 4 + type``: one number per entity."""
    return np.asarray(osm_id, np.int64) * 4 + np.asarray(osm_type, np.int64)


def _contains(arr: pa.Array, word: str) -> np.ndarray:
    return np.asarray(pc.fill_null(pc.match_substring(arr, word), False), bool)


def stripped_pairs(task: str, keys: pa.Array, values: pa.Array) -> np.ndarray:
    """(Q,) bool: which tag pairs ``task`` strips from its input (the module docstring's list)."""
    if task == "building_count":
        return _contains(keys, "building")
    if task == "traffic_signals":
        return _contains(keys, "traffic_signals") | _contains(values, "traffic_signals") | _contains(keys, "crossing:signals")
    if task == "max_speed":
        return _contains(keys, "maxspeed")
    if task in ("bridge", "car_bridge"):
        return _contains(keys, "bridge") | _contains(values, "bridge") | _contains(keys, "layer")
    if task == "landuse":
        return np.isin(np.asarray(keys.to_numpy(zero_copy_only=False), object), LANDUSE_KEYS)
    raise ValueError(f"unknown task {task!r}")


@dataclass(frozen=True)
class TaskInput:
    """One task's masked input over some pieces: which pieces stay, and their tags after stripping.

    kept (P,) bool; tags (P,) map<string, string> (stripped; meaningful where ``kept``); counts of
    what went: removed entities (by rule, and untagged relation members with them), the pieces of other
    relations that held a removed piece, all removed pieces, and the tags stripped from pieces that stay."""

    task: str
    kept: np.ndarray
    tags: pa.MapArray
    removed_entities: int
    removed_members: int
    removed_parent_pieces: int
    removed_pieces: int
    stripped_tags: int

    def counts(self) -> dict:
        return {"removed_entities": self.removed_entities, "removed_untagged_members": self.removed_members,
                "removed_relation_pieces_holding_them": self.removed_parent_pieces, "removed_pieces": self.removed_pieces,
                "stripped_tags_of_kept_pieces": self.stripped_tags, "kept_pieces": int(self.kept.sum())}


def task_input(task: str, pieces: Pieces, members: pa.Table | None = None) -> TaskInput:
    """The masked input of ``task`` (module docstring): pieces removed by entity, tags stripped from the rest.

    ``members``: the region's ``relation_members`` table (relation_id, member_type, member_id), to remove
    the untagged members of removed relations; None removes the relations alone."""
    keys, values, pair_piece = pieces.pairs()
    strip = stripped_pairs(task, keys, values)
    n_tags = np.diff(np.asarray(pieces.tags.offsets, np.int64))
    n_strip = np.bincount(pair_piece[strip], minlength=len(pieces))
    flagged = (n_strip > 0) & (n_strip == n_tags)  # left with no tags
    if task == "building_count":
        flagged |= n_strip > 0
    elif task == "traffic_signals":
        flagged |= (n_strip > 0) & (pieces.osm_type == NODE)
    ekey = pieces.entity_key
    removed = np.unique(ekey[flagged])
    n_by_rule = len(removed)
    edges = _member_edges(members) if members is not None and members.num_rows else None
    if edges is not None and len(removed):
        removed = _with_untagged_members(removed, ekey[n_tags == 0], *edges)
    kept = ~np.isin(ekey, removed)
    n_parents = 0
    if edges is not None and len(removed):
        parents = _parent_pieces(pieces, kept, *edges)
        n_parents = int(parents.sum())
        kept &= ~parents
    keep_pair = ~strip & kept[pair_piece]
    new_offsets = np.concatenate([[0], np.cumsum(np.bincount(pair_piece[keep_pair], minlength=len(pieces)))])
    mask = pa.array(keep_pair)
    tags = pa.MapArray.from_arrays(pa.array(new_offsets, pa.int32()), keys.filter(mask), values.filter(mask))
    return TaskInput(task, kept, tags, n_by_rule, len(removed) - n_by_rule, n_parents, int((~kept).sum()),
                     int((strip & kept[pair_piece]).sum()))


def unmasked_input(pieces: Pieces) -> TaskInput:
    """Every piece with all its tags: the input before any task's removals."""
    return TaskInput("none", np.ones(len(pieces), bool), pieces.tags, 0, 0, 0, 0, 0)


def _member_edges(members: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(relation entity keys (M,), member entity keys (M,)) of a ``relation_members`` table."""
    rel = entity_key(np.full(members.num_rows, RELATION), members.column("relation_id").to_numpy())
    mtype = np.asarray(members.column("member_type").to_numpy(zero_copy_only=False), object)
    member = entity_key(np.select([mtype == n for n in OSM_TYPES], [NODE, WAY, RELATION], 0),
                        members.column("member_id").to_numpy())
    return rel, member


def _parent_pieces(pieces: Pieces, kept: np.ndarray, rel: np.ndarray, member: np.ndarray) -> np.ndarray:
    """(P,) bool: kept pieces of relations that hold a removed member's piece in the same tile.

    A relation's piece in a tile is the union of its members' pieces there, so it would carry the removed
    member's geometry; its pieces in other tiles do not and stay. Followed up through parent relations."""
    ekey, tile = pieces.entity_key, pieces.tile
    piece_of = {(int(k), int(t)): i for i, (k, t) in enumerate(zip(ekey.tolist(), tile.tolist())) if k % 4 == RELATION}
    parents_of: dict[int, list[int]] = {}
    for r, m in zip(rel.tolist(), member.tolist()):
        parents_of.setdefault(m, []).append(r)
    out = np.zeros(len(pieces), bool)
    todo = [(int(k), int(t)) for k, t in zip(ekey[~kept].tolist(), tile[~kept].tolist()) if k in parents_of]
    while todo:
        m, t = todo.pop()
        for r in parents_of.get(m, ()):
            i = piece_of.get((r, t))
            if i is not None and kept[i] and not out[i]:
                out[i] = True
                todo.append((r, t))
    return out


def _with_untagged_members(removed: np.ndarray, untagged: np.ndarray, rel: np.ndarray, member: np.ndarray) -> np.ndarray:
    """``removed`` entity keys plus, transitively, the untagged members of removed relations."""
    candidate = np.isin(member, np.unique(untagged))
    rel, member = rel[candidate], member[candidate]
    out = np.unique(removed)
    while True:
        new = np.setdiff1d(member[np.isin(rel, out)], out)
        if not len(new):
            return out
        out = np.union1d(out, new)


def tile_labels(pieces: Pieces) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per task: (labels (T,) float64, defined (T,) bool) of the ``pieces.n_tiles`` tiles, before any removal."""
    n, p = pieces.n_tiles, len(pieces)
    keys, values, pair_piece = pieces.pairs()
    per_piece = lambda flags: np.bincount(pair_piece[flags], minlength=p) > 0  # noqa: E731
    building = per_piece(_contains(keys, "building"))
    signals = per_piece(stripped_pairs("traffic_signals", keys, values)) & (pieces.osm_type == NODE)
    bridge = per_piece(_contains(keys, "bridge") | _contains(values, "bridge"))
    highway_key = _contains(keys, "highway")
    car_road = per_piece(highway_key & np.logical_or.reduce([_contains(values, w) for w in CAR_HIGHWAY_WORDS]))
    # max_speed: the largest parsed "maxspeed" value of a piece, else 0 with a highway key, else none (-100)
    speed = np.full(p, -100.0)
    speed[per_piece(highway_key)] = 0.0
    ms = np.flatnonzero(_contains(keys, "maxspeed"))
    parsed = {}
    for j, v in zip(ms.tolist(), values.take(pa.array(ms, pa.int64())).to_pylist()):
        s = parsed[v] if v in parsed else parsed.setdefault(v, parse_maxspeed(v))
        if s is not None:
            speed[pair_piece[j]] = max(speed[pair_piece[j]], s)
    tile_speed = np.full(n, -100.0)
    np.maximum.at(tile_speed, pieces.tile, speed)
    count = lambda flags: np.bincount(pieces.tile[flags], minlength=n).astype(np.float64)  # noqa: E731
    everywhere = np.ones(n, bool)
    return {
        "building_count": (count(building), everywhere),
        "traffic_signals": (count(signals), everywhere),
        "max_speed": (np.maximum(tile_speed, 0.0), tile_speed > 0),  # none: excluded (no highway); 0: pruned
        "bridge": ((count(bridge) > 0).astype(np.float64), everywhere),
        "car_bridge": ((count(bridge & car_road) > 0).astype(np.float64), everywhere),
    }


def landuse_class(pieces: Pieces) -> np.ndarray:
    """(T,) object: per tile the most frequent ``key=value`` of its land-use keys (``LANDUSE_KEYS``), "" if none.

    Ties go to the alphabetically first pair. The kNN panel's categorical label."""
    keys, values, pair_piece = pieces.pairs()
    hit = np.flatnonzero(stripped_pairs("landuse", keys, values))
    out = np.full(pieces.n_tiles, "", object)
    if not len(hit):
        return out
    k = np.asarray(keys.take(pa.array(hit)).to_numpy(zero_copy_only=False), object)
    v = np.asarray(values.take(pa.array(hit)).to_numpy(zero_copy_only=False), object)
    pair, tile = k + "=" + v, pieces.tile[pair_piece[hit]]
    uniq, inverse = np.unique(pair, return_inverse=True)
    combo = tile.astype(np.int64) * len(uniq) + inverse.reshape(-1)
    c_keys, c_counts = np.unique(combo, return_counts=True)
    c_tile, c_pair = c_keys // len(uniq), c_keys % len(uniq)
    order = np.lexsort((c_pair, -c_counts, c_tile))  # per tile: most frequent first, then alphabetical
    first = order[np.r_[True, np.diff(c_tile[order]) != 0]]
    out[c_tile[first]] = uniq[c_pair[first]]
    return out


def subsample_zero_labels(task: str, labels: np.ndarray, defined: np.ndarray, seed: int) -> np.ndarray:
    """(T,) bool: the tiles used for ``task``: defined, with zero-label tiles kept at the task's rate."""
    rate = ZERO_KEEP.get(task)
    keep = defined.copy()
    if rate is not None:
        rng = np.random.default_rng([seed, TASKS.index(task)])
        zero = defined & (labels == 0)
        keep[zero] = rng.random(int(zero.sum())) < rate
    return keep
