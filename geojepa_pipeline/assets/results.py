"""What every dataset asset returns: the store's data version (Dagster's too), its path, then the asset's own metadata."""


import dagster as dg


def dataset_metadata(ds, metadata: dict) -> dict:
    """The committed store dataset ``ds``'s (``store.Dataset``) version and path, then ``metadata``."""
    return {"data_version": dg.MetadataValue.text(ds.data_version), "path": dg.MetadataValue.path(str(ds.path)), **metadata}


def dataset_result(ds, metadata: dict, check_results: list | None = None) -> dg.MaterializeResult:
    """A ``MaterializeResult`` for the committed store dataset ``ds`` (``store.Dataset``)."""
    return dg.MaterializeResult(data_version=dg.DataVersion(ds.data_version), metadata=dataset_metadata(ds, metadata),
                                check_results=check_results)
