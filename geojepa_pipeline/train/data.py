"""Tile sequences from the token shards, streamed shard by shard and batched in length buckets.

A *tile sequence* is the tile's entity tokens (tag, geometry, position) in shard order,
truncated to ``max_tokens`` (the first ones: shards keep a tile's pieces together). Batches
are padded to the smallest bucket length that fits (16, 32, 64, …, ``max_tokens``), so a
handful of shapes repeat (good for CUDA graphs and compiled kernels) and little is padding.

The split is ``geo.splits``: the one spatial split (4 x 4-tile blocks) that evaluation uses too.
Training reads its ``train`` tiles; the epoch-end probe reads ``train`` and ``val``; nothing
here reads ``test`` unless asked to.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq
import torch

from ..columns import fixed_list_to_numpy, matrix_to_numpy
from ..geo.splits import DEFAULT_SPLIT_SEED, SPLIT_NAMES, block_split, tile_blocks


@functools.lru_cache(maxsize=64)
def _region_blocks(region: str, tiles_files: tuple[str, ...], split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(sorted block keys (N,) int64, their split (N,) int8) over every tile shard of one region.

    The region's blocks are split together (``geo.splits.block_split``), exactly as evaluation splits
    the region's tiles; cached per process (shards are immutable; every epoch asks again)."""
    xy = [_tile_xy(f) for f in tiles_files]
    blocks = np.unique(np.concatenate([tile_blocks(x, y) for x, y, _ in xy]), axis=0)
    split = block_split(xy[0][2], blocks, split_seed)
    keys = _block_key(blocks[:, 0], blocks[:, 1])
    order = np.argsort(keys)
    return keys[order], split[order]


def _tile_xy(tiles_file: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(tile_x (T,), tile_y (T,), EPSG of the grid) of one tile shard."""
    t = pq.read_table(tiles_file, columns=["tile_x", "tile_y", "epsg"])
    return t.column("tile_x").to_numpy(), t.column("tile_y").to_numpy(), int(t.column("epsg")[0].as_py()) if t.num_rows else 0


def bucket_lengths(max_tokens: int) -> list[int]:
    out, n = [], 16
    while n < max_tokens:
        out.append(n)
        n *= 2
    return out + [max_tokens]


@dataclass
class ShardSource:
    """One region's token shard and its tile shard (paths), plus the building count per tile (probe label)."""

    region: str
    tokens_file: Path
    tiles_file: Path
    entities_file: Path
    images_file: Path | None = None  # the aligned tile_images shard (image variants)

    def to_json(self) -> dict:
        """A JSON-able dict (paths as strings; the training spec of ``train.run``)."""
        return {"region": self.region, "tokens_file": str(self.tokens_file), "tiles_file": str(self.tiles_file),
                "entities_file": str(self.entities_file), "images_file": str(self.images_file) if self.images_file else None}

    @classmethod
    def from_json(cls, d: dict) -> "ShardSource":
        return cls(d["region"], Path(d["tokens_file"]), Path(d["tiles_file"]), Path(d["entities_file"]),
                   Path(d["images_file"]) if d.get("images_file") else None)


IMAGE_CHUNK = 256  # tiles per image row group (see imagery.IMAGE_ROW_GROUP)


class TileSequences:
    """Iterates (tile_id, tag (n, Dt) f32, geometry (n, Dg) f32, position (n, 8) f32, buildings int, image) of one split.

    ``image`` is the (224, 224, 4) uint8 chip, or None (no image, or ``with_images`` off).
    Reads one shard at a time (decoded shards stay cached across epochs up to ``TOKEN_CACHE_BYTES``); ``rank``/``world`` take every world-th tile for DDP;
    ``shuffle`` (a seed) permutes the shards and the tiles within each shard. With images,
    tiles are shuffled within chunks of 256 (one Parquet row group of chips, read once) and
    the chunks are shuffled, so memory stays at one row group.
    ``sample``: only that many of the split's tiles, evenly spaced through them in shard order
    (every region, spread over its area), chosen before anything else is read (chips included).
    """

    def __init__(self, sources: list[ShardSource], split: str = "train", max_tokens: int = 128, rank: int = 0,
                 world: int = 1, split_seed: int = DEFAULT_SPLIT_SEED, shuffle: int | None = None,
                 with_images: bool = False, sample: int | None = None):
        if split not in SPLIT_NAMES:
            raise ValueError(f"unknown split {split!r}: use one of {SPLIT_NAMES}")
        self.sources, self.rank, self.world = sources, rank, world
        self.split, self.max_tokens, self.with_images = split, max_tokens, with_images
        self.split_seed = split_seed
        self.rng = np.random.default_rng(shuffle) if shuffle is not None else None  # e.g. seed * 1000 + epoch
        self.sample = sample
        files: dict[str, list[str]] = {}
        for s in sources:
            files.setdefault(s.region, []).append(str(s.tiles_file))
        self.region_files = {r: tuple(sorted(f)) for r, f in files.items()}

    def _keep(self, region: str, tile_x: np.ndarray, tile_y: np.ndarray) -> np.ndarray:
        """(T,) bool: which of a shard's tiles (grid x, y) are in this split (``geo.splits``, over the whole region)."""
        keys, split = _region_blocks(region, self.region_files[region], self.split_seed)
        blocks = tile_blocks(tile_x, tile_y)
        return split[np.searchsorted(keys, _block_key(blocks[:, 0], blocks[:, 1]))] == SPLIT_NAMES.index(self.split)

    def _kept_per_source(self) -> list[np.ndarray]:
        """Per source, (T,) bool: its tiles in this split (reads the tile coordinates only)."""
        out = []
        for src in self.sources:
            t = pq.read_table(src.tiles_file, columns=["tile_x", "tile_y"])
            out.append(self._keep(src.region, t.column("tile_x").to_numpy(), t.column("tile_y").to_numpy()))
        return out

    def _sampled(self, kept: list[np.ndarray]) -> list[np.ndarray]:
        """``kept`` narrowed to ``sample`` tiles in all, evenly spaced in source order (unchanged without ``sample``)."""
        total = sum(int(k.sum()) for k in kept)
        if self.sample is None or total <= self.sample:
            return kept
        out, offset = [], 0
        for k in kept:
            rows = np.flatnonzero(k)
            index = offset + np.arange(len(rows))
            sel = np.zeros_like(k)
            sel[rows[(index * self.sample) % total < self.sample]] = True  # tile i opens one of ``sample`` equal runs
            out.append(sel)
            offset += len(rows)
        return out

    def count(self) -> int:
        """How many tiles this rank's iteration yields, the same for every shuffle: every world-th kept tile of each
        shard. Reads the tile coordinates only."""
        return sum(len(range(self.rank, int(k.sum()), self.world)) for k in self._sampled(self._kept_per_source()))

    def __iter__(self) -> Iterator[tuple]:
        keeps = self._sampled(self._kept_per_source()) if self.sample is not None else None
        order = self.rng.permutation(len(self.sources)) if self.rng is not None else range(len(self.sources))
        for i in order:
            src = self.sources[i]
            if keeps is not None and not self.with_images:
                # a sample (the epoch-end probe: 2,000 tiles of a region's millions) decodes only its own tiles,
                # not every shard whole: at 16x16 that held 9 GB
                rows = np.flatnonzero(keeps[i])
                if not len(rows):
                    continue
                shard, keep = read_shard_rows(src, rows), np.ones(len(rows), bool)
            else:
                shard = read_shard(src)
                keep = keeps[i] if keeps is not None else self._keep(src.region, shard.tile_x, shard.tile_y)
            if not keep.any():
                continue
            ids, tag, geom, pos, buildings = shard.tile_ids, shard.tag, shard.geometry, shard.position, shard.buildings
            counts, starts = shard.counts, shard.starts
            if not self.with_images:
                rows = np.flatnonzero(keep)
                rows = self.rng.permutation(rows) if self.rng is not None else rows
                for t in rows[self.rank::self.world]:
                    a = starts[t]
                    b = a + min(counts[t], self.max_tokens)
                    yield ids[t], tag[a:b], geom[a:b], pos[a:b], int(buildings[t]), None
                continue
            if src.images_file is None:
                from ..errors import GeojepaError

                raise GeojepaError(f"region {src.region!r} has no tile_images aligned with its tokens; materialize tile_images[{src.region}]")
            images = pq.ParquetFile(src.images_file)
            group_start = np.concatenate([[0], np.cumsum([images.metadata.row_group(g).num_rows for g in range(images.num_row_groups)])])
            groups = np.arange(images.num_row_groups)
            groups = self.rng.permutation(groups) if self.rng is not None else groups
            n_seen = 0
            for g in groups:
                rows = np.arange(group_start[g], group_start[g + 1])
                rows = rows[keep[rows]]
                if not len(rows):
                    continue
                rows = self.rng.permutation(rows) if self.rng is not None else rows
                mine = rows[(np.arange(len(rows)) + n_seen) % self.world == self.rank]
                n_seen += len(rows)
                if not len(mine):
                    continue
                chunk = images.read_row_group(int(g), columns=["has_image", "image"])
                has, blobs = chunk.column("has_image").to_pylist(), chunk.column("image")
                for t in mine:
                    a = starts[t]
                    b = a + min(counts[t], self.max_tokens)
                    j = int(t - group_start[g])
                    img = np.frombuffer(blobs[j].as_py(), np.uint8).reshape(224, 224, 4) if has[j] else None
                    yield ids[t], tag[a:b], geom[a:b], pos[a:b], int(buildings[t]), img


def _block_key(bx, by):
    """One int64 per (block_x, block_y): blocks are compared as numbers, not tuples."""
    return np.asarray(bx, np.int64) * (1 << 32) + np.asarray(by, np.int64)


@dataclass(frozen=True)
class Shard:
    """A token shard decoded for training: per tile (T,) ids, grid x/y, token counts and first rows, building
    counts; per token row (N, ·) float32 tag, geometry and position tokens (a tile's rows are contiguous)."""

    tile_ids: list
    tile_x: np.ndarray
    tile_y: np.ndarray
    counts: np.ndarray
    starts: np.ndarray
    buildings: np.ndarray
    tag: np.ndarray
    geometry: np.ndarray
    position: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.tag.nbytes + self.geometry.nbytes + self.position.nbytes + 64 * len(self.tile_ids)


TOKEN_CACHE_BYTES = 1 << 30  # decoded shards kept across epochs; beyond this, shards are read again each epoch


class _ShardCache:
    """The most recently read decoded shards, up to ``TOKEN_CACHE_BYTES`` (thread-safe; shards are immutable, keyed
    by path, size and mtime). Decoding the tag tokens costs ~3.6 µs per row; a cached epoch only collates."""

    def __init__(self):
        import collections
        import threading

        self.items: collections.OrderedDict = collections.OrderedDict()
        self.lock = threading.Lock()

    def get(self, key, load):
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        value = load()
        with self.lock:
            if value.nbytes <= TOKEN_CACHE_BYTES:
                self.items[key] = value
                while sum(v.nbytes for v in self.items.values()) > TOKEN_CACHE_BYTES:
                    self.items.popitem(last=False)
        return value


_SHARDS = _ShardCache()


def read_shard(src: ShardSource) -> Shard:
    """``src``'s tiles and tokens, decoded (from the cache when this process read them recently)."""
    stat = Path(src.tokens_file).stat()

    def load() -> Shard:
        shard = read_shard_rows(src)
        for a in (shard.tile_x, shard.tile_y, shard.counts, shard.starts, shard.buildings, shard.tag, shard.geometry, shard.position):
            a.setflags(write=False)  # shared by every later epoch: nobody may write into them
        return shard

    return _SHARDS.get((str(src.tokens_file), stat.st_size, stat.st_mtime_ns, str(src.tiles_file)), load)


def read_shard_rows(src: ShardSource, rows: np.ndarray | None = None) -> Shard:
    """The tiles ``rows`` (sorted, of the shard's tiles; default all) of ``src``, decoded; not cached. For a few
    tiles of many shards: the tokens of the other tiles are read but never decoded into arrays."""
    import pyarrow as pa

    from ..geo.grid import ranges

    tiles = pq.read_table(src.tiles_file, columns=["tile_id", "tile_x", "tile_y", "n_entities"])
    toks = pq.read_table(src.tokens_file, columns=["tag_token", "geometry_token", "position"], use_threads=False)
    counts = tiles.column("n_entities").to_numpy().astype(np.int64)
    tile_x, tile_y = tiles.column("tile_x").to_numpy(), tiles.column("tile_y").to_numpy()
    ids = tiles.column("tile_id")
    if rows is not None:
        rows = np.asarray(rows, np.int64)
        toks = toks.take(pa.array(ranges(np.concatenate([[0], np.cumsum(counts)]), rows)))
        ids, counts, tile_x, tile_y = ids.take(pa.array(rows)), counts[rows], tile_x[rows], tile_y[rows]
    ids = ids.to_pylist()
    return Shard(ids, tile_x, tile_y, counts, np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64),
                 _building_counts(src.entities_file, ids), matrix_to_numpy(toks.column("tag_token"), np.float32),
                 matrix_to_numpy(toks.column("geometry_token"), np.float32), fixed_list_to_numpy(toks.column("position")))


def _building_counts(entities_file: Path, tile_ids: list[str]) -> np.ndarray:
    """(T,) pieces per tile with a tag key containing "building" (the method's building_count), in ``tile_ids`` order."""
    by_id = _building_counts_by_tile(str(entities_file))
    return np.array([by_id.get(t, 0) for t in tile_ids], np.int64)


@functools.lru_cache(maxsize=16)
def _building_counts_by_tile(entities_file: str) -> dict[str, int]:
    """Computed once per shard file and process (shards are immutable); the last 16 shards' are kept (a dict of
    every tile of 256 shards held over a GB at 16x16; a cached decoded shard keeps its counts anyway)."""
    import duckdb

    con = duckdb.connect()
    try:
        rows = con.execute(
            "SELECT tile_id, count(*) FILTER (WHERE len(list_filter(map_keys(tags), lambda k: k LIKE '%building%')) > 0) "
            "FROM read_parquet(?) GROUP BY tile_id", [entities_file]
        ).fetchall()
    finally:
        con.close()
    return dict(rows)


def collate(items: list[tuple], length: int, rows: int | None = None) -> dict:
    """Pad a list of tile sequences to ``length``: tag (B, L, Dt), geometry (B, L, Dg), position (B, L, 8), valid (B, L);
    with chips, also images (B, 224, 224, 4) uint8 and has_image (B,) (zeros / False where a tile has none).

    ``rows`` (default ``len(items)``): B; rows past the items are empty tiles (no valid token). ``n_tiles``,
    ``buildings`` (n,) and ``tile_id`` cover the real tiles only."""
    b = len(items) if rows is None else rows
    dt, dg = items[0][1].shape[1], items[0][2].shape[1]
    tag = np.zeros((b, length, dt), np.float32)
    geom = np.zeros((b, length, dg), np.float32)
    pos = np.zeros((b, length, 8), np.float32)
    valid = np.zeros((b, length), bool)
    for i, item in enumerate(items):
        t, g, p = item[1], item[2], item[3]
        n = len(t)
        tag[i, :n], geom[i, :n], pos[i, :n], valid[i, :n] = t, g, p, True
    out = {
        "tag": torch.from_numpy(tag), "geometry": torch.from_numpy(geom), "position": torch.from_numpy(pos),
        "valid": torch.from_numpy(valid), "buildings": torch.tensor([it[4] for it in items], dtype=torch.float32),
        "tile_id": [it[0] for it in items], "n_tiles": len(items),
    }
    if any(len(it) > 5 and it[5] is not None for it in items):
        images = np.zeros((b, 224, 224, 4), np.uint8)
        has = np.zeros(b, bool)
        for i, item in enumerate(items):
            if item[5] is not None:
                images[i], has[i] = item[5], True
        out["images"], out["has_image"] = torch.from_numpy(images), torch.from_numpy(has)
    return out



def bucketed_batches(sequences, batch_size: int, max_tokens: int, pad: bool = False) -> Iterator[dict]:
    """Batches of ``batch_size`` tiles of similar length, padded to their bucket.

    At the end, each bucket's leftovers join the next longer bucket's, so at most one batch is partial.
    ``pad``: that batch gets empty tiles (no valid token) up to ``batch_size``, so every batch of a bucket
    has one shape. ``n_tiles`` in every batch counts its real tiles (they come first).
    """
    lengths = bucket_lengths(max_tokens)
    buckets: dict[int, list] = {n: [] for n in lengths}
    for item in sequences:
        n = next(L for L in lengths if len(item[1]) <= L)
        buckets[n].append(item)
        if len(buckets[n]) == batch_size:
            yield collate(buckets[n], n)
            buckets[n] = []
    carry: list = []  # leftovers move up to the next bucket (padded to its length), so few batches are partial
    for n in lengths:
        items = carry + buckets[n]
        while len(items) >= batch_size:
            yield collate(items[:batch_size], n)
            items = items[batch_size:]
        carry = items
    if carry:
        n = next(L for L in lengths if max(len(it[1]) for it in carry) <= L)
        yield collate(carry, n, batch_size if pad else None)


def prefetch(batches: Iterator[dict], depth: int = 4) -> Iterator[dict]:
    """Produce ``batches`` in a background thread, up to ``depth`` ahead.

    Parquet decoding and collation release the GIL for most of their work, as do torch's
    kernels, so reading the next batches overlaps the current step.
    """
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def put(item) -> bool:
        """Hand ``item`` over; False when the consumer stopped (never block on a full queue nobody reads)."""
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def worker():
        try:
            for b in batches:
                if not put(b):
                    return
            put(done)
        except BaseException as exc:  # hand the error to the consumer
            put(exc)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:  # the consumer stopped early (or finished): let the thread end before we return
        stop.set()
        thread.join(timeout=30)
