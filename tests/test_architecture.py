"""The layering the code keeps: Dagster only in its thin layer, a pure core that knows nothing of the store.

Read from the source (every import statement, at any depth, relative ones resolved), so a lazy import
inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "geojepa_pipeline"
DAGSTER_LAYER = ("assets", "definitions", "cli")  # the only rooms that may import dagster
PURE_CORE = ("geo", "tokenizers", "model", "train", "evaluate")  # arrays, tables and paths in, arrays out
CORE_MAY_IMPORT = set(PURE_CORE) | {"columns", "errors", "progress"}  # leaf helpers with no store and no Dagster


def imports(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (``geojepa_pipeline.x.y`` for relative ones)."""
    return imports_of(path.read_text(), list(path.relative_to(PACKAGE.parent).parts[:-1]))


def imports_of(source: str, package: list[str]) -> set[str]:
    """Absolute names of every module ``source``, a module of ``package`` (its dotted parts), imports."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.add(module)
            if not node.module:  # from . import x: x is a module
                found |= {f"{module}.{a.name}" for a in node.names}
    return found


def modules() -> dict[str, set[str]]:
    """``{room: imports}``, the room being a module's path below the package (``geo/tiling``, ``cli``)."""
    return {p.relative_to(PACKAGE).with_suffix("").as_posix(): imports(p) for p in PACKAGE.rglob("*.py")}


def test_only_the_dagster_layer_imports_dagster():
    offenders = sorted(room for room, names in modules().items()
                       if room.split("/")[0] not in DAGSTER_LAYER and any(n == "dagster" or n.startswith("dagster.") for n in names))
    assert offenders == [], f"modules outside {DAGSTER_LAYER} import dagster: {offenders}"


def test_the_pure_core_imports_neither_the_store_nor_the_builders():
    offenders = {}
    for room, names in modules().items():
        if room.split("/")[0] not in PURE_CORE:
            continue
        ours = {n.split(".")[1] for n in names if n.startswith("geojepa_pipeline.") and n.count(".") >= 1}
        bad = sorted(ours - CORE_MAY_IMPORT) + sorted(n for n in names if n == "dagster" or n.startswith("dagster."))
        if bad:
            offenders[room] = bad
    assert offenders == {}, f"the pure core reaches outside itself: {offenders}"


def test_the_check_sees_a_violation():
    """The import reader resolves relative and lazy imports (a check that cannot fail checks nothing)."""
    names = imports_of("def f():\n    from ..store import Store\n    import dagster as dg\n    from . import tiling\n",
                       ["geojepa_pipeline", "geo"])
    assert {"geojepa_pipeline.store", "dagster", "geojepa_pipeline.geo.tiling"} <= names
