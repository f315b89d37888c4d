"""Ingest an extract block by block: square spatial blocks of the 300 m grid, memory bounded by a block.

1. ``spill_pbf`` decodes the pbf one pbf block at a time into Parquet tables on disk (nodes, ways, way
   refs, relations, members, tags), so nothing holds the whole file.
2. ``BlockPlan`` gives every node its block (``block_tiles`` x ``block_tiles`` tiles of the region's UTM
   grid), every way and relation the range of blocks its nodes and members reach, in DuckDB (which spills
   to disk past its memory limit).
3. ``BlockPlan.decoded(block)`` reads back one block's share as a ``_Decoded``: what decoding an extract of
   the block would give, with every way and relation complete (a relation's members, transitively) and
   a flag for each element that some relation holds, so the keep/drop rules decide each entity as they
   do for the whole file. ``osm_read.osm_data_from_decoded`` then applies them and ``tiling.tile_osm(block=...)``
   keeps the block's tiles. ``tile_share`` is that unit of work; ``ingest_blocks`` runs ``workers`` of them
   at once, each in a forked process (``ShareLayout`` is all a worker needs).
4. ``ingest_blocks`` puts the blocks' tiles back in the global tile order and merges what became of every
   entity, by id, into one accounting: the result is what a whole-file run gives (``tests/geo/test_blocks.py``).

Entities in no block (ways and relations with no located node, tagged nodes off the globe) form one more
share, the last (``ShareLayout.nowhere``), which is decided but not tiled.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyproj import Transformer

from .grid import TILE_SIZE_M, unique_ints, utm_epsg
from .osm_read import NODE, OSM_TYPE_NAMES, RELATION, WAY, _Decoded, iter_blocks
from .tiling import BLOCK_TILES, ELSEWHERE, EMPTY, ENTITIES_SCHEMA, KEPT, NO_PIECE, OUTSIDE_CLIP, TILES_SCHEMA, TiledRegion

_FLUSH_ROWS = 1 << 20  # rows buffered per table before a Parquet row group goes to disk

_SCHEMAS = {
    "nodes": pa.schema([("pos", pa.int64()), ("id", pa.int64()), ("lon", pa.float64()), ("lat", pa.float64()), ("n_raw", pa.int32())]),
    "ways": pa.schema([("pos", pa.int64()), ("id", pa.int64()), ("n_raw", pa.int32())]),
    "way_refs": pa.schema([("way_id", pa.int64()), ("seq", pa.int32()), ("node_id", pa.int64())]),
    "rels": pa.schema([("pos", pa.int64()), ("id", pa.int64()), ("n_raw", pa.int32()), ("type_value", pa.string())]),
    "members": pa.schema([("rel_id", pa.int64()), ("seq", pa.int32()), ("type", pa.int8()), ("ref", pa.int64()), ("role", pa.string())]),
    **{f"{kind}_tags": pa.schema([("owner_id", pa.int64()), ("seq", pa.int32()), ("key", pa.string()), ("value", pa.string())])
       for kind in ("node", "way", "rel")},
}


class _Writers:
    """One buffered ParquetWriter per table of ``_SCHEMAS`` under ``root``."""

    def __init__(self, root: Path):
        self.root = root
        self.buffers: dict[str, list[pa.Table]] = {name: [] for name in _SCHEMAS}
        self.rows = {name: 0 for name in _SCHEMAS}
        self.writers = {name: pq.ParquetWriter(root / f"{name}.parquet", schema, compression="lz4") for name, schema in _SCHEMAS.items()}

    def add(self, name: str, columns: dict) -> None:
        table = pa.table(columns, schema=_SCHEMAS[name])
        if table.num_rows:
            self.buffers[name].append(table)
            self.rows[name] += table.num_rows
            if self.rows[name] >= _FLUSH_ROWS:
                self.flush(name)

    def flush(self, name: str) -> None:
        if self.buffers[name]:
            self.writers[name].write_table(pa.concat_tables(self.buffers[name]))
        self.buffers[name], self.rows[name] = [], 0

    def close(self) -> None:
        for name, writer in self.writers.items():
            self.flush(name)
            writer.close()


def _tag_rows(owner_ids: np.ndarray, tags) -> dict:
    """Tag rows of one block: the owner's id, the row's rank within its owner (file order), key, value."""
    owner = tags.owner
    first = np.searchsorted(owner, owner, side="left")  # owner is sorted within a block
    return {"owner_id": owner_ids[owner] if len(owner) else np.zeros(0, np.int64),
            "seq": (np.arange(len(owner)) - first).astype(np.int32), "key": tags.keys, "value": tags.values}


@dataclass
class Spill:
    """Where ``spill_pbf`` wrote the tables, and the lon/lat bounds of the located nodes."""

    root: Path
    bounds_lonlat: tuple[float, float, float, float] | None
    n_nodes: int = 0
    n_ways: int = 0
    n_rels: int = 0


def spill_pbf(path, root: Path) -> Spill:
    """Decode ``path`` block by block into the Parquet tables of ``_SCHEMAS`` under ``root`` (a scratch dir)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    out = _Writers(root)
    lo, hi = np.array([np.inf, np.inf]), np.array([-np.inf, -np.inf])
    n_nodes = n_ways = n_rels = 0
    try:
        for b in iter_blocks(path):
            if len(b.node_id):
                n = len(b.node_id)
                out.add("nodes", {"pos": np.arange(n_nodes, n_nodes + n), "id": b.node_id, "lon": b.node_lon, "lat": b.node_lat,
                                  "n_raw": b.node_tags.n_raw.astype(np.int32)})
                out.add("node_tags", _tag_rows(b.node_id, b.node_tags))
                on_globe = (np.abs(b.node_lon) <= 180) & (np.abs(b.node_lat) <= 90)
                if on_globe.any():
                    lo = np.minimum(lo, [b.node_lon[on_globe].min(), b.node_lat[on_globe].min()])
                    hi = np.maximum(hi, [b.node_lon[on_globe].max(), b.node_lat[on_globe].max()])
                n_nodes += n
            if len(b.way_id):
                n = len(b.way_id)
                out.add("ways", {"pos": np.arange(n_ways, n_ways + n), "id": b.way_id, "n_raw": b.way_tags.n_raw.astype(np.int32)})
                owner = np.repeat(np.arange(n), b.way_counts)
                starts = np.cumsum(b.way_counts) - b.way_counts
                out.add("way_refs", {"way_id": b.way_id[owner], "seq": (np.arange(len(owner)) - starts[owner]).astype(np.int32),
                                     "node_id": b.way_refs})
                out.add("way_tags", _tag_rows(b.way_id, b.way_tags))
                n_ways += n
            if len(b.rel_id):
                n = len(b.rel_id)
                out.add("rels", {"pos": np.arange(n_rels, n_rels + n), "id": b.rel_id, "n_raw": b.rel_tags.n_raw.astype(np.int32),
                                 "type_value": pa.array(b.rel_type_value, pa.string())})
                owner = np.repeat(np.arange(n), b.mem_counts)
                starts = np.cumsum(b.mem_counts) - b.mem_counts
                out.add("members", {"rel_id": b.rel_id[owner], "seq": (np.arange(len(owner)) - starts[owner]).astype(np.int32),
                                    "type": b.mem_type.astype(np.int8), "ref": b.mem_ref, "role": b.mem_role})
                out.add("rel_tags", _tag_rows(b.rel_id, b.rel_tags))
                n_rels += n
    finally:
        out.close()
    bounds = (float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])) if np.isfinite(lo).all() else None
    return Spill(root, bounds, n_nodes, n_ways, n_rels)


def _q(con, sql: str, params: list | None = None) -> pa.Table:
    """The rows of one query, as Arrow."""
    return con.sql(sql, params=params).to_arrow_table()


def _do(con, sql: str) -> None:
    """Run one statement that returns no rows (DDL)."""
    con.sql(sql)


@dataclass
class BlockPlan:
    """The blocks of one spilled extract and the DuckDB views that read each block's share back.

    ``block_tiles``: a block's side in tiles (a multiple of ``tiling.BLOCK_TILES``, the sort blocks, so that
    the global tile order runs through whole ingestion blocks). ``epsg``: the grid (default: the UTM zone
    of the located nodes' centre; a whole-file run takes the kept entities' centre, the same zone unless
    stray nodes move it across a zone line).
    """

    spill: Spill
    block_tiles: int
    tile_size_m: float = TILE_SIZE_M
    epsg: int | None = None
    memory_limit: str = "512MB"
    con: duckdb.DuckDBPyConnection = field(init=False, repr=False)
    blocks: list = field(init=False, default_factory=list)  # (bx, by) of every block some entity reaches, sorted
    timings_s: dict = field(init=False, default_factory=dict)  # wall seconds of each planning step

    def __post_init__(self):
        if self.block_tiles < BLOCK_TILES or self.block_tiles % BLOCK_TILES:
            raise ValueError(f"block_tiles must be a positive multiple of {BLOCK_TILES}, got {self.block_tiles}")
        if self.epsg is None:
            if self.spill.bounds_lonlat is None:
                raise ValueError("the extract holds no node on the globe; nothing to tile")
            w, s, e, n = self.spill.bounds_lonlat
            self.epsg = utm_epsg((w + e) / 2.0, (s + n) / 2.0)
        root = self.spill.root
        (root / "duckdb").mkdir(exist_ok=True)
        self.con = duckdb.connect(config={"memory_limit": self.memory_limit, "temp_directory": str(root / "duckdb"),
                                          "preserve_insertion_order": False})
        _do(self.con, "SET enable_progress_bar = false")  # long statements would draw bars on stderr
        for name in _SCHEMAS:
            _do(self.con, f"CREATE VIEW {name} AS SELECT * FROM read_parquet('{root / name}.parquet')")
        for step in (self._node_blocks, self._boxes, self._partition):
            with self._timed(step.__name__.lstrip("_")):
                step()

    @contextmanager
    def _timed(self, name: str):
        t = time.perf_counter()
        yield
        self.timings_s[name] = self.timings_s.get(name, 0.0) + time.perf_counter() - t

    # ---- planning ----------------------------------------------------------------------------
    def _node_blocks(self) -> None:
        """``node_blocks.parquet``: every node's row with its block (``block_x``, ``block_y``; null off the globe)
        and whether some relation holds it (``member``), a row group at a time (never all in memory);
        ``nb(id, block_x, block_y)`` views the nodes on the globe."""
        to_utm = Transformer.from_crs(4326, self.epsg, always_xy=True)
        span = self.block_tiles * self.tile_size_m
        schema = _SCHEMAS["nodes"].append(pa.field("block_x", pa.int32())).append(pa.field("block_y", pa.int32())) \
            .append(pa.field("member", pa.bool_()))
        member_nodes = _q(self.con, f"SELECT DISTINCT ref FROM members WHERE type = {NODE} ORDER BY ref").column(0).to_numpy()
        path = self.spill.root / "node_blocks.parquet"
        nodes = pq.ParquetFile(self.spill.root / "nodes.parquet")
        with pq.ParquetWriter(path, schema, compression="lz4") as writer:
            # a row group (_FLUSH_ROWS rows) at a time: iter_batches reads ahead and held 0.9 GB more at 32x32
            for i in range(nodes.metadata.num_row_groups):
                batch = nodes.read_row_group(i)
                lon, lat = batch.column("lon").to_numpy(), batch.column("lat").to_numpy()
                off = ~((np.abs(lon) <= 180) & (np.abs(lat) <= 90))
                x, y = to_utm.transform(np.where(off, 0.0, lon), np.where(off, 0.0, lat))
                block = [pa.array(np.floor(np.asarray(v) / span).astype(np.int32), mask=off) for v in (x, y)]
                ids = batch.column("id").to_numpy()
                at = np.minimum(np.searchsorted(member_nodes, ids), max(len(member_nodes) - 1, 0))
                member = member_nodes[at] == ids if len(member_nodes) else np.zeros(len(ids), bool)
                writer.write_table(pa.Table.from_arrays([*batch.columns, *block, pa.array(member)], schema=schema))
        _do(self.con, f"CREATE VIEW node_blocks AS SELECT * FROM read_parquet('{path}')")
        _do(self.con, "CREATE VIEW nb AS SELECT id, block_x, block_y FROM node_blocks WHERE block_x IS NOT NULL")

    def _boxes(self) -> None:
        """``wbox`` and ``rbox(id, bx0, bx1, by0, by1)``: the blocks a way's nodes, a relation's members reach
        (a member relation's box included, one nesting level a pass), all in DuckDB."""
        con = self.con
        _do(con, """CREATE TABLE wbox AS SELECT r.way_id AS id, min(block_x) AS bx0, max(block_x) AS bx1,
                              min(block_y) AS by0, max(block_y) AS by1
                       FROM way_refs r JOIN nb ON r.node_id = nb.id GROUP BY r.way_id""")
        _do(con, """CREATE TABLE rbox AS SELECT rel_id AS id, min(bx0) AS bx0, max(bx1) AS bx1, min(by0) AS by0, max(by1) AS by1
                    FROM (SELECT m.rel_id, n.block_x AS bx0, n.block_x AS bx1, n.block_y AS by0, n.block_y AS by1
                          FROM members m JOIN nb n ON m.ref = n.id WHERE m.type = 0
                          UNION ALL SELECT m.rel_id, w.bx0, w.bx1, w.by0, w.by1
                          FROM members m JOIN wbox w ON m.ref = w.id WHERE m.type = 1)
                    GROUP BY rel_id""")
        state = "SELECT count(*), sum(bx0), sum(bx1), sum(by0), sum(by1) FROM rbox"
        before = _q(con, state).to_pylist()
        for _ in range(16):  # boxes only grow: the same count and sums mean no box changed
            _do(con, """CREATE TABLE rbox_next AS SELECT id, min(bx0) AS bx0, max(bx1) AS bx1, min(by0) AS by0, max(by1) AS by1
                        FROM (SELECT * FROM rbox UNION ALL SELECT m.rel_id AS id, r.bx0, r.bx1, r.by0, r.by1
                              FROM members m JOIN rbox r ON m.ref = r.id WHERE m.type = 2)
                        GROUP BY id""")
            _do(con, "DROP TABLE rbox")
            _do(con, "ALTER TABLE rbox_next RENAME TO rbox")
            after = _q(con, state).to_pylist()
            if after == before:
                break
            before = after
        self.blocks = sorted(self._reached_blocks())

    def _reached_blocks(self) -> set:
        """Every (bx, by) that a node lies in, or that a way's or relation's box covers."""
        reached = {(r["block_x"], r["block_y"]) for r in _q(self.con, "SELECT DISTINCT block_x, block_y FROM nb").to_pylist()}
        for table in ("wbox", "rbox"):
            for r in _q(self.con, f"SELECT DISTINCT bx0, bx1, by0, by1 FROM {table} WHERE bx0 < bx1 OR by0 < by1").to_pylist():
                bx0, bx1, by0, by1 = r["bx0"], r["bx1"], r["by0"], r["by1"]
                reached.update((bx, by) for bx in range(bx0, bx1 + 1) for by in range(by0, by1 + 1))
        return reached

    def layout(self) -> "ShareLayout":
        """What a worker process needs to read and tile one share (picklable)."""
        return ShareLayout(self.spill.root / "parts", tuple(self.blocks), self.block_tiles, self.tile_size_m, self.epsg)

    # ---- each block's share -----------------------------------------------------------------
    def _partition(self) -> None:
        """Write each share's rows (every block, then the entities in no block) to ``parts/<table>/k=<share>/``,
        so that reading a share back reads only its own rows: DuckDB joins and one partitioned write per table.

        A block's share: the ways and relations whose box covers it, the members of its relations (member
        relations' too, transitively: a relation is built from all of them), the nodes its ways refer to and
        its tagged nodes. Which relations hold an entity is not pulled in (that closure can reach a whole
        state through shared boundary ways): a ``member`` flag, computed over the whole file, says it."""
        con = self.con
        nowhere = len(self.blocks)
        con.register("_blocks", pa.table({"block_x": np.array([b[0] for b in self.blocks], np.int32),
                                          "block_y": np.array([b[1] for b in self.blocks], np.int32),
                                          "k": np.arange(len(self.blocks), dtype=np.int32)}))
        _do(con, "CREATE TABLE blocks_k AS SELECT * FROM _blocks")
        con.unregister("_blocks")
        covers = "b.block_x BETWEEN x.bx0 AND x.bx1 AND b.block_y BETWEEN x.by0 AND x.by1"
        _do(con, f"""CREATE TABLE ar AS SELECT b.k, x.id FROM rbox x JOIN blocks_k b ON {covers}
                     UNION SELECT {nowhere} AS k, r.id FROM rels r ANTI JOIN rbox x ON r.id = x.id""")
        count = lambda: _q(con, "SELECT count(*) FROM ar").column(0)[0].as_py()  # noqa: E731
        n = count()
        for _ in range(64):  # member relations, a nesting level a pass
            _do(con, """INSERT INTO ar SELECT a.k, m.ref AS id FROM ar a JOIN members m ON m.rel_id = a.id WHERE m.type = 2
                        EXCEPT SELECT k, id FROM ar""")
            n, grown = count(), n
            if n == grown:
                break
        _do(con, f"""CREATE TABLE aw AS SELECT b.k, x.id FROM wbox x JOIN blocks_k b ON {covers}
                     UNION SELECT {nowhere} AS k, w.id FROM ways w ANTI JOIN wbox x ON w.id = x.id
                     UNION SELECT a.k, m.ref AS id FROM ar a JOIN members m ON m.rel_id = a.id WHERE m.type = 1""")
        # the nodes of a share: every node in its block (the ways that lie in one block, most of them, need no
        # more), then the few more it needs ("elsewhere"): the nodes of its ways that reach other blocks, of ways
        # pulled in by its relations, of its ways with nodes off the globe, its relations' member nodes, and (in no
        # block) the tagged nodes off the globe. A join of every way ref with its ways' shares (77 M rows at 32x32)
        # and a DISTINCT over them would otherwise decide where each node goes.
        _do(con, f"""CREATE TABLE aw_other AS SELECT a.k, a.id FROM aw a
                         SEMI JOIN (SELECT id FROM wbox WHERE bx0 < bx1 OR by0 < by1) w ON a.id = w.id
                     UNION SELECT k, id FROM aw WHERE k = {nowhere}
                     UNION SELECT a.k, m.ref AS id FROM ar a JOIN members m ON m.rel_id = a.id WHERE m.type = 1""")
        _do(con, """CREATE TABLE off_globe AS SELECT id, n_raw FROM node_blocks WHERE block_x IS NULL""")
        _do(con, """CREATE TABLE elsewhere_raw AS SELECT a.k, r.node_id AS id FROM way_refs r JOIN aw_other a ON r.way_id = a.id""")
        _do(con, """INSERT INTO elsewhere_raw SELECT a.k, r.node_id AS id FROM (SELECT r.* FROM way_refs r SEMI JOIN off_globe o ON r.node_id = o.id) r
                    JOIN aw a ON a.id = r.way_id""")
        _do(con, "INSERT INTO elsewhere_raw SELECT a.k, m.ref AS id FROM ar a JOIN members m ON m.rel_id = a.id WHERE m.type = 0")
        _do(con, f"INSERT INTO elsewhere_raw SELECT {nowhere} AS k, id FROM off_globe WHERE n_raw > 0")
        _do(con, """CREATE TABLE elsewhere AS SELECT DISTINCT e.k, e.id, b.block_x, b.block_y FROM elsewhere_raw e
                    LEFT JOIN blocks_k b USING (k)""")
        _do(con, "DROP TABLE elsewhere_raw")
        _do(con, "CREATE TABLE member_of AS SELECT DISTINCT type, ref FROM members")
        flag = lambda t, id_col: f"EXISTS (SELECT 1 FROM member_of f WHERE f.type = {t} AND f.ref = {id_col}) AS member"  # noqa: E731
        node_cols = ", ".join(f"n.{f.name}" for f in _SCHEMAS["nodes"])
        root = self.spill.root / "parts"
        root.mkdir(exist_ok=True)
        for table, sql in (
            ("nodes", f"""SELECT b.k, {node_cols}, n.member FROM node_blocks n JOIN blocks_k b USING (block_x, block_y)
                          UNION ALL SELECT e.k, {node_cols}, n.member FROM elsewhere e JOIN node_blocks n USING (id)
                          WHERE NOT coalesce(n.block_x = e.block_x AND n.block_y = e.block_y, false)"""),
            # tags of the tagged nodes only: the same two parts
            ("node_tags", """SELECT b.k, t.* FROM node_tags t JOIN node_blocks n ON t.owner_id = n.id JOIN blocks_k b USING (block_x, block_y)
                             UNION ALL SELECT e.k, t.* FROM node_tags t JOIN (SELECT e.k, e.id FROM elsewhere e JOIN node_blocks n USING (id)
                                 WHERE n.n_raw > 0 AND NOT coalesce(n.block_x = e.block_x AND n.block_y = e.block_y, false)) e
                             ON t.owner_id = e.id"""),
            ("ways", f"SELECT a.k, w.*, {flag(WAY, 'w.id')} FROM ways w JOIN aw a USING (id)"),
            ("way_refs", "SELECT a.k, r.* FROM way_refs r JOIN aw a ON r.way_id = a.id"),
            ("way_tags", "SELECT a.k, t.* FROM way_tags t JOIN aw a ON t.owner_id = a.id"),
            ("rels", f"SELECT a.k, r.*, {flag(RELATION, 'r.id')} FROM rels r JOIN ar a USING (id)"),
            ("members", "SELECT a.k, m.* FROM members m JOIN ar a ON m.rel_id = a.id"),
            ("rel_tags", "SELECT a.k, t.* FROM rel_tags t JOIN ar a ON t.owner_id = a.id"),
        ):
            with self._timed(f"copy_{table}"):
                _do(con, f"COPY ({sql}) TO '{root / table}' (FORMAT parquet, PARTITION_BY (k), OVERWRITE_OR_IGNORE)")
        for name in ("elsewhere", "aw_other", "off_globe", "aw", "ar", "member_of"):
            _do(con, f"DROP TABLE {name}")

    def n_input(self) -> int:
        """The features a whole-file read accounts for: tagged nodes, untagged member nodes (in the file or not), ways, relations."""
        return int(_q(self.con, """SELECT (SELECT count(*) FROM nodes WHERE n_raw > 0)
            + (SELECT count(DISTINCT m.ref) FROM members m WHERE m.type = 0 AND m.ref NOT IN (SELECT id FROM nodes WHERE n_raw > 0))
            + (SELECT count(*) FROM ways) + (SELECT count(*) FROM rels)""").column(0)[0].as_py())


@dataclass(frozen=True)
class ShareLayout:
    """Where ``BlockPlan`` wrote each share's rows, and its grid: all that reading and tiling a share needs.

    Share ``k`` is the block ``blocks[k]``; share ``len(blocks)`` (``nowhere``) holds the entities in no block."""

    parts: Path  # parts/<table>/k=<share>/*.parquet
    blocks: tuple  # (bx, by) of each block share, in the global order
    block_tiles: int
    tile_size_m: float
    epsg: int

    @property
    def nowhere(self) -> int:
        return len(self.blocks)

    def rel_positions(self, rel_ids: np.ndarray) -> np.ndarray:
        """File position of each relation id (for the file order of the relation-members table)."""
        rows = pq.read_table(self.parts.parent / "rels.parquet", columns=["id", "pos"])
        ids, pos = rows.column("id").to_numpy(), rows.column("pos").to_numpy()
        order = np.argsort(ids)
        return pos[order][np.searchsorted(ids[order], rel_ids)]

    def label(self, k: int) -> str:
        """A share's name for logs and Dagster mapping keys: ``block_<k>`` or ``nowhere``."""
        return "nowhere" if k == self.nowhere else f"block_{k:05d}"

    def tile_range(self, block) -> tuple[int, int, int, int]:
        """(tx0, tx1, ty0, ty1): the block's tiles, half-open."""
        bx, by = block
        k = self.block_tiles
        return bx * k, (bx + 1) * k, by * k, (by + 1) * k

    def _part(self, table: str, k: int, columns: str, order: str) -> pa.Table:
        """One share's rows of ``table``, ordered (an empty table when the share has none)."""
        path = self.parts / table / f"k={k}"
        files = sorted(path.glob("*.parquet")) if path.is_dir() else []
        if not files:
            schema = _SCHEMAS[table].append(pa.field("member", pa.bool_()))
            return schema.empty_table().select([c.strip() for c in columns.split(",")])
        listed = ", ".join(f"'{f}'" for f in files)
        return _q(_reader(), f"SELECT {columns} FROM read_parquet([{listed}]) ORDER BY {order}")

    def decoded(self, k: int) -> _Decoded:
        """Share ``k``'s part of the file (``blocks[k]``, or the entities in no block), as ``osm_read`` decodes a file."""
        node_rows = self._part("nodes", k, "id, lon, lat, n_raw, member", "pos")
        way_rows = self._part("ways", k, "id, n_raw, member", "pos")
        rel_rows = self._part("rels", k, "id, n_raw, type_value, member", "pos")
        way_id, node_id, rel_id = way_rows.column("id").to_numpy(), node_rows.column("id").to_numpy(), rel_rows.column("id").to_numpy()
        refs = _order_by_owner(self._part("way_refs", k, "way_id, seq, node_id", "way_id, seq"), "way_id", way_id)
        mem = _order_by_owner(self._part("members", k, "rel_id, seq, type, ref, role", "rel_id, seq"), "rel_id", rel_id)
        return _Decoded(
            node_id=node_id, node_lon=node_rows.column("lon").to_numpy(), node_lat=node_rows.column("lat").to_numpy(),
            node_tags=self._tags(self._part("node_tags", k, "owner_id, seq, key, value", "owner_id, seq"), node_id, node_rows.column("n_raw").to_numpy()),
            way_id=way_id, way_refs=refs.column("node_id").to_numpy(), way_counts=_counts_in_order(way_id, refs.column("way_id").to_numpy()),
            way_tags=self._tags(self._part("way_tags", k, "owner_id, seq, key, value", "owner_id, seq"), way_id, way_rows.column("n_raw").to_numpy()),
            rel_id=rel_id, mem_type=mem.column("type").to_numpy().astype(np.int64), mem_ref=mem.column("ref").to_numpy(),
            mem_role=mem.column("role").to_pylist(), mem_counts=_counts_in_order(rel_id, mem.column("rel_id").to_numpy()),
            rel_type_value=rel_rows.column("type_value").to_pylist(),
            rel_tags=self._tags(self._part("rel_tags", k, "owner_id, seq, key, value", "owner_id, seq"), rel_id, rel_rows.column("n_raw").to_numpy()),
            members_elsewhere={t: unique_ints(ids[rows.column("member").to_numpy(zero_copy_only=False)])
                               for t, ids, rows in ((NODE, node_id, node_rows), (WAY, way_id, way_rows), (RELATION, rel_id, rel_rows))},
        )

    @staticmethod
    def _tags(rows: pa.Table, ids: np.ndarray, n_raw: np.ndarray) -> tuple:
        """``_Decoded``'s tag tuple for the elements ``ids`` (in their order) from their tag ``rows``: by element, then file order."""
        order_of = np.argsort(ids, kind="stable")
        owner = order_of[np.searchsorted(ids[order_of], rows.column("owner_id").to_numpy())] if rows.num_rows else np.zeros(0, np.int64)
        sort = np.lexsort((rows.column("seq").to_numpy(), owner)) if rows.num_rows else np.zeros(0, np.int64)
        rows = rows.take(pa.array(sort))
        return rows.column("key").combine_chunks(), rows.column("value").combine_chunks(), owner[sort].astype(np.int64), n_raw.astype(np.int64)



_READER = {}  # pid -> that process' DuckDB connection for reading shares


def _reader() -> duckdb.DuckDBPyConnection:
    """One small DuckDB connection per process (a worker must not use its parent's)."""
    import os

    pid = os.getpid()
    if pid not in _READER:  # a forked worker leaves its parent's connection alone: closing it there can crash
        _READER[pid] = con = duckdb.connect(config={"memory_limit": "512MB", "threads": 1})
        _do(con, "SET enable_progress_bar = false")
    return _READER[pid]


def _order_by_owner(rows: pa.Table, owner_col: str, ids: np.ndarray) -> pa.Table:
    """``rows`` (sorted by owner id, then seq) reordered so that owners follow ``ids``' order (file order)."""
    if rows.num_rows == 0:
        return rows
    owner = rows.column(owner_col).to_numpy()
    order_of = np.argsort(ids, kind="stable")
    position = order_of[np.searchsorted(ids[order_of], owner)]  # of each row's owner among ids
    return rows.take(pa.array(np.argsort(position, kind="stable")))


def _counts_in_order(ids: np.ndarray, owner_ids: np.ndarray) -> np.ndarray:
    """(len(ids),) how many of ``owner_ids`` (grouped by owner, in ``ids`` order) each id owns."""
    if len(ids) == 0:
        return np.zeros(0, np.int64)
    order = np.argsort(ids, kind="stable")
    pos = order[np.searchsorted(ids[order], owner_ids)] if len(owner_ids) else np.zeros(0, np.int64)
    return np.bincount(pos, minlength=len(ids)).astype(np.int64)


# ---- block by block, then merged --------------------------------------------------------------
_STATUS_REASON = {OUTSIDE_CLIP: "outside_clip", EMPTY: "empty_after_repair", NO_PIECE: "no_tile_piece"}
_ALWAYS_COUNTED = ("empty_after_repair", "missing_node_locations", "no_tile_piece", "only_filtered_tags_not_member",
                   "relation_without_members_in_extract", "untagged_not_member")  # the keys a whole-file run always lists
_READ_RANK = 10  # read-level reasons rank after every tiling outcome (an entity is decided the same in every share)


class BlockMergedRegion(TiledRegion):
    """The blocks' ``TiledRegion``s as one: tiles in the global order, pieces streamed block by block."""

    runs: list  # (share, first tile, end tile) in the global tile order
    shares: list  # the blocks' TiledRegion, pieces spilled

    def entity_chunks(self):
        """Run by run, only the bands a run overlaps, one band held at a time (a band is memory-mapped: holding
        every share's bands would map the whole region)."""
        held = None  # ((share, band), tiles, entities) of the band read last
        for k, t0, t1 in self.runs:
            share = self.shares[k]
            starts = share.band_starts()
            for i in range(len(share.band_files)):
                lo, hi = max(t0, int(starts[i])), min(t1, int(starts[i + 1]))
                if lo >= hi:
                    continue
                if held is None or held[0] != (k, i):
                    held = None  # unmap the last band before mapping the next
                    held = ((k, i), *share.band_chunk(i))
                _, tiles, ents = held
                counts = np.asarray(tiles.column("n_entities"), np.int64)
                piece_start = np.concatenate([[0], np.cumsum(counts)])
                a, b = lo - int(starts[i]), hi - int(starts[i])
                yield tiles.slice(a, b - a), ents.slice(int(piece_start[a]), int(piece_start[b] - piece_start[a]))


def _global_runs(shares: list[TiledRegion]) -> list[tuple[int, int, int]]:
    """(share, first tile, end tile) runs of one sort-block column each, in the global tile order
    (sort-block column west to east, then south to north): a block's tiles are in that order already."""
    runs = []
    for k, tiled in enumerate(shares):
        tx = tiled.tiles.column("tile_x").to_numpy().astype(np.int64)
        ty = tiled.tiles.column("tile_y").to_numpy().astype(np.int64)
        col = tx // BLOCK_TILES
        cuts = np.flatnonzero(np.concatenate([[True], col[1:] != col[:-1], [True]]))
        for a, b in zip(cuts[:-1], cuts[1:]):
            runs.append((int(col[a]), int(ty[a] // BLOCK_TILES), k, int(a), int(b)))
    runs.sort()
    return [(k, a, b) for _, _, k, a, b in runs]


_OUTCOME_FILES = {  # what a share said of its entities (``tile_share``), merged by id in DuckDB (``merge_shares``)
    # rank: the tiling status (tiling.KEPT ...), or _READ_RANK with the read-level reason; the lowest wins
    "outcomes": pa.schema([("type", pa.int8()), ("id", pa.int64()), ("rank", pa.int16()), ("reason", pa.string())]),
    "repaired": pa.schema([("type", pa.int8()), ("id", pa.int64()), ("reason", pa.string())]),
    "area": pa.schema([("type", pa.int8()), ("id", pa.int64()), ("error", pa.float64())]),
}


def _id_columns(ids: np.ndarray) -> dict:
    return {"type": ids[:, 0].astype(np.int8), "id": ids[:, 1].astype(np.int64)}


def _write_outcomes(where: Path, outcomes: list, repaired: list, area_ids, area_error) -> None:
    """A share's outcome files (``_OUTCOME_FILES``) under ``where``: ``outcomes`` [(ids (K, 2), rank, reason or None)],
    ``repaired`` [(reason, ids (K, 2))], the polygons' area errors."""
    def table(name: str, parts: list[dict]) -> pa.Table:
        schema = _OUTCOME_FILES[name]
        return pa.concat_tables([pa.table(c, schema=schema) for c in parts]) if parts else schema.empty_table()

    rows = [{**_id_columns(ids), "rank": np.full(len(ids), rank, np.int16), "reason": pa.array([reason] * len(ids), pa.string())}
            for ids, rank, reason in outcomes if len(ids) and np.ndim(rank) == 0]
    rows += [{**_id_columns(ids), "rank": np.asarray(rank, np.int16), "reason": pa.nulls(len(ids), pa.string())}
             for ids, rank, _ in outcomes if len(ids) and np.ndim(rank) == 1]
    pq.write_table(table("outcomes", rows), where / "outcomes.parquet")
    pq.write_table(table("repaired", [{**_id_columns(ids), "reason": pa.array([r] * len(ids), pa.string())}
                                      for r, ids in repaired if len(ids)]), where / "repaired.parquet")
    area = [] if area_ids is None or not len(area_ids) else [{**_id_columns(area_ids), "error": np.asarray(area_error, np.float64)}]
    pq.write_table(table("area", area), where / "area.parquet")


def _block_touches(layout: ShareLayout, block, area_utm) -> bool:
    import shapely

    tx0, tx1, ty0, ty1 = layout.tile_range(block)
    s = layout.tile_size_m
    return bool(shapely.intersects(area_utm, shapely.box(tx0 * s, ty0 * s, tx1 * s, ty1 * s)))


@dataclass
class ShareResult:
    """What tiling one share gave (``tile_share``): picklable and small. What it made of each entity (the
    ``_OUTCOME_FILES`` and the relation members) is on disk under ``where``, merged by id in ``merge_shares``."""

    k: int
    where: Path  # the share's directory: outcome files, members.parquet, spilled bands
    n_entities: int  # entities the share decided (kept ones, pulled-in ones, dropped ones)
    has_members: bool
    tiled: TiledRegion | None = None  # its tiles and spilled bands, when it has tiles
    seconds: float = 0.0


def tile_share(layout: ShareLayout, k: int, region: str, scratch: Path, clip=None, workers: int | None = 1) -> ShareResult:
    """Read share ``k`` back, apply the keep/drop rules and tile it (pieces spilled under ``scratch``): the unit of
    work of block ingestion, run in a worker process or in this one."""

    from .osm_read import osm_data_from_decoded
    from .tiling import tile_osm

    t = time.perf_counter()
    scratch = Path(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    data = osm_data_from_decoded(layout.decoded(k), record_ids=True)
    outcomes = [(np.concatenate(p), _READ_RANK, r) for r, p in (data.dropped.ids or {}).items()]
    repaired = [(r, np.concatenate(p)) for r, p in (data.repaired.ids or {}).items()]
    ids = np.stack([data.osm_type.astype(np.int64), data.osm_id], axis=1)
    has_members = bool(len(data.rel_id))
    if has_members:
        pq.write_table(data.relation_members(), scratch / "members.parquet")
    tiled = area_ids = area_error = None
    if k == layout.nowhere or len(data) == 0:
        outcomes.append((ids, np.full(len(ids), ELSEWHERE, np.int16), None))  # pulled in to decide membership; tiled in their blocks
    else:
        tiled = tile_osm(data, region, layout.tile_size_m, workers=workers, spill_dir=scratch, clip=clip,
                         epsg=layout.epsg, block=layout.tile_range(layout.blocks[k]))
        del data
        o, tiled.outcomes = tiled.outcomes, None
        outcomes.append((o["ids"], np.asarray(o["status"], np.int16), None))
        repaired += list(o["repaired"].items())
        area_ids, area_error = o["area_ids"], o["area_rel_error"]
        tiled = tiled if tiled.tiles.num_rows else None
    _write_outcomes(scratch, outcomes, repaired, area_ids, area_error)
    return ShareResult(k, scratch, sum(len(i) for i, _, _ in outcomes), has_members, tiled, time.perf_counter() - t)


def _tile_share_args(args: tuple) -> ShareResult:
    return tile_share(*args)


def share_dir(scratch: Path, k: int) -> Path:
    """Where share ``k``'s pieces are spilled under a build's scratch directory."""
    return Path(scratch) / f"block-{k:05d}"


def shares_tiled(layout: ShareLayout, todo, region: str, scratch: Path, clip, workers: int):
    """``tile_share`` of each share in ``todo``, in order: in this process (``workers`` 1: one tiling process),
    else each share in a fresh forked process, ``workers`` at a time. Forked, not spawned: a spawned worker
    re-imports the caller's main script, which need not guard itself. Fresh for each share: a long-lived
    worker's heap only grows (at 16x16, from about 310 to 660 MB PSS over 42 blocks each; a process per block
    keeps it at one block's). The plan's DuckDB connection is closed by then (no DuckDB thread to inherit);
    each worker opens its own reader."""
    jobs = [(layout, k, region, share_dir(scratch, k), clip, 1) for k in todo]
    if workers <= 1 or len(jobs) <= 1:
        for layout_, k, region_, where, clip_, _ in jobs:
            yield tile_share(layout_, k, region_, where, clip_, workers)
        return
    from . import minbox, wkb
    from .parallel import fork_each

    minbox.warm_up()  # loaded here once, inherited by every fork: 0.3 s a block otherwise (20 % of a block's time at 8x8)
    wkb.warm_up()
    yield from fork_each(_tile_share_args, jobs, workers, name=lambda job: f"{layout.label(job[1])} {layout.blocks[job[1]] if job[1] < layout.nowhere else ''}".strip())


@dataclass(frozen=True)
class PlannedBlocks:
    """What ``plan_blocks`` leaves for the blocks' work and their merge (picklable: a Dagster op's output)."""

    layout: ShareLayout
    n_input: int  # the features a whole-file read accounts for
    todo: tuple  # the shares to tile, in order: the blocks (those the clip touches), then ``layout.nowhere``
    n_blocks: int  # blocks some entity reaches (``len(layout.blocks)``; more than ``len(todo) - 1`` under a clip)
    seconds: float  # spill and plan, wall
    timings_s: dict = field(default_factory=dict)  # wall seconds: spill, then each planning step (copy_* are within partition)


def plan_blocks(path, scratch: Path, block_tiles: int, tile_size_m: float = TILE_SIZE_M, clip=None,
                memory_limit: str = "512MB") -> PlannedBlocks:
    """Spill ``path`` under ``scratch`` and write every block's share (module docstring, steps 1-2)."""

    t0 = time.perf_counter()
    spill = spill_pbf(path, Path(scratch) / "spill")
    t_spill = time.perf_counter() - t0
    plan = BlockPlan(spill, block_tiles, tile_size_m, epsg=clip.epsg if clip is not None else None, memory_limit=memory_limit)
    with plan._timed("n_input"):
        n_input = plan.n_input()
    plan.con.close()  # its buffers (up to memory_limit) go before the blocks are tiled
    layout = plan.layout()
    area_utm = clip.projected(plan.epsg) if clip is not None else None
    todo = [k for k, b in enumerate(plan.blocks) if area_utm is None or _block_touches(layout, b, area_utm)] + [layout.nowhere]
    return PlannedBlocks(layout, n_input, tuple(todo), len(plan.blocks), time.perf_counter() - t0,
                         {"spill": t_spill, **plan.timings_s})


def ingest_blocks(path, region: str, scratch: Path, block_tiles: int, tile_size_m: float = TILE_SIZE_M, clip=None,
                  workers: int | None = None, log=None, memory_limit: str = "512MB") -> tuple[TiledRegion, pa.Table]:
    """Tile ``path`` block by block (module docstring): the merged ``TiledRegion`` (pieces spilled under
    ``scratch``) and the relation-members table, as ``tile_osm`` and ``OsmData.relation_members`` give them
    for the whole file. ``workers``: blocks tiled at once, each in its own process (default: one per core, at most 2)."""

    from .parallel import default_workers

    t0 = time.perf_counter()
    planned = plan_blocks(path, scratch, block_tiles, tile_size_m, clip=clip, memory_limit=memory_limit)
    workers = workers or default_workers()
    log_plan(planned, region, log, f"{workers} at a time")
    results = shares_tiled(planned.layout, planned.todo, region, Path(scratch), clip, workers)
    return merge_shares(planned, results, clip=clip, log=log, started=t0)


def log_plan(planned: PlannedBlocks, region: str, log, how: str) -> None:
    layout = planned.layout
    if log:
        log(f"blocks of {region}: {len(planned.todo) - 1} of {planned.n_blocks} blocks of {layout.block_tiles}x{layout.block_tiles} "
            f"tiles ({layout.block_tiles * layout.tile_size_m / 1000:.1f} km), EPSG:{layout.epsg}; plan {planned.seconds:.1f} s "
            f"({', '.join(f'{k} {v:.1f}' for k, v in planned.timings_s.items() if not k.startswith('copy_'))}); {how}")


def merge_shares(planned: PlannedBlocks, results, clip=None, log=None, started: float | None = None,
                 memory_limit: str = "512MB") -> tuple[TiledRegion, pa.Table]:
    """The ``ShareResult`` of every share of ``planned.todo`` (any order) merged by id into one ``TiledRegion``
    and relation-members table: what a whole-file run gives. The shares' outcome files are merged in DuckDB
    (within ``memory_limit``, spilling past it), so this process holds only the tiles, whatever the extract.
    ``started``: ``time.perf_counter()`` at the start, for the total (default: the plan's and the shares' seconds added up)."""

    layout, n_input = planned.layout, planned.n_input
    by_k, timings = {}, {"spill_and_plan": planned.seconds, **{f"plan_{k}": v for k, v in planned.timings_s.items()}}
    n_tiled = 0
    for res in results:
        by_k[res.k] = res
        tiled = res.tiled
        if tiled is not None:
            for key, v in tiled.timings_s.items():
                timings[key] = timings.get(key, 0.0) + v
        if log and res.k != layout.nowhere:
            n_tiled += 1
            log(f"block {n_tiled}/{len(planned.todo) - 1} {layout.blocks[res.k]}: {tiled.tiles.num_rows if tiled else 0:,} tiles, "
                f"{tiled.n_pieces if tiled else 0:,} pieces ({res.seconds:.1f} s)")
    if sorted(by_k) != sorted(planned.todo):
        missed = sorted(set(planned.todo) - set(by_k))
        raise ValueError(f"merge_shares: {len(missed)} of {len(planned.todo)} shares have no result (first: {missed[:5]})")
    ordered = [by_k[k] for k in planned.todo]  # the merge does not depend on the order results came in
    shares = [r.tiled for r in ordered if r.tiled is not None]

    scratch = layout.parts.parent / "merge"
    scratch.mkdir(exist_ok=True)
    con = duckdb.connect(config={"memory_limit": memory_limit, "temp_directory": str(scratch), "preserve_insertion_order": False})
    try:
        _do(con, "SET enable_progress_bar = false")
        files = lambda name: "[" + ", ".join(f"'{r.where / (name + '.parquet')}'" for r in ordered) + "]"  # noqa: E731

        # ---- accounting, by id: each entity's lowest rank over the shares that saw it -----------
        dropped = Counter({k: 0 for k in _ALWAYS_COUNTED})
        if clip is not None:
            dropped["outside_clip"] += 0
        n_seen = n_kept = 0
        for r in _q(con, f"""SELECT rank, reason, count(*) AS n FROM (
                               SELECT min(rank) AS rank, arg_min(reason, rank) AS reason FROM read_parquet({files('outcomes')})
                               GROUP BY type, id) GROUP BY ALL ORDER BY rank, reason""").to_pylist():
            rank, n = int(r["rank"]), int(r["n"])
            n_seen += n
            if rank == KEPT:
                n_kept += n
            elif rank == ELSEWHERE:  # every piece in a block that was not tiled: outside the clip
                dropped["outside_clip" if clip is not None else "no_tile_piece"] += n
            elif rank >= _READ_RANK:
                dropped[r["reason"]] += n
            else:
                dropped[_STATUS_REASON[rank]] += n
        unseen = n_input - n_seen  # entities that reach only blocks the clip left out
        if unseen and clip is None:
            raise AssertionError(f"block accounting broken: {n_input} input features, {n_seen} seen in the blocks")
        if unseen:
            dropped["outside_clip"] += unseen
        repaired = Counter({r["reason"]: int(r["n"]) for r in _q(con, f"""SELECT reason, count(*) AS n FROM (
            SELECT DISTINCT reason, type, id FROM read_parquet({files('repaired')})) GROUP BY reason ORDER BY reason""").to_pylist()})
        from .tiling import AREA_REL_TOL

        # a polygon checked in several blocks: the same sum each time; keep the largest error
        n_area, worst, over = _q(con, f"""SELECT count(*), coalesce(max(e), 0.0), count(*) FILTER (WHERE e > {AREA_REL_TOL!r})
            FROM (SELECT max(error) AS e FROM read_parquet({files('area')}) GROUP BY type, id)""").to_pylist()[0].values()
        area_check = {"n_polygons_checked": int(n_area), "max_rel_error": float(worst), "n_over_tolerance": int(over),
                      "tolerance": AREA_REL_TOL}
        members = _merged_members(con, layout, [r for r in ordered if r.has_members])
    finally:
        con.close()
        shutil.rmtree(scratch, ignore_errors=True)

    # ---- tiles in the global order --------------------------------------------------------------
    runs = _global_runs(shares)
    total = time.perf_counter() - started if started is not None else planned.seconds + sum(r.seconds for r in ordered)
    tiles = pa.concat_tables([shares[k].tiles.slice(a, b - a) for k, a, b in runs]) if runs else TILES_SCHEMA.empty_table()
    merged = BlockMergedRegion(
        epsg=layout.epsg, tiles=tiles, entities=None, n_input=n_input, n_entities_kept=n_kept,
        dropped=dropped, repaired=repaired, area_check=area_check, timings_s={**timings, "total": total},
        n_bands=sum(s.n_bands for s in shares), n_pieces=int(np.asarray(tiles.column("n_entities"), np.int64).sum()),
    )
    merged.runs, merged.shares = runs, shares
    return merged, members


def _merged_members(con, layout: ShareLayout, with_members: list[ShareResult]) -> pa.Table:
    """Each relation's rows from the first share (in ``with_members``' order) that has it, relations in file order."""
    from .osm_read import RELATION_MEMBERS_SCHEMA

    if not with_members:
        return RELATION_MEMBERS_SCHEMA.empty_table()
    con.register("_share_order", pa.table({"filename": [str(r.where / "members.parquet") for r in with_members],
                                           "share_order": np.arange(len(with_members), dtype=np.int32)}))
    listed = ", ".join(f"'{r.where / 'members.parquet'}'" for r in with_members)
    cols = ", ".join(f"m.{f.name}" for f in RELATION_MEMBERS_SCHEMA)
    table = _q(con, f"""WITH m AS (SELECT * FROM read_parquet([{listed}], filename = true, file_row_number = true) JOIN _share_order USING (filename)),
                            first AS (SELECT relation_id, min(share_order) AS share_order FROM m GROUP BY relation_id)
                        SELECT {cols} FROM m JOIN first USING (relation_id, share_order)
                        JOIN read_parquet('{layout.parts.parent / 'rels.parquet'}') p ON p.id = m.relation_id
                        ORDER BY p.pos, m.file_row_number""")
    con.unregister("_share_order")
    return table.cast(RELATION_MEMBERS_SCHEMA)
