"""Read a YAML experiment file safely, with errors that name the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ibcore.errors import ConfigError, ConfigIssue

MAX_FILE_BYTES = 5 * 1024 * 1024
MAX_NODES = 200_000  # after alias expansion: a config is small; a "billion laughs" file is not
MAX_DEPTH = 64


class _LimitedSafeLoader(yaml.SafeLoader):
    """SafeLoader (no Python object tags) for configs: refuses duplicate keys, binary values, alias
    bombs and huge documents early, and keeps date-like text as text."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._composed = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        # Count while composing, so a huge flat list is refused before it is built.
        self._composed += 1
        if self._composed > MAX_NODES:
            raise yaml.composer.ComposerError(
                None, None, f"the document has more than {MAX_NODES} values", self.peek_event().start_mark
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: the base class reports it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, f"duplicate key {key!r}", key_node.start_mark
                )
            seen[key] = True
        return super().construct_mapping(node, deep=deep)

    def _refuse_binary(self, node: yaml.Node) -> Any:
        raise yaml.constructor.ConstructorError(None, None, "binary values (!!binary) are not allowed", node.start_mark)


# Dates stay strings (a config has no use for datetime objects, and an invalid date would crash);
# !!binary, !!set and !!omap are refused (no config value needs them).
_LimitedSafeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _tag in ("tag:yaml.org,2002:binary", "tag:yaml.org,2002:set", "tag:yaml.org,2002:omap", "tag:yaml.org,2002:pairs"):
    _LimitedSafeLoader.add_constructor(_tag, _LimitedSafeLoader._refuse_binary)


def _check_size(value: Any, source: str) -> None:
    """Refuse documents that expand to too many values or nest too deeply.

    Aliases share one constructed object, so a "billion laughs" file is small for the loader and
    huge for anything that walks it: count every value reached, stopping at the first excess.
    """
    stack = [(value, 1)]
    seen = 0
    while stack:
        item, depth = stack.pop()
        seen += 1
        if seen > MAX_NODES:
            raise ConfigError(
                [ConfigIssue("", f"the document expands to more than {MAX_NODES} values (alias bomb?)")], source=source
            )
        if depth > MAX_DEPTH:
            raise ConfigError([ConfigIssue("", f"the YAML is nested more than {MAX_DEPTH} levels deep")], source=source)
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
            stack.extend((k, depth + 1) for k in item if isinstance(k, (tuple, list)))
        elif isinstance(item, (list, tuple)):
            stack.extend((v, depth + 1) for v in item)


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML ``text`` (from ``source``) with the safe loader; raise ConfigError on failure."""
    try:
        loader = _LimitedSafeLoader(text)
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        if "could not determine a constructor" in str(exc):
            problem = "YAML tags that construct Python objects are not allowed (safe loader)"
        raise ConfigError([ConfigIssue("", f"not valid YAML{where}: {problem}")], source=source) from None
    except RecursionError:
        raise ConfigError([ConfigIssue("", "the YAML is nested too deeply")], source=source) from None
    except (ValueError, OverflowError) as exc:  # e.g. an integer longer than Python's digit limit
        raise ConfigError([ConfigIssue("", f"not valid YAML: {exc}")], source=source) from None
    _check_size(data, source)
    return data


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read an experiment mapping from ``path``: UTF-8 YAML whose top level is a mapping."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise ConfigError([ConfigIssue("", f"config file {what}")], source=source)
    if path.stat().st_size > MAX_FILE_BYTES:
        raise ConfigError([ConfigIssue("", f"config file is larger than {MAX_FILE_BYTES // 1024} KiB")], source=source)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [ConfigIssue("", f"config file is not UTF-8 text (byte {exc.start} is invalid)")], source=source
        ) from None
    data = parse_yaml(text, source)
    if data is None:
        raise ConfigError([ConfigIssue("", "config file is empty; expected a mapping with data and runs")], source)
    if not isinstance(data, dict):
        raise ConfigError(
            [ConfigIssue("", f"the top level must be a mapping (key: value), not a {type(data).__name__}")], source
        )
    return data
