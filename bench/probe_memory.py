"""Peak memory and wall time of training's epoch-end probe on a home's region.

    python bench/probe_memory.py --home DIR [--region bench] [--limit 2000]

The probe (``train.loop.embed_tiles``) embeds ``--limit`` train and ``--limit`` validation tiles, chosen evenly
through the split, with an untrained ``tiny`` GT model (the weights do not change what is read). Runs it under
``bench/memtrace.py`` and prints the tiles, the shards read, the seconds and the peak PSS of this process. Use the
home of ``bench/stages.py --home DIR`` (its region is ``bench``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from memtrace import TreeMemory  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description="epoch-end probe: peak memory and time")
    ap.add_argument("--home", type=Path, required=True)
    ap.add_argument("--region", default="bench")
    ap.add_argument("--limit", type=int, default=2000)
    args = ap.parse_args()
    from geojepa_pipeline.model.config import model_config
    from geojepa_pipeline.model.geojepa import GeoJEPA
    from geojepa_pipeline.settings import get_settings
    from geojepa_pipeline.stages.training import training_sources
    from geojepa_pipeline.store import Store
    from geojepa_pipeline.train.loop import TrainConfig, embed_tiles

    store = Store(get_settings(args.home).store_root)
    with TreeMemory() as mem:
        sources, _ = training_sources(store, [args.region], with_images=False)
        model = GeoJEPA(model_config("tiny", "GT"))
        cfg = TrainConfig(preset="tiny")
        t = time.perf_counter()
        xtr, _ = embed_tiles(model, sources, "train", cfg, limit=args.limit)
        xva, _ = embed_tiles(model, sources, "val", cfg, limit=args.limit)
        seconds = time.perf_counter() - t
    print(f"probe: {len(xtr)} + {len(xva)} tiles from {len(sources)} shards in {seconds:.1f} s, peak {mem.peak_mb:.0f} MB")


if __name__ == "__main__":
    main()
