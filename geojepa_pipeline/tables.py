"""DuckDB over the current shards of every region: views ``tiles``, ``entities`` and ``images``."""

from __future__ import annotations

import duckdb
import pyarrow as pa

from .errors import GeojepaError
from .geo.tiling import ENTITIES_SCHEMA, TILES_SCHEMA
from .store import IMAGES, TILES, Dataset, Store


def sql_path_list(paths) -> str:
    """A DuckDB list literal of file paths, quoted (``read_parquet(['a.parquet', 'b.parquet'])``)."""
    return "[" + ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths) + "]"


def connect(store: Store) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with views ``tiles``, ``entities`` and ``images`` over every region's CURRENT shards.

    ``entities.geometry`` is WKB in tile-local metres; ``entities.tags`` is a MAP, so
    ``tags['building']`` reads one tag. ``images`` has one row per tile (``region``,
    ``tile_id``, ``coverage``, ``has_image``, ``has_nir``, ``scene_ids``, ``image``: 224x224x4
    bytes); join it to ``tiles`` on ``tile_id``.
    """
    con = duckdb.connect()
    datasets = list(store.iter_current(TILES))
    for table, schema in (("tiles", TILES_SCHEMA), ("entities", ENTITIES_SCHEMA)):
        files = [f for ds in datasets for f in ds.shards(table)]
        if files:
            con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet({sql_path_list(files)})")
        else:
            con.register(f"_{table}_empty", pa.table({f.name: pa.array([], f.type) for f in schema}))
            con.execute(f"CREATE VIEW {table} AS SELECT * FROM _{table}_empty")
    from .stages.imagery import IMAGES_SCHEMA

    selects = [
        f"SELECT '{ds.region}' AS region, * FROM read_parquet({sql_path_list(ds.shards('images'))})"
        for ds in store.iter_current(IMAGES) if ds.shard_entries
    ]
    if not selects:
        con.register("_images_empty", pa.table({"region": pa.array([], pa.string()), **{f.name: pa.array([], f.type) for f in IMAGES_SCHEMA}}))
        selects = ["SELECT * FROM _images_empty"]
    con.execute("CREATE VIEW images AS " + " UNION ALL ".join(selects))
    # from here on the connection reads the views' shard files and nothing else: no other file, no
    # write (COPY ... TO), no ATTACH, no extension, and no SET that would undo it
    shard_files = [f for ds in datasets for t in ("tiles", "entities") for f in ds.shards(t)]
    shard_files += [f for ds in store.iter_current(IMAGES) for f in ds.shards("images")]
    con.execute(f"SET allowed_paths = {sql_path_list(shard_files)}")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


READ_ONLY_STATEMENTS = (duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN)


def run_sql(store: Store, query: str) -> tuple[list[str], list[tuple]]:
    """Run ``query`` against the views; returns (column names, rows).

    Read-only: every statement must be a SELECT (``FROM tiles``, ``DESCRIBE``, ``SUMMARIZE``
    count) or an EXPLAIN, and the connection can open the views' shard files only (``connect``).
    """
    con = connect(store)
    try:
        refused = [s.type.name for s in con.extract_statements(query) if s.type not in READ_ONLY_STATEMENTS]
        if refused:
            raise GeojepaError(f"geojepa sql is read-only: it runs SELECT (or EXPLAIN) statements over the store's views, "
                               f"not {', '.join(refused)}")
        cur = con.execute(query)
        cols = [d[0] for d in cur.description] if cur.description else []
        return cols, cur.fetchall()
    finally:
        con.close()


def count_distinct_entities(dataset: Dataset) -> int:
    """Distinct (osm_type, osm_id) over a tile dataset's entity shards."""
    files = dataset.shards("entities")
    if not files:
        return 0
    con = duckdb.connect()
    try:
        return con.execute(
            f"SELECT count(*) FROM (SELECT DISTINCT osm_type, osm_id FROM read_parquet({sql_path_list(files)}))"
        ).fetchone()[0]
    finally:
        con.close()


