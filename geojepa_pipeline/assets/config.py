"""Asset configs derived from the dataclasses that declare each setting once (in the stages and the core).

``config_from("CheckpointConfig", TrainConfig, CheckpointOptions, Holdout)`` is a ``dg.Config`` with those
dataclasses' fields, types and defaults; ``values_for(TrainConfig, config)`` reads one dataclass back out
of a run's config. A setting's default and comment live only in its dataclass.
"""

from __future__ import annotations

import dataclasses
import typing

import dagster as dg
import pydantic


def _fields(dc: type, exclude: tuple[str, ...]) -> dict[str, tuple[type, typing.Any]]:
    hints = typing.get_type_hints(dc)
    out = {}
    for f in dataclasses.fields(dc):
        if f.name in exclude:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out[f.name] = (hints[f.name], default)
    return out


def config_from(name: str, *dataclasses_: type, exclude: tuple[str, ...] = (), doc: str = "") -> type[dg.Config]:
    """A ``dg.Config`` class named ``name`` with the fields of ``dataclasses_`` (minus ``exclude``), in order."""
    fields: dict = {}
    for dc in dataclasses_:
        for key, spec in _fields(dc, exclude).items():
            if key in fields:
                raise TypeError(f"{name}: field {key!r} is declared by two dataclasses")
            fields[key] = spec
    sources = ", ".join(dc.__name__ for dc in dataclasses_)
    return pydantic.create_model(name, __base__=dg.Config, __doc__=doc or f"Fields of {sources} (declared there).", **fields)


def values_for(dc: type, config: dg.Config, **extra):
    """``dc`` built from the config's fields that ``dc`` declares (its other fields keep their defaults), plus ``extra``."""
    names = {f.name for f in dataclasses.fields(dc)}
    given = {k: v for k, v in config.model_dump().items() if k in names}
    return dc(**{**given, **extra})
