"""QuackOSM baseline for ``bench/ingest.py``: what a user would pick instead of our ingestion.

    <quackosm venv>/bin/python bench/quackosm_baseline.py PBF EPSG OUT_DIR

Runs in its own virtual environment (``bench/ingest.py --quackosm`` builds it under ``bench/_cache``):
QuackOSM 0.19 needs DuckDB 1.5 (it breaks on this project's DuckDB 2.0), and its DuckDB ``spatial``
extension, which it would download at run time, comes from the ``duckdb-extension-spatial`` wheel.

1. ``quackosm.convert_pbf_to_parquet``: every tagged feature with its geometry, as GeoParquet.
2. The same 300 m grid as ours in ``EPSG`` (the UTM zone ours chose): DuckDB spatial projects each
   feature, spans the cells of its bounding box and keeps each non-empty ``ST_Intersection`` with a cell,
   written as tiled GeoParquet (cell x, cell y, feature id, WKB piece).

Prints one JSON line: wall time per phase, features, tiles, pieces, peak RSS (MB).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path


def main() -> None:
    pbf, epsg, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    out.mkdir(parents=True, exist_ok=True)
    import duckdb
    import duckdb_extensions

    duckdb_extensions.import_extension("spatial")  # from the wheel: no download
    import quackosm

    t0 = time.perf_counter()
    features = quackosm.convert_pbf_to_parquet(pbf, result_file_path=out / "features.parquet", working_directory=out / "work",
                                               ignore_cache=True, verbosity_mode="silent")
    t_read = time.perf_counter() - t0
    con = duckdb.connect(config={"temp_directory": str(out / "duckdb")})
    con.sql("LOAD spatial")
    n_features = con.sql(f"SELECT count(*) FROM read_parquet('{features}')").fetchall()[0][0]
    con.sql(f"""COPY (
        WITH f AS (SELECT feature_id, ST_Transform(geometry, 'EPSG:4326', 'EPSG:{epsg}', always_xy := true) AS g
                   FROM read_parquet('{features}')),
             b AS (SELECT feature_id, g, CAST(floor(ST_XMin(g) / 300) AS BIGINT) AS x0, CAST(floor(ST_XMax(g) / 300) AS BIGINT) AS x1,
                          CAST(floor(ST_YMin(g) / 300) AS BIGINT) AS y0, CAST(floor(ST_YMax(g) / 300) AS BIGINT) AS y1 FROM f),
             c AS (SELECT feature_id, g, unnest(generate_series(x0, x1)) AS tile_x, y0, y1 FROM b),
             d AS (SELECT feature_id, g, tile_x, unnest(generate_series(y0, y1)) AS tile_y FROM c),
             p AS (SELECT tile_x, tile_y, feature_id,
                          ST_Intersection(g, ST_MakeEnvelope(tile_x * 300, tile_y * 300, tile_x * 300 + 300, tile_y * 300 + 300)) AS piece
                   FROM d)
        SELECT tile_x, tile_y, feature_id, piece AS geometry FROM p WHERE NOT ST_IsEmpty(piece)
    ) TO '{out / "tiles.parquet"}' (FORMAT parquet, COMPRESSION zstd)""")
    counts = con.sql(f"SELECT count(DISTINCT (tile_x, tile_y)), count(*) FROM read_parquet('{out / 'tiles.parquet'}')").fetchall()[0]
    total = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({"wall_s": total, "read_s": t_read, "tile_s": total - t_read, "n_entities": int(n_features),
                      "n_tiles": int(counts[0]), "n_pieces": int(counts[1]), "peak_rss_mb": peak}))


if __name__ == "__main__":
    main()
