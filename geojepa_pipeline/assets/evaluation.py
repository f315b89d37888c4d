"""``evaluation_report[variant]``: probes, baselines and kNN on the checkpoint; a thin wrapper over ``evaluation``."""


import dagster as dg

from ..evaluation import build_report
from .results import dataset_result
from .resources import GeojepaResource
from .training import geojepa_checkpoint, variants_partitions

EVALUATION_REPORT_CODE_VERSION = "1"


class EvaluationConfig(dg.Config):
    seeds: list[int] = [0, 1, 2]  # probes and zero-label subsampling are repeated per seed (mean ± std)


@dg.asset(
    partitions_def=variants_partitions,
    deps=[geojepa_checkpoint],
    code_version=EVALUATION_REPORT_CODE_VERSION,
    group_name="evaluation",
    kinds={"html", "mlflow"},
    description="The thesis tasks under the masked protocol (labels removed from the input), probes and baselines on "
                "spatial splits, measured kNN: report.html + metrics.json, also logged to the checkpoint's MLflow run.",
)
def evaluation_report(context: dg.AssetExecutionContext, config: EvaluationConfig, geojepa: GeojepaResource) -> dg.MaterializeResult:
    variant = context.partition_key
    result = build_report(variant, geojepa.store(), geojepa._settings(), seeds=tuple(config.seeds), log=context.log.info)
    ds = result.dataset
    return dataset_result(
        ds, {
            "report": dg.MetadataValue.path(str(ds.path / "report.html")),
            "metrics_json": dg.MetadataValue.path(str(ds.path / "metrics.json")),
            "model_version": dg.MetadataValue.text(result.metrics["model_version"]),
            "table": dg.MetadataValue.md(result.table_md),
            "knn": dg.MetadataValue.json(result.metrics["knn"]),
            "skipped": dg.MetadataValue.json(result.metrics["skipped"]),
            "mlflow_run_id": dg.MetadataValue.text(result.run_id or "none"),
        },
    )
