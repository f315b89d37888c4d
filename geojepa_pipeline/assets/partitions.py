"""The ``regions`` dynamic partitions and their sync with ``regions.yaml``."""

from __future__ import annotations

import dagster as dg

regions_partitions = dg.DynamicPartitionsDefinition(name="regions")


def sync_region_partitions(instance: dg.DagsterInstance, region_names) -> tuple[list[str], list[str]]:
    """Make the instance's ``regions`` partitions equal to ``region_names``; return (added, removed)."""
    wanted = set(region_names)
    existing = set(instance.get_dynamic_partitions(regions_partitions.name))
    added, removed = sorted(wanted - existing), sorted(existing - wanted)
    if added:
        instance.add_dynamic_partitions(regions_partitions.name, added)
    for name in removed:
        instance.delete_dynamic_partition(regions_partitions.name, name)
    return added, removed


def partition_requests(registry_names, existing) -> list:
    """Dynamic-partition requests that turn ``existing`` into ``registry_names`` (for sensors)."""
    wanted, existing = set(registry_names), set(existing)
    requests = []
    if wanted - existing:
        requests.append(regions_partitions.build_add_request(sorted(wanted - existing)))
    if existing - wanted:
        requests.append(regions_partitions.build_delete_request(sorted(existing - wanted)))
    return requests
