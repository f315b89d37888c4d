"""``evaluation_report[variant]``: probes, baselines and kNN on the checkpoint; a thin wrapper over ``stages.evaluation``."""


import dagster as dg

from ..geo.splits import Holdout
from ..stages.evaluation import ReportOptions, build_report
from ..geo.render import png_markdown
from ..store import METRICS_FILE, REPORT_FILE
from .config import config_from
from .results import dataset_result
from .resources import GeojepaResource
from .training import geojepa_checkpoint, variants_partitions

EVALUATION_REPORT_CODE_VERSION = "2"  # 2: entity masking, one split, controls, transfer


EvaluationConfig = config_from("EvaluationConfig", ReportOptions, Holdout)


@dg.asset(
    partitions_def=variants_partitions,
    deps=[geojepa_checkpoint],
    code_version=EVALUATION_REPORT_CODE_VERSION,
    group_name="evaluation",
    kinds={"html", "mlflow"},
    description="The thesis tasks under the masked protocol (the label's entities removed from every modality), probes, "
                "untrained controls and baselines on the training split's test tiles and on held-out regions, measured "
                "kNN: report.html + metrics.json, also logged to the checkpoint's MLflow run.",
)
def evaluation_report(context: dg.AssetExecutionContext, config: EvaluationConfig, geojepa: GeojepaResource) -> dg.MaterializeResult:
    variant = context.partition_key
    result = build_report(variant, geojepa.store(), geojepa._settings(), seeds=tuple(config.seeds),
                          holdout_regions=list(config.holdout_regions), log=context.log.info)
    ds, metrics, pictures = result.dataset, result.metrics, result.pictures
    meta = {
        "report": dg.MetadataValue.path(str(ds.file(REPORT_FILE))),
        "metrics_json": dg.MetadataValue.path(str(ds.file(METRICS_FILE))),
        "model_version": dg.MetadataValue.text(metrics["model_version"]),
        "table": dg.MetadataValue.md(result.table_md),
        "protocol": dg.MetadataValue.json({k: v for k, v in metrics["protocol"].items() if k != "masked_input"}),
        "knn": dg.MetadataValue.md("| kNN label | ratio to random | untrained model | tiles |\n| --- | --- | --- | --- |\n" + "\n".join(
            f"| {t} | {v['ratio']:.3f} | {v.get('random_init_ratio', float('nan')):.3f} | {v['n']} |" for t, v in metrics["knn"].items())),
        "skipped": dg.MetadataValue.json(metrics["skipped"]),
        "curves": dg.MetadataValue.md("\n\n".join(png_markdown(pictures[k], k) for k in ("loss", "target_std_mean", "rankme", "probe_building_r2")
                                                  if k in pictures)),
        "embedding_map": dg.MetadataValue.md(png_markdown(pictures["map"], "PaCMAP of the tile embeddings")),
        "split_maps": dg.MetadataValue.md("\n\n".join(png_markdown(v, k) for k, v in pictures.items() if k.startswith("split_map/"))),
        "mlflow_run_id": dg.MetadataValue.text(result.run_id or "none"),
    }
    if result.transfer_md:
        meta["transfer_table"] = dg.MetadataValue.md(result.transfer_md)
    return dataset_result(ds, meta)
