"""OSM tag rules: which keys are dropped, and which closed ways are areas.

Dropped keys (the method note's filters, spelled out):

* import/meta keys: ``tiger:*``, ``source*`` (``source``, ``source:geometry``, ``source_ref``),
  ``import*``, ``yh:*``, ``created_by``;
* name-like keys: ``name:*`` (translations), ``alt_name*``, ``old_name*``, ``official_name*``,
  ``loc_name*``, ``short_name*``, ``int_name*``, ``nat_name*``, ``reg_name*``,
  ``sorting_name*``, ``wikipedia``, ``wikidata``, ``*:wikipedia``, ``*:wikidata``,
  ``note``, ``note:*``, ``fixme``, ``FIXME``.

``name`` itself is kept: the tag vocabulary maps high-cardinality keys to ``(key, "")``.
"""

from __future__ import annotations

from functools import lru_cache

_DROP_PREFIXES = (
    "tiger:", "source", "import", "yh:", "created_by",
    "name:", "alt_name", "old_name", "official_name", "loc_name", "short_name", "int_name",
    "nat_name", "reg_name", "sorting_name", "note:",
)
_DROP_EXACT = frozenset({"note", "fixme", "FIXME", "wikipedia", "wikidata"})
_DROP_SUFFIXES = (":wikipedia", ":wikidata")


@lru_cache(maxsize=65536)
def keep_key(key: str) -> bool:
    """True if a tag key survives the filters above."""
    return not (key in _DROP_EXACT or key.startswith(_DROP_PREFIXES) or key.endswith(_DROP_SUFFIXES))


# Closed ways are areas when a key below says so (values in the exception sets stay lines).
_AREA_KEYS = {
    "building": (), "building:part": (), "landuse": (), "amenity": (), "shop": (), "office": (),
    "craft": (), "tourism": (), "historic": (), "military": (), "place": (), "healthcare": (),
    "water": (), "wetland": (), "area:highway": (), "indoor": (), "golf": (), "ruins": (),
    "leisure": ("track", "slipway"),
    "natural": ("coastline", "cliff", "ridge", "arete", "tree_row", "earth_bank", "gorge"),
    "man_made": ("embankment", "pipeline", "cutline", "breakwater", "groyne", "dyke", "pier"),
    "aeroway": ("taxiway", "runway", "parking_position", "jet_bridge"),
}
_AREA_TAGS = {
    "waterway": {"riverbank", "dock", "boatyard", "dam"},
    "power": {"plant", "substation", "generator", "transformer"},
    "public_transport": {"platform", "station"},
    "railway": {"platform", "station", "turntable"},
    "highway": {"services", "rest_area", "platform"},
    "barrier": {"city_wall"},
}


AREA_YES, AREA_NO, IMPLIES_AREA, NO_VOTE = 2, -2, 1, 0


def area_vote(key: str, value: str) -> int:
    """What one tag says about a closed way: ``area=yes``/``area=no`` decide (+-2), an
    area-like tag implies an area (1), anything else says nothing (0)."""
    if key == "area":
        return AREA_YES if value == "yes" else AREA_NO if value == "no" else NO_VOTE
    exceptions = _AREA_KEYS.get(key)
    if exceptions is not None and value != "no" and value not in exceptions:
        return IMPLIES_AREA
    values = _AREA_TAGS.get(key)
    if values is not None and value in values:
        return IMPLIES_AREA
    return NO_VOTE


def is_area(tags: dict[str, str]) -> bool:
    """Whether a closed way with these tags is a polygon (True) or a closed line (False)."""
    votes = [area_vote(k, v) for k, v in tags.items()]
    if AREA_YES in votes:
        return True
    if AREA_NO in votes:
        return False
    return IMPLIES_AREA in votes
