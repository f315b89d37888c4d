"""tile_embeddings through the CLI: one Dagster materialization per region|variant cell, the store's data version."""

from __future__ import annotations

import json

import dagster as dg
import geopandas as gpd

from geojepa_pipeline.cli import main
from geojepa_pipeline.store import EMBEDDINGS, TILE_EMBEDDINGS_FILE, Store

UP_TO_TOKENS = "group:ingest or group:imagery or group:tokens"


def test_materialize_select_tile_embeddings_writes_the_region_variant_cell(home, capsys):
    assert main(["regions", "add", "t", "--osm", "pyrosm:test", "--imagery", "none"]) == 0
    assert main(["materialize", "--region", "t", "--select", UP_TO_TOKENS]) == 0
    assert main(["materialize", "--select", "geojepa_checkpoint", "--variant", "GT", "--epochs", "1"]) == 0
    store = Store(home / "store")
    assert store.current(EMBEDDINGS, "t.GT") is None  # not part of the default selection's training run
    assert main(["materialize", "--select", "tile_embeddings", "--variant", "GT"]) == 0
    ds = store.require(EMBEDDINGS, "t.GT")
    gdf = gpd.read_parquet(ds.file(TILE_EMBEDDINGS_FILE))
    assert gdf.crs.to_epsg() == 4326 and len(gdf) == store.current("tiles", "t").manifest["n_tiles"]
    with dg.DagsterInstance.from_config(str(home / "dagster")) as instance:
        ev = instance.get_latest_materialization_event(dg.AssetKey("tile_embeddings"))
        mat = ev.asset_materialization
        assert mat.partition == "t|GT"
        assert mat.metadata["data_version"].value == ds.data_version
        assert mat.metadata["model_version"].value == "geojepa-GT:1"
        assert "data:image/png;base64," in mat.metadata["pca_map"].value
    assert "tile_embeddings of region t by GT" in capsys.readouterr().out

    # lineage, both ways: the model version lists the embeddings made from it; the region lists its embeddings
    assert main(["lineage", "geojepa-GT:1", "--json"]) == 0
    made = json.loads(capsys.readouterr().out)["embeddings"]
    assert [(e["region"], e["variant"], e["data_version"], e["current"]) for e in made] == [("t", "GT", ds.data_version, True)]
    assert main(["lineage", "GT"]) == 0
    assert "embeddings made from it:" in capsys.readouterr().out
    assert main(["lineage", "--region", "t", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert [e["data_version"] for e in row["embeddings"]] == [ds.data_version]
    assert main(["lineage", "--region", "t"]) == 0
    text = capsys.readouterr().out
    assert "embeddings of t:" in text and ds.data_version in text and "geojepa-GT:1" in text
