"""Turn pydantic validation errors into :class:`ConfigIssue` objects with readable paths."""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError

from ibcore.errors import ConfigIssue


def format_path(loc: Sequence[Any], prefix: str = "") -> str:
    """``('runs', 1, 'loss', 'params', 'gamma')`` → ``runs[1].loss.params.gamma``."""
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside ``Optional[M]``, ``list[M]``, ``dict[str, M]`` (first one found)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _model_in(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType, list, tuple, dict, Sequence):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None


def _fields_at(model: type[BaseModel] | None, loc: Sequence[Any]) -> list[str]:
    """Field names of the model reached by walking ``loc`` from ``model`` (empty when unknown)."""
    current = model
    for part in loc:
        if current is None:
            return []
        if isinstance(part, int) or part not in current.model_fields:
            continue  # list index, dict key or union tag: stay on the element model
        current = _model_in(current.model_fields[part].annotation)
    return list(current.model_fields) if current is not None else []


def _message(error: Any, model: type[BaseModel] | None) -> str:
    kind = error["type"]
    loc = error["loc"]
    if kind == "extra_forbidden":
        key = str(loc[-1])
        allowed = _fields_at(model, loc[:-1])
        close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
        if close:
            hint = f"; did you mean {close[0]!r}?"
        else:
            hint = f"; allowed keys: {', '.join(allowed)}" if allowed else ""
        return f"unknown key {key!r}{hint}"
    if kind == "missing":
        return "required field is missing"
    message = str(error["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if "input" in error and kind not in ("missing",) and not isinstance(error["input"], (dict, list, tuple)):
        shown = repr(error["input"])
        if len(shown) > 60:
            shown = shown[:57] + "..."
        message += f" (got {shown})"
    return message


_NO_INPUT = object()


def _user_loc(loc: Sequence[Any], root: Any) -> list[Any]:
    """The parts of a pydantic location that index the user's input.

    Pydantic adds the tags of unions (``list[float]``, ``effective_number``) and validator names to a
    location; they mean nothing to a user reading their YAML. Walking the input tells them apart from
    real keys, including keys that contain ``[``.
    """
    if root is _NO_INPUT:
        return [p for p in loc if not (isinstance(p, str) and ("[" in p or p.startswith("function-")))]
    kept: list[Any] = []
    node = root
    for i, part in enumerate(loc):
        following = loc[i + 1] if i + 1 < len(loc) else None
        if isinstance(node, Mapping) and part in node:
            kept.append(part)
            node = node[part]
        elif isinstance(node, (list, tuple)) and isinstance(part, int) and 0 <= part < len(node):
            kept.append(part)
            node = node[part]
        elif isinstance(part, str) and following is not None and _indexes(node, following):
            continue  # a union tag or validator name between two real parts
        elif isinstance(part, str) and (
            part.startswith("function-")
            or ("[" in part and not isinstance(node, Mapping))
            or isinstance(node, (list, tuple))  # a list is not indexed by a name: the union tag it matched
        ):
            continue
        else:
            kept.append(part)  # a missing key, or a value pydantic looked into: keep it and stop walking
            node = None
    return kept


def _indexes(node: Any, part: Any) -> bool:
    if isinstance(node, Mapping):
        return part in node
    return isinstance(node, (list, tuple)) and isinstance(part, int) and 0 <= part < len(node)


def issues_from_validation_error(
    exc: ValidationError, prefix: str = "", model: type[BaseModel] | None = None, root: Any = _NO_INPUT
) -> list[ConfigIssue]:
    """One :class:`ConfigIssue` per pydantic error, with paths under ``prefix``.

    ``root`` is the validated input; with it, paths keep exactly the keys the user wrote.
    """
    issues = []
    for error in exc.errors():
        loc = _user_loc(error["loc"], root)
        message = _message({**error, "loc": tuple(loc) or ("<root>",)}, model)
        issues.append(ConfigIssue(format_path(loc, prefix), message))
    return issues
