"""Build an NX x NY replicated OSM extract: every object copied NX*NY times, shifted by the
extract's width/height and with ids offset by a large constant per copy (the scaling data
of ``../shared/data/README.md``). Used by ``bench/ingest.py`` and by tests that need an
extract wider than one block of tiles.

    python bench/replicate.py SRC.osm.pbf OUT.osm.pbf --n 8
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import osmium

ID_OFFSET = 10_000_000_000  # per copy; real OSM ids are far below this


def _bounds(src: str) -> tuple[float, float, float, float]:
    """The extract's extent: its header bounding box, else the bounds of its nodes."""
    box = osmium.io.Reader(src, osmium.osm.osm_entity_bits.NOTHING).header().box()
    if box.valid():
        return box.bottom_left.lon, box.bottom_left.lat, box.top_right.lon, box.top_right.lat
    minx = miny = float("inf")
    maxx = maxy = float("-inf")
    for node in osmium.FileProcessor(src, osmium.osm.NODE):
        loc = node.location
        if loc.valid():
            minx, maxx = min(minx, loc.lon), max(maxx, loc.lon)
            miny, maxy = min(miny, loc.lat), max(maxy, loc.lat)
    return minx, miny, maxx, maxy


def replicate(src: str | os.PathLike, out: str | os.PathLike, n: int, ny: int | None = None) -> Path:
    """Write ``out`` (overwritten) with n x ny shifted copies of ``src`` (ny defaults to n)."""
    src, out = str(src), Path(out)
    ny = n if ny is None else ny
    minx, miny, maxx, maxy = _bounds(src)
    width, height = (maxx - minx) * 1.001, (maxy - miny) * 1.001
    copies = [(k, (k % n) * width, (k // n) * height) for k in range(n * ny)]
    tmp = out.with_name(out.name + ".tmp.osm.pbf")
    tmp.unlink(missing_ok=True)
    writer = osmium.SimpleWriter(str(tmp))
    try:
        nodes = [(o.id, o.location.lon, o.location.lat, [(t.k, t.v) for t in o.tags], o.version)
                 for o in osmium.FileProcessor(src, osmium.osm.NODE) if o.location.valid()]
        for k, dx, dy in copies:
            off = k * ID_OFFSET
            for nid, lon, lat, tags, version in nodes:
                writer.add_node(osmium.osm.mutable.Node(id=nid + off, location=(lon + dx, lat + dy), tags=tags, version=version))
        ways = [(o.id, [nd.ref for nd in o.nodes], [(t.k, t.v) for t in o.tags], o.version)
                for o in osmium.FileProcessor(src, osmium.osm.WAY)]
        for k, _, _ in copies:
            off = k * ID_OFFSET
            for wid, refs, tags, version in ways:
                writer.add_way(osmium.osm.mutable.Way(id=wid + off, nodes=[r + off for r in refs], tags=tags, version=version))
        rels = [(o.id, [(m.type, m.ref, m.role) for m in o.members], [(t.k, t.v) for t in o.tags], o.version)
                for o in osmium.FileProcessor(src, osmium.osm.RELATION)]
        for k, _, _ in copies:
            off = k * ID_OFFSET
            for rid, members, tags, version in rels:
                writer.add_relation(osmium.osm.mutable.Relation(
                    id=rid + off, members=[(t, ref + off, role) for t, ref, role in members], tags=tags, version=version))
    finally:
        writer.close()
    os.replace(tmp, out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=8)
    args = ap.parse_args()
    t = time.perf_counter()
    path = replicate(args.src, args.out, args.n)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()
