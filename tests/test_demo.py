"""``geojepa demo`` as a new user runs it (``make demo``): the embedded Liechtenstein extract through the whole graph,
ending with an evaluation of real tasks by every method. This is the test on real data that the probes produce
numbers: building_count and max_speed evaluated, finite, with the untrained control and the full protocol."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from geojepa_pipeline.evaluate.run import METHODS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # about 5 min on 2 idle cores


def test_demo_evaluates_building_count_and_max_speed_with_every_method(tmp_path):
    home = tmp_path / "home"
    exe = Path(sys.executable).parent / "geojepa"
    proc = subprocess.run([str(exe), "demo"], capture_output=True, text=True, timeout=1500,
                          env={**os.environ, "GEOJEPA_HOME": str(home)})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    out = proc.stdout
    assert "registered demo region liechtenstein (demo:liechtenstein)" in out
    for task in ("building_count", "max_speed"):
        row = next(line for line in out.splitlines() if line.startswith(f"| {task} |"))
        assert "skipped" not in row and row.count("±") == len(METHODS), row
    assert "random_init_mlp" in out and "protocol: the label's entities removed from every modality" in out
    report = Path(next(line for line in out.splitlines() if line.startswith("report: ")).split("report: ", 1)[1])
    reports = home / "store" / "reports" / "GT"
    metrics = json.loads((reports / (reports / "CURRENT").read_text().strip() / "metrics.json").read_text())
    for task in ("building_count", "max_speed"):
        res = metrics["tasks"][task]
        assert set(res) == set(METHODS)
        assert all(math.isfinite(v["mae"]) and math.isfinite(v["mae_std"]) and v["n_test"] >= 30 for v in res.values()), res
        assert res["dummy"]["mae"] > 0
    p = metrics["protocol"]
    assert p["masking"] == "entities" and p["max_pieces"] is None and p["imagery"] == {"liechtenstein": "synthetic"}
    assert p["holdout_regions"] == [] and metrics["transfer"] == {}
    assert set(p["modalities"]) == set(METHODS) and p["split"]["tiles"]["liechtenstein"]["test"] > 300
    masked = p["masked_input"]["liechtenstein"]["building_count"]
    assert masked["removed_entities"] > 8000 and masked["removed_untagged_members"] > 0
    corr = p["label_piece_correlation"]["building_count"]
    assert corr["masked_input"] < corr["unmasked_input"] - 0.1
    assert report.exists() and report.parent == reports / (reports / "CURRENT").read_text().strip()
    # the product: every tile's embedding, and a place query answered from them
    assert "tile embeddings liechtenstein by GT: " in out and "# the busiest tile of liechtenstein" in out
    assert "5 nearest tiles (cosine distance = 1 - cosine):" in out
    from geojepa_pipeline import load_embeddings

    gdf = load_embeddings("liechtenstein", "GT", home=home)
    assert len(gdf) > 3000 and gdf.crs.to_epsg() == 4326 and gdf.embedding.iloc[0].shape == (128,)
