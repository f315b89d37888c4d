"""The one spatial split: whole blocks per split, 70 / 15 / 15 in every super-cell, stable as a region grows."""

from __future__ import annotations

import numpy as np

from geojepa_pipeline.geo.splits import SPLIT_BLOCK_TILES, TEST, TRAIN, VAL, block_split, split_counts, tile_split


def _grid(n):
    x, y = np.meshgrid(np.arange(n), np.arange(n))
    return x.ravel() + 1000, y.ravel() + 5000


def test_whole_blocks_go_to_one_split_in_about_the_set_shares():
    tx, ty = _grid(200)  # 2,500 blocks
    split = tile_split(32632, tx, ty, split_seed=0)
    block = (tx // SPLIT_BLOCK_TILES) * 100_000 + ty // SPLIT_BLOCK_TILES
    for b in np.unique(block)[:300]:
        assert len(set(split[block == b].tolist())) == 1
    shares = np.bincount(split, minlength=3) / len(split)
    assert abs(shares[TRAIN] - 0.70) < 0.02 and abs(shares[VAL] - 0.15) < 0.02 and abs(shares[TEST] - 0.15) < 0.02
    whole = (tx // (SPLIT_BLOCK_TILES * 4) == 65) & (ty // (SPLIT_BLOCK_TILES * 5) == 250)  # one super-cell of 20 blocks
    assert np.bincount(split[whole], minlength=3).tolist() == [14 * 16, 3 * 16, 3 * 16]
    assert not np.array_equal(split, tile_split(32632, tx, ty, split_seed=1))  # the split seed moves blocks
    assert not np.array_equal(split, tile_split(32633, tx, ty, split_seed=0))  # and so does another UTM grid


def test_a_block_keeps_its_split_when_the_region_grows_or_another_covers_it_and_small_regions_get_every_split():
    tx, ty = _grid(40)
    big = tile_split(32632, tx, ty)
    part = (tx < 1020) & (ty < 5020)  # a region that later grew to the full grid
    assert np.array_equal(tile_split(32632, tx[part], ty[part]), big[part])  # also: another region of the same place
    for seed in range(50):
        blocks = np.array([[0, 0], [1, 0], [0, 1]])
        assert sorted(block_split(32632, blocks, seed).tolist()) == [TRAIN, VAL, TEST]
        counts = split_counts(tile_split(32632, *_grid(12), seed))  # 9 blocks
        assert min(counts.values()) > 0, (seed, counts)
