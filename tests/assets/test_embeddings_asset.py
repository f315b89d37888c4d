"""tile_embeddings through the CLI: one Dagster materialization per region|variant cell, the store's data version."""

from __future__ import annotations

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
