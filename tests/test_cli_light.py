"""cli_light: which command lines the light path takes to a place server, and that everything else reaches the CLI."""

from __future__ import annotations

import pytest

from geojepa_pipeline.cli_light import format_place, main, place_query


def test_place_query_parses_the_place_forms_and_nothing_else():
    q = place_query(["embed", "--lat", "47.14", "--lon", "9.52"])
    assert q == {"op": "place", "home": None, "lat": 47.14, "lon": 9.52, "variant": "GT", "k": 5, "json": False}
    q = place_query(["--home", "/h", "embed", "--json", "--k=3", "--lon=-9.5", "--lat", "-47", "--variant", "T"])
    assert q == {"op": "place", "home": "/h", "lat": -47.0, "lon": -9.5, "variant": "T", "k": 3, "json": True}
    assert place_query(["--home=/h", "embed", "--lat", "1", "--lon", "2"])["home"] == "/h"
    for argv in (["embed", "--lat", "1"], ["embed", "--bbox", "0,0,1,1", "--out", "x.parquet"], ["embed", "--serve"],
                 ["embed", "--lat", "x", "--lon", "2"], ["embed", "--lat", "1", "--lon", "2", "--k", "0"],
                 ["embed", "--lat", "1", "--lat", "2", "--lon", "3"], ["embed", "--lat", "1", "--lon"], ["report"], [],
                 ["embed", "--lat", "1", "--lon", "2", "--other"], ["--home", "/h", "report"]):
        assert place_query(argv) is None, argv  # the full CLI answers these (and says what is wrong)


def test_without_a_server_the_full_cli_answers(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GEOJEPA_HOME", str(tmp_path / "home"))
    assert main(["embed", "--lat", "47.14", "--lon", "9.52"]) == 2  # no server, no embeddings: the CLI's own error
    assert "no region has tile_embeddings by variant GT" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "embed" in capsys.readouterr().out


def test_format_place_prints_the_tile_versions_and_neighbours():
    answer = {"region": "li", "tile_id": "32632_1_2", "lon": 9.5, "lat": 47.1, "variant": "GT", "model_version": "geojepa-GT:3",
              "embeddings_version": "e" * 16, "tokens_version": "t" * 16, "embedding": [0.5, -0.25] * 4 + [9.0],
              "neighbours": [{"region": "li", "tile_id": "32632_1_3", "lon": 9.5, "lat": 47.2, "cosine": 0.9, "distance": 0.1}]}
    text = format_place(answer)
    assert text.splitlines()[0] == "tile 32632_1_2 of region li (centre lat 47.10000, lon 9.50000)"
    assert "model geojepa-GT:3, embeddings eeeeeeeeeeeeeeee" in text and "+0.5000 -0.2500" in text and "+9.0000" not in text
    assert "1 nearest tiles" in text and "32632_1_3 | li     | 0.1" in text
