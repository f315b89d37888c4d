"""The area a clipped region is ingested over: ``--clip W,S,E,N`` or ``--clip FILE.geojson``.

A clipped region is made of the 300 m tiles (of the usual UTM grid) that touch the area. Every
entity with a piece in those tiles is read whole, so a way or a relation that crosses the area's
edge keeps all its nodes and members: its pieces, areas and ``is_clipped`` flags are exactly those of
a whole-extract run, tile for tile. ``clip_osm`` keeps the entities that can reach the area (a
cheap bounding-box test in degrees, with a margin, then the members of every kept relation,
transitively); ``tiling.tile_osm(clip=...)`` keeps the pieces in the touching tiles.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import shapely
from pyproj import Transformer

from ..errors import GeojepaError
from .grid import TILE_SIZE_M, utm_epsg
from .osm_read import OsmData

SEGMENT_DEG = 0.01  # densify the area's edges before projecting: a parallel is a curve in UTM


def _bbox_area(text: str) -> shapely.Geometry:
    try:
        west, south, east, north = (float(v) for v in text.split(","))
    except ValueError:
        raise GeojepaError(f"--clip {text!r}: give W,S,E,N in degrees (e.g. 9.47,47.05,9.64,47.27) or a .geojson file") from None
    if not (-180 <= west < east <= 180 and -90 <= south < north <= 90):
        raise GeojepaError(f"--clip {text!r}: need -180 <= W < E <= 180 and -90 <= S < N <= 90 (degrees, W,S,E,N)")
    return shapely.box(west, south, east, north)


def _geojson_area(path: Path) -> shapely.Geometry:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise GeojepaError(f"--clip {path}: not a readable GeoJSON file ({exc}); give W,S,E,N or a .geojson polygon") from None
    features = doc.get("features") if doc.get("type") == "FeatureCollection" else [doc]
    geoms = []
    for f in features or []:
        g = f.get("geometry") if f.get("type") == "Feature" else f
        try:
            geoms.append(shapely.geometry.shape(g))
        except Exception:
            raise GeojepaError(f"--clip {path}: a geometry is not valid GeoJSON; give Polygon or MultiPolygon features") from None
    area = shapely.union_all([shapely.make_valid(g) for g in geoms if g.area > 0]) if geoms else None
    if area is None or area.is_empty or area.area == 0:
        raise GeojepaError(f"--clip {path}: holds no polygon with an area; give Polygon or MultiPolygon features in lon/lat")
    minx, miny, maxx, maxy = area.bounds
    if not (-180 <= minx and maxx <= 180 and -90 <= miny and maxy <= 90):
        raise GeojepaError(f"--clip {path}: coordinates are not lon/lat degrees (bounds {area.bounds}); GeoJSON is EPSG:4326")
    return area


@dataclass(frozen=True)
class ClipArea:
    """A polygon in lon/lat degrees (EPSG:4326), and the text it was given as."""

    polygon: shapely.Geometry
    source: str

    @classmethod
    def parse(cls, text: str) -> "ClipArea":
        """From ``W,S,E,N`` degrees or the path of a GeoJSON Polygon / MultiPolygon / Feature(Collection)."""
        text = str(text).strip()
        path = Path(text).expanduser()
        if text.lower().endswith((".geojson", ".json")) or path.is_file():
            if not path.is_file():
                raise GeojepaError(f"--clip {text}: no such file; give W,S,E,N or the path of a .geojson polygon")
            return cls(_geojson_area(path), str(path.resolve()))
        return cls(_bbox_area(text), text)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        return tuple(float(v) for v in self.polygon.bounds)

    @property
    def epsg(self) -> int:
        """The UTM zone of the area's centre: the clipped region's grid."""
        c = self.polygon.centroid
        return utm_epsg(c.x, c.y)

    def describe(self) -> dict:
        """What a manifest records: the text given, the bounds, and a sha256 of the polygon (WKB)."""
        return {"source": self.source, "bounds_lonlat": list(self.bounds),
                "polygon_sha256": hashlib.sha256(shapely.to_wkb(self.polygon, output_dimension=2)).hexdigest()}

    def projected(self, epsg: int) -> shapely.Geometry:
        """The area in ``epsg`` metres, its edges densified first (every ``SEGMENT_DEG``)."""
        dense = shapely.segmentize(self.polygon, SEGMENT_DEG)
        to_utm = Transformer.from_crs(4326, epsg, always_xy=True)
        return shapely.transform(dense, lambda xy: np.column_stack(to_utm.transform(xy[:, 0], xy[:, 1])))

    def margin_deg(self, tile_size_m: float = TILE_SIZE_M) -> tuple[float, float]:
        """(lon, lat) degrees that cover two tiles beyond the area everywhere in it: a touching tile reaches
        at most one tile diagonal (1.42 tiles) past the edge."""
        dlat = 2 * tile_size_m / 110_574.0
        max_lat = min(89.0, max(abs(self.bounds[1]), abs(self.bounds[3])))
        return dlat / np.cos(np.radians(max_lat)), dlat


def tiles_touching(area_utm: shapely.Geometry, tx: np.ndarray, ty: np.ndarray, tile_size_m: float) -> np.ndarray:
    """(M,) bool: tile (tx, ty) of the grid touches ``area_utm`` (shares at least a point with it)."""
    if len(tx) == 0:
        return np.zeros(0, bool)
    key, inverse = np.unique(np.stack([tx, ty], axis=1), axis=0, return_inverse=True)
    s = float(tile_size_m)
    boxes = shapely.box(key[:, 0] * s, key[:, 1] * s, (key[:, 0] + 1) * s, (key[:, 1] + 1) * s)
    shapely.prepare(area_utm)
    return shapely.intersects(area_utm, boxes)[inverse.reshape(-1)]


def clip_osm(data: OsmData, area: ClipArea, tile_size_m: float = TILE_SIZE_M) -> OsmData:
    """The entities of ``data`` that may have a piece in a tile touching ``area``, each complete.

    Kept: nodes and ways whose bounding box meets the area's, widened by ``margin_deg``; relations
    with a kept member (transitively); then every member of a kept relation (transitively), so that
    multipolygons assemble whole. The others are counted under ``dropped["outside_clip"]``.
    """
    dlon, dlat = area.margin_deg(tile_size_m)
    west, south, east, north = area.bounds
    west, south, east, north = west - dlon, south - dlat, east + dlon, north + dlat

    def meets(lo_lon, lo_lat, hi_lon, hi_lat):
        return (hi_lon >= west) & (lo_lon <= east) & (hi_lat >= south) & (lo_lat <= north)

    n_nodes, n_ways, n_rels = data.n_nodes, data.n_ways, len(data.rel_id)
    first_rel = n_nodes + n_ways
    # (N, 4) lon/lat bounding box of every entity: nodes, ways, then relations over their node and way members
    box = np.empty((len(data), 4))
    box[:n_nodes, :2] = box[:n_nodes, 2:] = data.node_lonlat
    if n_ways:
        starts, xy = data.way_offsets[:-1], data.way_coords
        box[n_nodes:first_rel, 0], box[n_nodes:first_rel, 1] = np.minimum.reduceat(xy[:, 0], starts), np.minimum.reduceat(xy[:, 1], starts)
        box[n_nodes:first_rel, 2], box[n_nodes:first_rel, 3] = np.maximum.reduceat(xy[:, 0], starts), np.maximum.reduceat(xy[:, 1], starts)
    box[first_rel:, :2], box[first_rel:, 2:] = np.inf, -np.inf
    n_members = np.fromiter((len(m) for m in data.rel_members), np.int64, n_rels)
    member = np.fromiter((i for m in data.rel_members for i, _ in m), np.int64, int(n_members.sum()))
    owner = first_rel + np.repeat(np.arange(n_rels), n_members)
    if len(member):  # a multipolygon ringed by ways that each stay outside still covers the area
        np.minimum.at(box[:, 0], owner, box[member, 0])
        np.minimum.at(box[:, 1], owner, box[member, 1])
        np.maximum.at(box[:, 2], owner, box[member, 2])
        np.maximum.at(box[:, 3], owner, box[member, 3])
    keep = meets(box[:, 0], box[:, 1], box[:, 2], box[:, 3])
    for _ in range(64):  # up: a relation with a kept member is kept (relations of relations: one level a pass)
        reach = np.zeros(len(data), bool)
        reach[owner[keep[member]]] = True
        if not (reach & ~keep).any():
            break
        keep |= reach
    for _ in range(64):  # down: every member of a kept relation, so that it stays complete
        pulled = np.zeros(len(data), bool)
        pulled[member[keep[owner]]] = True
        if not (pulled & ~keep).any():
            break
        keep |= pulled
    return _subset(data, keep)


def _subset(data: OsmData, keep: np.ndarray) -> OsmData:
    """``data`` restricted to the entities where ``keep`` (N,) is True; the others are dropped as ``outside_clip``."""
    n_nodes, n_ways = data.n_nodes, data.n_ways
    first_rel = n_nodes + n_ways
    new_index = np.full(len(data), -1, np.int64)
    new_index[keep] = np.arange(int(keep.sum()))
    k_nodes, k_ways, k_rels = keep[:n_nodes], keep[n_nodes:first_rel], keep[first_rel:]
    counts = np.diff(data.way_offsets)
    ways = np.flatnonzero(k_ways)
    vertex = np.repeat(k_ways, counts)
    offsets = np.zeros(len(ways) + 1, np.int64)
    np.cumsum(counts[ways], out=offsets[1:])
    rels = np.flatnonzero(k_rels)
    members = [[(int(new_index[m]), role) for m, role in data.rel_members[k]] for k in rels.tolist()]
    dropped = data.dropped.copy()
    dropped["outside_clip"] += int((~keep).sum())
    return OsmData(
        node_id=data.node_id[k_nodes], node_lonlat=data.node_lonlat[k_nodes],
        way_id=data.way_id[ways], way_coords=data.way_coords[vertex], way_offsets=offsets,
        way_polygon=data.way_polygon[ways], way_complete=data.way_complete[ways],
        rel_id=data.rel_id[rels], rel_multipolygon=data.rel_multipolygon[rels], rel_members=members,
        rel_complete=data.rel_complete[rels], tags=data.tags.take(pa.array(np.flatnonzero(keep))),
        n_input=data.n_input, dropped=dropped, repaired=data.repaired.copy(),
    )

