"""The one spatial split of tiles into train, validation and test, shared by training and evaluation.

Tiles are grouped in blocks of ``SPLIT_BLOCK_TILES`` x ``SPLIT_BLOCK_TILES`` tiles (1.2 km at
300 m) per region, and a whole block goes to one split, so neighbouring tiles rarely straddle
two splits. Blocks are stratified in super-cells of 4 x 5 blocks (4.8 x 6 km): a seeded
permutation gives 14 of a cell's 20 blocks to train, 3 to validation and 3 to test. So every
part of a region contributes to every split in the set shares (70 / 15 / 15), which a plain
per-block hash does not do for small regions: on Liechtenstein it put 9 % to 16 % of the tiles,
and 10 to 75 of the 332 max_speed tiles, in test depending on the seed. The split seed is its own
setting (``TrainConfig.split_seed``), independent of the training seed: changing how a model is
trained never moves a tile between splits, and evaluation reads the seed from the checkpoint.

Pretraining reads train tiles only; the epoch-end probe and the best-checkpoint choice read
validation tiles only (it is fitted on train tiles); test tiles are first seen by the final report.

A block's split depends only on where it is (its UTM grid and coordinates) and the split seed,
not on the region's name, so two regions that cover the same place (Liechtenstein in 2013 and in
2015) put each block in the same split, and re-ingesting a region that grew keeps every old
block where it was. The one exception: a region with at least three blocks always gets a block
in every split, so when the permutation leaves a split empty, the largest split gives up its
first block.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

SPLIT_BLOCK_TILES = 4  # tiles per block side: 1.2 km at 300 m
CELL_BLOCKS = (4, 5)  # blocks per super-cell (x, y): 20 blocks, 4.8 km x 6 km
CELL_SLOTS = (14, 3, 3)  # of a super-cell's 20 blocks: train, validation, test (70 / 15 / 15)
TRAIN, VAL, TEST = 0, 1, 2
SPLIT_NAMES = ("train", "val", "test")
DEFAULT_SPLIT_SEED = 0


@dataclass
class Holdout:
    """Regions kept out of every pretraining (the geometry encoder and the checkpoint); evaluation_report's
    transfer rows test on them. One setting, shared by the three assets that read it."""

    holdout_regions: list[str] = field(default_factory=list)


def _cell_seed(epsg: int, split_seed: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{split_seed}:{int(epsg)}".encode(), digest_size=8).digest(), "little")


def block_split(epsg: int, blocks: np.ndarray, split_seed: int = DEFAULT_SPLIT_SEED) -> np.ndarray:
    """(N,) int8: ``TRAIN``, ``VAL`` or ``TEST`` of each distinct block (N, 2) (block x, block y) of one region
    on the UTM grid ``epsg``.

    Blocks are grouped in super-cells of ``CELL_BLOCKS``; a permutation of each cell's 20 slots, seeded by
    (split seed, EPSG, cell), gives 14 slots to train, 3 to validation and 3 to test. ``blocks`` must be
    all of the region's blocks, for the small-region rule (module docstring)."""
    blocks = np.asarray(blocks, np.int64).reshape(-1, 2)
    n_slots = CELL_BLOCKS[0] * CELL_BLOCKS[1]
    slot_split = np.repeat(np.arange(3, dtype=np.int8), CELL_SLOTS)  # slot rank -> split
    cells, inverse = np.unique(blocks // np.array(CELL_BLOCKS), axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    slot = (blocks[:, 0] % CELL_BLOCKS[0]) + CELL_BLOCKS[0] * (blocks[:, 1] % CELL_BLOCKS[1])
    base = _cell_seed(epsg, split_seed)
    rank = np.empty((len(cells), n_slots), np.int64)
    for i, (cx, cy) in enumerate(cells.tolist()):
        rank[i] = np.random.default_rng([base, cx & 0xFFFFFFFF, cy & 0xFFFFFFFF]).permutation(n_slots)
    split = slot_split[rank[inverse, slot]]
    if len(blocks) >= 3:
        for which in (TEST, VAL, TRAIN):
            if not (split == which).any():  # the largest split gives up one block (the first in block order)
                split[np.flatnonzero(split == np.argmax(np.bincount(split, minlength=3)))[0]] = which
    return split


def tile_blocks(tile_x: np.ndarray, tile_y: np.ndarray) -> np.ndarray:
    """(T, 2) int64 block (x, y) of each tile."""
    return np.column_stack([np.asarray(tile_x, np.int64) // SPLIT_BLOCK_TILES, np.asarray(tile_y, np.int64) // SPLIT_BLOCK_TILES])


def tile_split(epsg: int, tile_x: np.ndarray, tile_y: np.ndarray, split_seed: int = DEFAULT_SPLIT_SEED) -> np.ndarray:
    """(T,) int8: ``TRAIN``, ``VAL`` or ``TEST`` of each tile (grid column ``tile_x``, row ``tile_y`` of the UTM
    grid ``epsg``) of one region.

    Pass every tile of the region (all its shards) in one call: the small-region rule looks at all its blocks."""
    if not len(tile_x):
        return np.zeros(0, np.int8)
    blocks, inverse = np.unique(tile_blocks(tile_x, tile_y), axis=0, return_inverse=True)
    return block_split(epsg, blocks, split_seed)[inverse.reshape(-1)]


def split_counts(split: np.ndarray) -> dict[str, int]:
    """{"train": n, "val": n, "test": n} tiles of a ``tile_split`` result."""
    return {name: int((split == i).sum()) for i, name in enumerate(SPLIT_NAMES)}
