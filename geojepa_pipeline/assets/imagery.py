"""``naip_scenes[region]`` and ``tile_images[region]``: thin wrappers over ``stages.imagery``."""


import dagster as dg
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import rasterio

from ..geo.raster import CHIP_PX
from ..geo.render import png_markdown
from ..stages.imagery import NaipScenesOptions, TileImagesOptions, build_naip_scenes, build_tile_images, preview_png
from ..errors import GeojepaError
from ..store import TILES, aligned_shards
from .osm import tile_shards
from .automation import on_upstream_data_change
from .partitions import regions_partitions
from .config import config_from
from .results import dataset_result
from .resources import GeojepaResource

NAIP_SCENES_CODE_VERSION = "1"
TILE_IMAGES_CODE_VERSION = "1"


NaipScenesConfig = config_from("NaipScenesConfig", NaipScenesOptions)


def _thumbnail_markdown(path: str, alt: str, max_px: int = 320) -> str:
    """An RGB thumbnail of one scene, read from its overviews."""
    import io

    from PIL import Image

    with rasterio.open(path) as src:
        scale = max(src.width, src.height) / max_px
        shape = (3, max(1, int(src.height / scale)), max(1, int(src.width / scale)))
        rgb = src.read([1, 2, 3], out_shape=shape).transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).quantize(256).save(buf, format="PNG", optimize=True)
    return png_markdown(buf.getvalue(), alt)


@dg.asset(
    automation_condition=on_upstream_data_change(),
    partitions_def=regions_partitions,
    deps=[tile_shards],
    code_version=NAIP_SCENES_CODE_VERSION,
    group_name="imagery",
    kinds={"geotiff"},
    description="The region's aerial scenes (NAIP-like, 4-band uint8): local GeoTIFF/COG files, a STAC search, or synthetic COGs rendered from its OSM entities.",
)
def naip_scenes(context: dg.AssetExecutionContext, config: NaipScenesConfig, geojepa: GeojepaResource) -> dg.MaterializeResult:
    region = geojepa.registry().get(context.partition_key)
    result = build_naip_scenes(region, geojepa.store(), log=context.log.info, **config.model_dump())
    for w in result.warnings:
        context.log.warning(w)
    ds, scenes = result.dataset, result.scenes
    metadata = {
        "source": dg.MetadataValue.text(result.source),
        "n_scenes": dg.MetadataValue.int(len(scenes)),
        "scenes": dg.MetadataValue.json([
            {"id": s.scene_id, "acquired": s.acquired, "crs": s.crs, "res_m": round(s.res[0], 3), "bands": s.count,
             "dtype": s.dtype, "sha256": s.sha256[:16]} for s in scenes[:50]
        ]),
        "bytes": dg.MetadataValue.int(sum(f["bytes"] for f in ds.manifest["files"].values())),
        "warnings": dg.MetadataValue.json(result.warnings),
        "timings_s": dg.MetadataValue.json({k: round(v, 3) for k, v in result.timings_s.items()}),
    }
    if scenes:
        metadata["first_scene"] = dg.MetadataValue.md(_thumbnail_markdown(scenes[0].path, f"scene {scenes[0].scene_id}"))
    return dataset_result(ds, metadata)


TileImagesConfig = config_from("TileImagesConfig", TileImagesOptions, exclude=("batch_tiles",))


def _alignment_check(tiles_ds, images_ds) -> dg.AssetCheckResult:
    """Image shards line up 1:1 with tile shards: same indices, same tile ids in the same order."""
    problems = []
    try:
        pairs = aligned_shards((tiles_ds, "tiles"), (images_ds, "images"))
    except GeojepaError as e:  # the shard indices differ
        pairs, problems = [], [str(e)]
    for tiles_path, images_path in pairs:
        t_ids = pq.read_table(tiles_path, columns=["tile_id"]).column("tile_id")
        img = pq.read_table(images_path, columns=["tile_id", "has_image", "image"])
        if not img.column("tile_id").equals(t_ids):
            problems.append(f"{images_path.name}: tile ids differ from {tiles_path.name}")
        with_image = pc.filter(img.column("image"), img.column("has_image"))
        sizes = set(pc.unique(pc.binary_length(with_image)).to_pylist())  # no Python copy of the chips
        if sizes - {CHIP_PX * CHIP_PX * 4}:
            problems.append(f"{images_path.name}: chip byte sizes {sorted(sizes)}")
    return dg.AssetCheckResult(
        check_name="aligned_with_tiles", passed=not problems,
        metadata={"n_shards": len(images_ds.shard_entries), "problems": dg.MetadataValue.json(problems[:20])},
    )


@dg.asset(
    automation_condition=on_upstream_data_change(),
    partitions_def=regions_partitions,
    deps=[tile_shards, naip_scenes],
    code_version=TILE_IMAGES_CODE_VERSION,
    group_name="imagery",
    kinds={"parquet"},
    description="One 224x224x4 uint8 chip (R, G, B, NIR) per tile, warped from the scenes (newest first), with a coverage fraction; shards aligned 1:1 with tile_shards.",
    check_specs=[dg.AssetCheckSpec("aligned_with_tiles", asset="tile_images",
                                   description="Same shards and tile order as tile_shards; every chip is 224x224x4 bytes.")],
)
def tile_images(context: dg.AssetExecutionContext, config: TileImagesConfig, geojepa: GeojepaResource) -> dg.MaterializeResult:
    region = context.partition_key
    store = geojepa.store()
    result = build_tile_images(region, store, log=context.log.info, **config.model_dump())
    for w in result.warnings:
        context.log.warning(w)
    ds = result.dataset
    tiles_ds = store.current(TILES, region)
    chip_s = result.timings_s["chip_s"]
    metadata = {
        "n_tiles": dg.MetadataValue.int(result.n_tiles),
        "n_with_image": dg.MetadataValue.int(result.n_with_image),
        "coverage_mean": dg.MetadataValue.float(round(result.coverage_mean, 4)),
        "coverage_histogram": dg.MetadataValue.json(result.coverage_hist),
        "scene_use": dg.MetadataValue.json(dict(sorted(result.scene_use.items(), key=lambda kv: -kv[1])[:20])),
        "inputs": dg.MetadataValue.json(ds.manifest["inputs"]),
        "n_shards": dg.MetadataValue.int(len(ds.shard_entries)),
        "bytes": dg.MetadataValue.int(sum(f["bytes"] for f in ds.manifest["files"].values())),
        "chips_per_s": dg.MetadataValue.float(round(result.n_tiles / max(chip_s, 1e-9), 1)),
        "warnings": dg.MetadataValue.json(result.warnings),
    }
    if result.n_with_image:
        metadata["preview"] = dg.MetadataValue.md(png_markdown(preview_png(tiles_ds, ds), f"chips and OSM entities, {region}"))
    return dataset_result(
        ds, metadata,
        check_results=[_alignment_check(tiles_ds, ds)],
    )

