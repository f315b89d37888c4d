"""Write tiled tables as Parquet shards (zstd) with GeoParquet metadata on the geometry column.

A shard is a run of consecutive tiles in the spatially blocked tile order, at most
``shard_tiles`` of them, written as two files with the same index: ``tiles-NNNNN.parquet``
and ``entities-NNNNN.parquet``. ``geopandas.read_parquet`` opens an entity shard directly
(geometry in tile-local metres, so its CRS is unset).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..store import shard_filename
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


def _write(table: pa.Table, path: Path) -> None:
    pq.write_table(table, path, compression="zstd", row_group_size=ROW_GROUP_ROWS, write_statistics=True)


def write_tile_shards(tiled: TiledRegion, out_dir: Path, shard_tiles: int = DEFAULT_SHARD_TILES, log=None) -> dict:
    """Write the shards of ``tiled`` into ``out_dir``; return the manifest body (without files/version)."""
    if shard_tiles < 1:
        raise ValueError(f"shard_tiles must be >= 1, got {shard_tiles}")
    tiles, entities = tiled.tiles, tiled.entities
    n_tiles = tiles.num_rows
    counts = tiles.column("n_entities").to_numpy().astype(np.int64)
    piece_start = np.concatenate([[0], np.cumsum(counts)])
    shards = []
    for shard_index, t0 in enumerate(range(0, n_tiles, shard_tiles)):
        t1 = min(n_tiles, t0 + shard_tiles)
        tiles_part = tiles.slice(t0, t1 - t0)
        ent_part = entities.slice(int(piece_start[t0]), int(piece_start[t1] - piece_start[t0]))
        geom_types = sorted(set(ent_part.column("geom_type").unique().to_pylist()))
        ent_part = ent_part.replace_schema_metadata({b"geo": geoparquet_metadata(geom_types)})
        tiles_name, ent_name = shard_filename("tiles", shard_index), shard_filename("entities", shard_index)
        _write(tiles_part, out_dir / tiles_name)
        _write(ent_part, out_dir / ent_name)
        shards.append({
            "index": shard_index, "tiles_file": tiles_name, "entities_file": ent_name,
            "n_tiles": tiles_part.num_rows, "n_pieces": ent_part.num_rows,
            "first_tile": tiles_part.column("tile_id")[0].as_py(), "last_tile": tiles_part.column("tile_id")[-1].as_py(),
        })
        if log and (shard_index % 10 == 9):
            log(f"wrote {shard_index + 1} shards ({t1:,}/{n_tiles:,} tiles)")
    return {
        "schema_version": SCHEMA_VERSION,
        "epsg": tiled.epsg,
        "tile_size_m": float(tiles.column("tile_size_m")[0].as_py()) if n_tiles else None,
        "shard_tiles": shard_tiles,
        "n_tiles": n_tiles,
        "n_pieces": entities.num_rows,
        "shards": shards,
        "accounting": tiled.accounting(),
        "area_check": tiled.area_check,
    }
