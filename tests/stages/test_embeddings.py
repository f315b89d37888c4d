"""tile_embeddings without Dagster: pyrosm's test extract through the real builders, a 2-step GT checkpoint."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import shapely

from geojepa_pipeline.columns import matrix_to_numpy
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
    tag = np.concatenate([matrix_to_numpy(pq.read_table(p, columns=["tag_token"]).column("tag_token")) for p in tokens.shards("tokens")])
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


def test_embed_a_place_gives_its_tile_and_its_true_nearest_tiles(built, monkeypatch, capsys):
    import geopandas as gpd

    from geojepa_pipeline.cli import main

    settings, store, result, _ = built
    monkeypatch.setenv("GEOJEPA_HOME", str(settings.home))
    gdf = gpd.read_parquet(result.dataset.file(TILE_EMBEDDINGS_FILE))
    q = 10
    c = gdf.geometry.iloc[q].centroid
    capsys.readouterr()
    assert main(["embed", "--lat", str(c.y), "--lon", str(c.x), "--k", "3", "--json"]) == 0
    import json

    out = json.loads(capsys.readouterr().out)
    emb = np.stack(gdf.embedding.to_numpy())
    assert out["tile_id"] == gdf.tile_id.iloc[q] and out["region"] == "t" and out["model_version"] == "geojepa-GT:1"
    np.testing.assert_array_equal(np.float32(out["embedding"]), emb[q])
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sims = e @ e[q]
    sims[q] = -np.inf  # the query's own tile is not its neighbour
    want = np.argsort(-sims)[:3]
    assert [n["tile_id"] for n in out["neighbours"]] == list(gdf.tile_id.iloc[want])
    np.testing.assert_allclose([n["cosine"] for n in out["neighbours"]], sims[want], rtol=1e-5)
    assert main(["embed", "--lat", str(c.y), "--lon", str(c.x)]) == 0
    text = capsys.readouterr().out
    assert gdf.tile_id.iloc[q] in text and "3 nearest" not in text and "5 nearest tiles" in text
    assert main(["embed", "--lat", "0", "--lon", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "outside every region embedded by GT: t W,S,E,N" in err and "\n" not in err
    assert main(["embed", "--lat", str(c.y), "--lon", str(c.x), "--variant", "T"]) == 2
    assert "materialize them: geojepa materialize --select tile_embeddings --variant T" in capsys.readouterr().err


def test_embed_a_box_writes_exactly_its_tiles_as_geoparquet(built, monkeypatch, tmp_path, capsys):
    import geopandas as gpd

    from geojepa_pipeline.cli import main

    settings, store, result, _ = built
    monkeypatch.setenv("GEOJEPA_HOME", str(settings.home))
    gdf = gpd.read_parquet(result.dataset.file(TILE_EMBEDDINGS_FILE))
    centres = gdf.to_crs(result.dataset.manifest["epsg"]).geometry.centroid.to_crs(4326)
    w, e = np.quantile(centres.x, [0.3, 0.6])
    s, n = np.quantile(centres.y, [0.3, 0.6])  # edges through tile centres: no tile is in doubt
    out = tmp_path / "box" / "emb.parquet"
    assert main(["embed", "--bbox", f"{w},{s},{e},{n}", "--out", str(out)]) == 0
    got = gpd.read_parquet(out)
    want = gdf[gdf.geometry.intersects(shapely.box(w, s, e, n))]
    assert 0 < len(got) < len(gdf) and sorted(got.tile_id) == sorted(want.tile_id)
    assert got.crs.to_epsg() == 4326 and got["geometry_utm"].crs.to_epsg() == result.dataset.manifest["epsg"]
    assert set(got.region) == {"t"} and not list(out.parent.glob(".*tmp"))
    assert main(["embed", "--bbox", "0,0,0.1,0.1", "--out", str(tmp_path / "none.parquet")]) == 2
    assert "meets no embedded tile" in capsys.readouterr().err and not (tmp_path / "none.parquet").exists()


def test_a_running_place_server_answers_as_the_cli_does_and_follows_new_versions(built, monkeypatch, capsys):
    """``geojepa embed --serve`` in its own process: ``geojepa embed --lat --lon`` (cli_light) is answered by it, exactly
    as the full CLI answers alone; errors come back as the CLI's; a new embeddings version is served at once; SIGTERM
    removes the socket; a stale socket (a killed server) is answered around and replaced."""
    import json
    import os
    import signal
    import subprocess
    import sys

    import geojepa_pipeline.evaluate.index as index_module
    from geojepa_pipeline import cli, cli_light

    settings, store, result, _ = built
    monkeypatch.setenv("GEOJEPA_HOME", str(settings.home))
    path = settings.embed_socket
    assert path == settings.home / "run" / "embed.sock"

    def start():
        proc = subprocess.Popen([sys.executable, "-m", "geojepa_pipeline.cli_light", "embed", "--serve"], stdout=subprocess.PIPE,
                                text=True, env={**os.environ, "GEOJEPA_HOME": str(settings.home)})
        lines = [proc.stdout.readline()]  # "opened <region> ...", then "serving ..." once everything is held
        while lines[-1] and "serving" not in lines[-1]:
            lines.append(proc.stdout.readline())
        assert "serving place queries" in lines[-1] and "tiles held" in lines[-1] and "opened t by GT" in lines[0], lines
        return proc

    gdf_row = pq.read_table(result.dataset.file(TILE_EMBEDDINGS_FILE), columns=["geometry"]).column("geometry")[7].as_py()
    c = shapely.from_wkb(gdf_row).centroid
    place = ["embed", "--lat", repr(c.y), "--lon", repr(c.x), "--k", "4", "--json"]
    capsys.readouterr()
    assert cli.main(place) == 0  # the full CLI alone, no server
    alone = capsys.readouterr().out
    server = start()
    try:
        request = {**cli_light.place_query(place), "home": str(settings.home), "store": str(settings.store_root)}
        reply = cli_light.ask(path, request)
        assert reply == {"answer": json.loads(alone)}  # answered by the server, from memory
        assert cli_light.main(place) == 0 and capsys.readouterr().out == alone
        assert cli_light.main(place[:-1]) == 0 and capsys.readouterr().out.startswith(f"tile {json.loads(alone)['tile_id']} of region t")
        assert cli_light.main(["embed", "--lat", "0", "--lon", "0"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: lat 0.0, lon 0.0 is outside every region embedded by GT: t W,S,E,N") and err.count("\n") == 1
        assert cli_light.ask(path, {**request, "home": "/elsewhere"})["fallback"].startswith("another GEOJEPA_HOME")
        assert "fallback" in cli_light.ask(path, {**request, "variant": "XYZ"})
        with pytest.raises(SystemExit) as usage:  # declined by the server: the CLI's usage error names the variants
            cli_light.main([*place[:-1], "--variant", "XYZ"])
        assert usage.value.code == 2 and "invalid choice: 'XYZ'" in capsys.readouterr().err
        # a new version of the region's embeddings is what the next answer reads
        monkeypatch.setattr(index_module, "EXACT_MAX", 50)
        newer = build_tile_embeddings("t", "GT", store, settings).dataset
        assert newer.data_version != result.dataset.data_version
        assert cli_light.ask(path, request)["answer"]["embeddings_version"] == newer.data_version
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0 and not path.exists()
        server = start()
        server.kill()  # SIGKILL: the socket stays behind, with nobody listening
        server.wait(30)
        assert path.exists() and cli_light.ask(path, request) is None
        assert cli_light.main(place) == 0 and json.loads(capsys.readouterr().out)["embeddings_version"] == newer.data_version
        server = start()  # the stale socket is replaced
        assert cli_light.ask(path, request)["answer"]["embeddings_version"] == newer.data_version
    finally:
        server.kill()
        server.wait(30)
        store.set_current(EMBEDDINGS, "t.GT", result.dataset.data_version)  # later tests start from the fixture's version
        path.unlink(missing_ok=True)


def test_past_exact_max_tiles_the_knn_index_is_stored_and_answers_as_exact_search(built, monkeypatch):
    import geojepa_pipeline.evaluate.index as index_module
    from geojepa_pipeline.stages.embeddings import nearest_tiles, read_embeddings
    from geojepa_pipeline.store import TILE_INDEX_FILE

    settings, store, result, _ = built
    monkeypatch.setattr(index_module, "EXACT_MAX", 50)  # the region has 70 tiles
    ds = build_tile_embeddings("t", "GT", store, settings).dataset
    assert ds.has_file(TILE_INDEX_FILE) and ds.data_version != result.dataset.data_version
    stored = index_module.CosineIndex.load(ds.file(TILE_INDEX_FILE))
    emb = read_embeddings(ds)
    assert len(stored) == len(emb) and stored.faiss_index is not None
    exact = index_module.CosineIndex(emb, exact_max=10**9)
    for q in (0, 17, 42):
        assert (stored.search(emb[q], 5)[1] == exact.search(emb[q], 5)[1]).all()  # the re-rank sees every row here
    assert [h.row for h in nearest_tiles(store, "GT", emb[17], 4)] == list(exact.search(emb[17], 4)[1][0])


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
