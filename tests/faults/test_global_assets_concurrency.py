"""Faults: two runs that need the same asset over all regions compute it once (issue 19, item 7).

Before: two concurrent ``materialize`` runs each pretrained ``geometry_encoder`` and embedded ``tag_embeddings``
(17 min each, against 7 alone). Now the second waits on the store's lock and reuses the first one's result.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from geojepa_pipeline.cli import main

GLOBALS = "key:tag_embeddings or key:geometry_encoder"
# 400 steps: long enough (tens of seconds here) that the second run arrives while the first one pretrains
RUN = ("import sys; from geojepa_pipeline.cli import materialize_regions; "
       "materialize_regions([sys.argv[1]], {select!r}, op_config={{'geometry_encoder': {{'steps': 400}}}})")


def _start(home: Path, region: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RUN.format(select=GLOBALS), region], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "GEOJEPA_HOME": str(home)})


def _log_of(output: str) -> str:
    path = next(line.split("full log: ", 1)[1].strip() for line in output.splitlines() if "full log: " in line)
    return Path(path).read_text()


def test_concurrent_runs_wait_for_one_geometry_encoder_and_one_tag_cache(home):
    from geojepa_pipeline.store import GEOMETRY, GLOBAL_SCOPE, TAGS, Store

    for name in ("a", "b"):
        assert main(["regions", "add", name, "--osm", "pyrosm:test", "--imagery", "none"]) == 0
        assert main(["materialize", "--region", name, "--select", "key:osm_extract or key:tile_shards"]) == 0
    store = Store(home / "store")
    lock = store.kind_dir(GEOMETRY, GLOBAL_SCOPE) / ".lock"

    first = _start(home, "a")
    deadline = time.time() + 300
    while time.time() < deadline and not (lock.exists() and lock.read_text().strip() == str(first.pid)):
        assert first.poll() is None, first.stdout.read()[-3000:]  # the first run is pretraining: it holds the lock
        time.sleep(0.05)
    second = _start(home, "b")
    outs = [p.communicate(timeout=900)[0] for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, [o[-3000:] for o in outs]

    # one pretraining, one tag cache: each store holds one version, and both runs ended on it
    assert len(store.versions(GEOMETRY, GLOBAL_SCOPE)) == 1 and len(store.versions(TAGS, GLOBAL_SCOPE)) == 1
    encoder = store.current(GEOMETRY, GLOBAL_SCOPE)
    assert encoder.manifest["regions"] == ["a", "b"]
    assert encoder.manifest["inputs"] == {n: store.current_version("tiles", n) for n in ("a", "b")}
    second_log = _log_of(outs[1])
    assert f"geometry_encoder[@all]: waiting for another run (pid {first.pid}) that is building it" in second_log
    assert f"geometry encoder: unchanged (same options, same shards): {encoder.label}" in second_log
    # the pairs were embedded once: by whichever run reached tag_embeddings first (a run's step order is Dagster's)
    embedded = sorted(int(m.group(1).replace(",", "")) for m in re.finditer(r"([\d,]+) new to embed", _log_of(outs[0]) + second_log))
    assert len(embedded) == 2 and embedded[0] == 0 < embedded[1], embedded
    assert lock.read_text() == ""  # released: nobody holds it

    import dagster as dg

    with dg.DagsterInstance.from_config(str(home / "dagster")) as instance:
        records = instance.fetch_materializations(dg.AssetKey("geometry_encoder"), limit=10).records
        unchanged = {r.run_id: r.asset_materialization.metadata["unchanged"].value for r in records}
        built_by = [run_id for run_id in unchanged if run_id in outs[0] + _log_of(outs[0])]
        # the first run built it, the second found it unchanged; their events may be stored in either order (the second
        # run goes on as soon as the lock is released, which can be before the first run's event is written)
        assert len(unchanged) == 2 and sorted(unchanged.values()) == [False, True] and built_by, unchanged
        assert all(unchanged[run_id] is False for run_id in built_by)
        assert len({r.asset_materialization.tags["dagster/data_version"] for r in records}) == 1
    assert json.loads((encoder.path / "history.json").read_text())["loss"]
