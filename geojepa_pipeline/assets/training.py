"""``geojepa_checkpoint[variant]``: train GeoJEPA on the registered regions' tokens; a thin wrapper over ``stages.training``."""


import dagster as dg
import numpy as np

from ..geo.render import curve_png, png_markdown
from ..model.config import VARIANTS
from ..train.loop import TrainConfig
from ..geo.splits import Holdout
from ..stages.training import CheckpointOptions, build_checkpoint
from .imagery import tile_images
from .config import config_from, values_for
from .results import dataset_result
from .resources import GeojepaResource
from .tokens import geometry_encoder, tag_embeddings, tile_tokens

GEOJEPA_CHECKPOINT_CODE_VERSION = "2"  # 2: one split with evaluation (train tiles only), target encoder in eval mode
variants_partitions = dg.StaticPartitionsDefinition(list(VARIANTS))


# the variant is the partition; gradient clipping, step caps and the device stay TrainConfig's defaults
CheckpointConfig = config_from("CheckpointConfig", TrainConfig, CheckpointOptions, Holdout,
                               exclude=("variant", "grad_clip", "max_steps", "device"))


@dg.asset(
    partitions_def=variants_partitions,
    deps=[dg.AssetDep(tile_tokens, partition_mapping=dg.AllPartitionMapping()),
          dg.AssetDep(tile_images, partition_mapping=dg.AllPartitionMapping()),
          tag_embeddings, geometry_encoder],
    code_version=GEOJEPA_CHECKPOINT_CODE_VERSION,
    group_name="training",
    kinds={"pytorch", "mlflow"},
    pool="gpu",
    description="GeoJEPA trained on the regions' tile tokens (one partition per variant T, GT, TI, GTI); logged to "
                "MLflow and registered as geojepa-<variant> with the input data versions as tags. Resumes after a kill.",
)
def geojepa_checkpoint(context: dg.AssetExecutionContext, config: CheckpointConfig, geojepa: GeojepaResource) -> dg.MaterializeResult:
    variant = context.partition_key
    settings = geojepa._settings()
    cfg = values_for(TrainConfig, config, variant=variant)
    result = build_checkpoint(
        variant, geojepa.store(), settings, cfg, regions=list(config.regions) or None, log=context.log.info,
        holdout_regions=list(config.holdout_regions),
        processes=config.processes,
        tags={"dagster.run_id": context.run.run_id, "dagster.code_version": GEOJEPA_CHECKPOINT_CODE_VERSION,
              "dagster.asset": "geojepa_checkpoint", "dagster.partition": variant},
    )
    ds, hist = result.dataset, result.history
    last = hist["epoch"][-1] if hist["epoch"] else {}
    loss = hist["loss"]
    smooth = [float(np.mean(loss[max(0, i - 9):i + 1])) for i in range(len(loss))]  # 10-step running mean
    return dataset_result(
        ds, {
            # a link in the UI when MLflow is a server; the run's tags name this Dagster run back
            "mlflow_run": (dg.MetadataValue.url(result.mlflow.run_url) if result.mlflow.run_url.startswith("http")
                           else dg.MetadataValue.text(result.mlflow.run_url)),
            "mlflow_run_id": dg.MetadataValue.text(result.mlflow.run_id),
            "model_version": dg.MetadataValue.text(f"{result.mlflow.model_name}:{result.mlflow.version}"),
            "steps": dg.MetadataValue.int(result.steps),
            "resumed_from_step": dg.MetadataValue.int(result.resumed_from),
            "final_metrics": dg.MetadataValue.json({k: round(v, 5) for k, v in last.items() if isinstance(v, (int, float)) and v == v}),
            "inputs": dg.MetadataValue.json(result.inputs),
            "loss_curve": dg.MetadataValue.md(png_markdown(curve_png(smooth, "training loss (10-step mean)"), "loss curve")),
            "seconds": dg.MetadataValue.float(round(result.seconds, 1)),
        },
    )
