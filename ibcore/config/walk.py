"""The one walk over an experiment config that finds every component spec, its kind and its path.

It is derived from the schema: a field whose type is a :class:`ComponentSpec` subclass (alone, optional,
or in a list) holds a component of that class's ``component_kind``; a field whose type is another model
is walked into. It reads a raw mapping (validation: even when the rest of the config is broken) as well
as a validated :class:`Experiment` (preflight), so a new kind's config field is found by both.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterator, Mapping
from typing import Any

from pydantic import BaseModel

from ibcore.config.schema import ComponentSpec


def _members(annotation: Any) -> tuple[list[type[BaseModel]], bool]:
    """The model classes a field's annotation allows, and whether it is a list of them."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _members(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        found: list[type[BaseModel]] = []
        listed = False
        for arg in typing.get_args(annotation):
            models, is_list = _members(arg)
            found += models
            listed = listed or is_list
        return found, listed
    if origin is list:
        return _members(typing.get_args(annotation)[0])[0], True
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation], False
    return [], False


def _field(value: Any, name: str) -> Any:
    if isinstance(value, Mapping):
        return value.get(name)
    if isinstance(value, BaseModel):
        return getattr(value, name, None)
    return None


def component_specs(model: type[BaseModel], value: Any, path: str = "") -> Iterator[tuple[Any, str, str]]:
    """``(spec, kind, path)`` for every component spec in ``value`` (a mapping or an instance of ``model``).

    ``spec`` is what the config holds there (a raw mapping, a spec object, or a malformed value for the
    caller to report); fields that are absent or null yield nothing.
    """
    for name, field in model.model_fields.items():
        child = _field(value, name)
        if child is None:
            continue
        models, is_list = _members(field.annotation)
        specs = [m for m in models if issubclass(m, ComponentSpec) and m.component_kind is not None]
        nested = [m for m in models if not issubclass(m, ComponentSpec)]
        where = f"{path}.{name}" if path else name
        items = list(enumerate(child)) if is_list and isinstance(child, list) else [(None, child)]
        for index, item in items:
            item_path = where if index is None else f"{where}[{index}]"
            if specs:
                kind = specs[0].component_kind
                assert kind is not None
                yield item, kind, item_path
            elif nested:
                yield from component_specs(nested[0], item, item_path)
