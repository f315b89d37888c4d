"""NAIP scenes from a STAC API: search, keep the newest acquisition per area, download the 4-band asset.

The default endpoint is the Planetary Computer STAC API, whose asset URLs must be signed
(``planetary-computer``); any other endpoint is used as is. Downloads stream to a temporary
file with a sha256 and are renamed into place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import shapely
from shapely.geometry import box, shape

from ..errors import GeojepaError
from ..progress import Progress

PLANETARY_COMPUTER_STAC = "https://planetarycomputer.microsoft.com/api/stac/v1"
NAIP_COLLECTION = "naip"
ASSET_KEYS = ("image", "data", "visual")  # NAIP's 4-band COG is "image" on the Planetary Computer
_MIN_NEW_AREA = 0.01  # an item must add >= 1 % of its footprint (in the bbox) to be kept


@dataclass(frozen=True)
class StacScene:
    item_id: str
    acquired: str | None  # ISO date
    href: str
    footprint_lonlat: tuple[float, float, float, float]


def is_planetary_computer(endpoint: str) -> bool:
    return urlparse(endpoint).netloc.endswith("planetarycomputer.microsoft.com")


def search_naip(
    endpoint: str, bbox_lonlat: tuple[float, float, float, float], year: int | None = None,
    collection: str = NAIP_COLLECTION, log: Callable[[str], None] | None = None,
) -> list[StacScene]:
    """Items of ``collection`` over ``bbox_lonlat`` (west, south, east, north), newest acquisition per area.

    Items are taken newest first; an item is kept only where it adds area (>= 1 % of its
    footprint inside the bbox) that newer kept items do not already cover.
    """
    import pystac_client
    from pystac_client.exceptions import APIError

    modifier = None
    if is_planetary_computer(endpoint):
        import planetary_computer

        modifier = planetary_computer.sign_inplace
    try:
        client = pystac_client.Client.open(endpoint, modifier=modifier)
        search = client.search(
            collections=[collection], bbox=list(bbox_lonlat),
            datetime=f"{year}-01-01/{year}-12-31" if year else None, max_items=2000,
            method="GET",  # item-search requires GET; POST is optional
        )
        items = list(search.items())
    except APIError as exc:
        raise GeojepaError(f"STAC search at {endpoint} failed: {str(exc).splitlines()[0][:200]}") from None
    except Exception as exc:  # connection errors surface as requests / pystac errors
        raise GeojepaError(f"cannot search STAC API {endpoint} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); check the endpoint and network") from None
    if log:
        log(f"STAC {endpoint}: {len(items)} {collection} item(s) over {tuple(round(v, 4) for v in bbox_lonlat)}")
    area = box(*bbox_lonlat)
    items.sort(key=lambda it: (it.datetime.isoformat() if it.datetime else "", it.id), reverse=True)
    covered = shapely.Polygon()
    kept: list[StacScene] = []
    for item in items:
        asset = next((item.assets[k] for k in ASSET_KEYS if k in item.assets), None)
        if asset is None:
            continue
        footprint = shape(item.geometry).intersection(area) if item.geometry else area
        if footprint.is_empty or footprint.difference(covered).area < _MIN_NEW_AREA * footprint.area:
            continue
        covered = covered.union(footprint)
        kept.append(StacScene(item.id, item.datetime.date().isoformat() if item.datetime else None,
                              asset.get_absolute_href() or asset.href, tuple(shape(item.geometry).bounds) if item.geometry else bbox_lonlat))
    return kept


def download_asset(href: str, dest: Path, log: Callable[[str], None] | None = None) -> str:
    """Download (or copy a local ``file://``/path href) to ``dest`` atomically; return its sha256."""
    from .sources import stream_uri

    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    progress = Progress(f"download {href.split('?')[0]}", log=log, unit=2**20, unit_name=" MiB")
    try:
        with open(tmp, "wb") as out:
            sha = stream_uri(href, out, progress, what="STAC asset")
        progress.finish()
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return sha

