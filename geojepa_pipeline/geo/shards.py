"""Write tiled tables as Parquet shards (zstd) with GeoParquet metadata on the geometry column.

A shard is a run of consecutive tiles in the spatially blocked tile order, at most
``shard_tiles`` of them, written as two files with the same index, one of the ``tiles`` table and
one of the ``entities`` table (the caller names them: ``store.Staging.shard``). ``geopandas.read_parquet`` opens an entity shard directly
(geometry in tile-local metres, so its CRS is unset).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .tiling import SCHEMA_VERSION, TiledRegion

DEFAULT_SHARD_TILES = 4096
ROW_GROUP_ROWS = 65536


def geoparquet_metadata(geometry_types: list[str]) -> bytes:
    """The ``geo`` key of GeoParquet 1.1 for our WKB ``geometry`` column (CRS: tile-local metres, unset)."""
    meta = {
        "version": "1.1.0",
        "primary_column": "geometry",
        "columns": {
            "geometry": {
                "encoding": "WKB",
                "geometry_types": sorted(geometry_types),
                "crs": None,
                "edges": "planar",
                "description": "tile-local metres: (0, 0) is the tile's lower-left corner in the UTM CRS of the tiles table's epsg",
            }
        },
    }
    return json.dumps(meta).encode()


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """Parquet column paths worth dictionary-encoding: the string columns and string maps' keys and values.

    Dictionary encoding everything (pyarrow's default) also tries it on the WKB and number
    columns, where it never pays: writing the 1.77 M pieces of the 8x8 Liechtenstein
    (``bench/ingest.py``'s extract) in 300 k-row files, strings only took 1.31 s against
    1.78 s, and 125 MB against 139 MB.
    """
    paths = []
    for f in schema:
        if pa.types.is_string(f.type) or pa.types.is_large_string(f.type):
            paths.append(f.name)
        elif pa.types.is_map(f.type):
            paths += [f"{f.name}.key_value.key", f"{f.name}.key_value.value"]
    return paths


def statistics_columns(schema: pa.Schema) -> list[str]:
    """Columns whose row-group min/max can prune a read: the flat, non-binary ones.

    Min/max of WKB bytes, tag maps and min-box lists prune nothing; skipping them took the
    encoding of the 8x8 Liechtenstein's 1.77 M pieces from 1.29 to 1.18 CPU-seconds.
    """
    return [f.name for f in schema
            if not (pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type) or pa.types.is_nested(f.type))]


def _write(table: pa.Table, path: Path) -> None:
    pq.write_table(table, path, compression="zstd", row_group_size=ROW_GROUP_ROWS,
                   write_statistics=statistics_columns(table.schema), use_dictionary=dictionary_columns(table.schema))


class ShardSink(Protocol):
    """Where shards go and how the manifest lists them (the store's ``Staging`` is one)."""

    def shard(self, table: str, shard_index: int) -> Path: ...  # where that shard's file goes

    def shard_entry(self, shard_index: int, files: dict[str, Path], **facts) -> dict: ...  # its manifest entry


def _write_shard(shard_index: int, tiles_part: pa.Table, ent_part: pa.Table, sink: ShardSink) -> dict:
    # one contiguous chunk per column: the bytes do not depend on how the pieces were batched
    tiles_part, ent_part = tiles_part.combine_chunks(), ent_part.combine_chunks()
    geom_types = sorted(set(ent_part.column("geom_type").unique().to_pylist()))
    ent_part = ent_part.replace_schema_metadata({b"geo": geoparquet_metadata(geom_types)})
    tiles_path, ent_path = sink.shard("tiles", shard_index), sink.shard("entities", shard_index)
    _write(tiles_part, tiles_path)
    _write(ent_part, ent_path)
    return sink.shard_entry(
        shard_index, {"tiles": tiles_path, "entities": ent_path}, n_tiles=tiles_part.num_rows, n_pieces=ent_part.num_rows,
        first_tile=tiles_part.column("tile_id")[0].as_py(), last_tile=tiles_part.column("tile_id")[-1].as_py())


def write_tile_shards(tiled: TiledRegion, sink: ShardSink, shard_tiles: int = DEFAULT_SHARD_TILES, log=None) -> dict:
    """Write the shards of ``tiled`` into ``sink``; return the manifest body (without files/version).

    Pieces stream in (``TiledRegion.entity_chunks``) and leave as shards of ``shard_tiles``
    consecutive tiles; two threads encode (Parquet and zstd run in C++ without the GIL), and
    at most a few shards wait in memory.
    """
    if shard_tiles < 1:
        raise ValueError(f"shard_tiles must be >= 1, got {shard_tiles}")
    pending_tiles: list[pa.Table] = []
    pending_ents: list[pa.Table] = []
    n_pending = 0
    futures = []
    shards: list[dict] = []
    n_shards_total = -(-tiled.tiles.num_rows // shard_tiles)

    def collect(block: bool) -> None:
        while futures and (block or len(futures) > 2):
            shard = futures.pop(0).result()
            shards.append(shard)
            if log and (shard["index"] % 10 == 9):
                log(f"wrote {shard['index'] + 1}/{n_shards_total} shards")

    with ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1))) as pool:
        def flush() -> None:
            nonlocal pending_tiles, pending_ents, n_pending
            futures.append(pool.submit(_write_shard, len(shards) + len(futures),
                                       pa.concat_tables(pending_tiles), pa.concat_tables(pending_ents), sink))
            pending_tiles, pending_ents, n_pending = [], [], 0
            collect(block=False)

        for tiles, entities in tiled.entity_chunks():
            counts = np.asarray(tiles.column("n_entities"), np.int64)
            piece_start = np.concatenate([[0], np.cumsum(counts)])
            t = 0
            while t < tiles.num_rows:
                take = min(shard_tiles - n_pending, tiles.num_rows - t)
                pending_tiles.append(tiles.slice(t, take))
                pending_ents.append(entities.slice(int(piece_start[t]), int(piece_start[t + take] - piece_start[t])))
                n_pending += take
                t += take
                if n_pending == shard_tiles:
                    flush()
        if n_pending:
            flush()
        collect(block=True)
    return {
        "schema_version": SCHEMA_VERSION,
        "epsg": tiled.epsg,
        "tile_size_m": float(tiled.tiles.column("tile_size_m")[0].as_py()) if tiled.tiles.num_rows else None,
        "shard_tiles": shard_tiles,
        "n_tiles": tiled.tiles.num_rows,
        "n_pieces": sum(s["n_pieces"] for s in shards),
        "shards": shards,
        "accounting": tiled.accounting(),
        "area_check": tiled.area_check,
    }


def _invalid_in(entity_shards: list[Path], max_examples: int) -> dict:
    """``invalid_pieces`` of some shards, in this process."""
    import shapely

    from .wkb import surely_valid

    n_checked, by_reason, examples = 0, {}, []
    for path in entity_shards:
        wkb = pq.read_table(path, columns=["geometry"]).column("geometry")
        n_checked += len(wkb)
        asked = np.flatnonzero(~surely_valid(wkb))  # points and lines decided from their bytes; the rest through GEOS
        geoms = shapely.from_wkb(wkb.take(pa.array(asked)).to_numpy(zero_copy_only=False))
        invalid = ~shapely.is_valid(geoms)
        bad = asked[invalid]
        if not len(bad):
            continue
        ids = pq.read_table(path, columns=["tile_id", "osm_type", "osm_id"]).take(pa.array(bad)).to_pylist()
        for row, geom in zip(ids, geoms[invalid]):
            reason = shapely.is_valid_reason(geom).split("[")[0].strip()
            by_reason[reason] = by_reason.get(reason, 0) + 1
            if len(examples) < max_examples:
                examples.append(f"{row['osm_type']} {row['osm_id']} in {row['tile_id']}: {reason}")
    return {"n_checked": n_checked, "by_reason": by_reason, "examples": examples}


def invalid_pieces(entity_shards: list[Path], max_examples: int = 10, workers: int = 1) -> dict:
    """GEOS validity of every piece in ``entity_shards`` (entity Parquet files).

    Returns ``{"n_checked", "n_invalid", "by_reason": {reason: n}, "examples": ["way 12 in <tile>: reason", ...]}``;
    a reason is GEOS's without its coordinates ("Too few points in geometry component"). Reads only the
    geometry column, then the identifying columns of the invalid rows. Points and (multi)linestrings that are
    surely valid are decided from their bytes (``wkb.surely_valid``); only the rest is parsed for GEOS (the
    parse, not ``is_valid``, was the cost: 58 % of it went to points and lines on the 8x8 Liechtenstein).
    ``workers`` > 1: that many forked processes, each a contiguous run of the shards (the parse holds the
    GIL: two threads gained 24 %, two processes 43 %, on the 8x8's 1.77 M pieces: 3.39 s in one process,
    1.94 s in two, before the byte check).
    """
    from .parallel import fork_each

    groups = [list(g) for g in np.array_split(np.array(entity_shards, dtype=object), max(1, min(workers, len(entity_shards)))) if len(g)]
    parts = (fork_each(lambda g: _invalid_in(g, max_examples), groups, workers, name=lambda g: f"the validity check of {g[0].name}...")
             if len(groups) > 1 else [_invalid_in(g, max_examples) for g in groups])
    n_checked, by_reason, examples = 0, {}, []
    for part in parts:  # in shard order
        n_checked += part["n_checked"]
        for reason, n in part["by_reason"].items():
            by_reason[reason] = by_reason.get(reason, 0) + n
        examples += part["examples"][: max_examples - len(examples)]
    return {"n_checked": n_checked, "n_invalid": sum(by_reason.values()), "by_reason": dict(sorted(by_reason.items())),
            "examples": examples}
