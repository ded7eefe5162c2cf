"""Read a YAML experiment file safely, with errors that name the file, and compose files with ``extends``."""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Any

import yaml

from ibcore.errors import ConfigError, ConfigIssue

MAX_FILE_BYTES = 5 * 1024 * 1024
MAX_NODES = 200_000  # after alias expansion: a config is small; a "billion laughs" file is not
MAX_DEPTH = 64
MAX_EXTENDED_FILES = 64  # files read to compose one config (each within the limits above)


_MERGE_TAG = "tag:yaml.org,2002:merge"


class _LimitedSafeLoader(yaml.SafeLoader):
    """SafeLoader (no Python object tags) for configs: refuses duplicate keys, binary values, alias
    bombs and huge documents early, and keeps date-like text as text. Merge keys (``<<: *base``) work as
    YAML says: a key written in the mapping overrides a merged one."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._composed = 0
        self._merged = 0
        self._flattened: set[yaml.Node] = set()

    def compose_node(self, parent: Any, index: Any) -> Any:
        # Count while composing, so a huge flat list is refused before it is built.
        self._composed += 1
        if self._composed > MAX_NODES:
            raise yaml.composer.ComposerError(
                None, None, f"the document has more than {MAX_NODES} values", self.peek_event().start_mark
            )
        return super().compose_node(parent, index)

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        """Resolve the merge keys of ``node`` (``<<: *base`` or ``<<: [*first, *second]``) as YAML 1.1 says: a key
        written in the mapping overrides a merged one, and an earlier mapping of a merged list a later one."""
        # Called on every mapping before its merged keys are used: the first call sees the keys as written.
        if node in self._flattened:
            return
        self._flattened.add(node)
        self._refuse_duplicates(node)
        sources: list[yaml.MappingNode] = []
        written = []
        for key_node, value_node in node.value:
            if key_node.tag != _MERGE_TAG:
                if key_node.tag == "tag:yaml.org,2002:value":
                    key_node.tag = "tag:yaml.org,2002:str"
                written.append((key_node, value_node))
                continue
            found = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
            for source in found:
                if not isinstance(source, yaml.MappingNode):
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"a merge key (<<) takes a mapping or a list of mappings, not a {source.id}",
                        source.start_mark,
                    )
                self.flatten_mapping(source)
                sources.append(source)
        if not sources:
            return
        # Merged pairs are copies: count them, so merging a big mapping into many others stays bounded.
        self._merged += sum(len(source.value) for source in sources)
        if self._composed + 2 * self._merged > MAX_NODES:
            raise yaml.constructor.ConstructorError(
                None, None, f"the document has more than {MAX_NODES} values (merge keys included)", node.start_mark
            )
        # The last of equal keys wins when the mapping is built: later sources first, the written keys last.
        node.value = [pair for source in reversed(sources) for pair in source.value] + written

    def _refuse_duplicates(self, node: yaml.MappingNode) -> None:
        seen: dict[Any, Any] = {}
        merges = 0
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                merges += 1
                if merges > 1:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark, "duplicate key '<<'", key_node.start_mark
                    )
                continue
            key = self.construct_object(key_node, deep=False)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: the base class reports it
                return
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, f"duplicate key {key!r}", key_node.start_mark
                )
            seen[key] = True

    def _refuse_binary(self, node: yaml.Node) -> Any:
        raise yaml.constructor.ConstructorError(None, None, "binary values (!!binary) are not allowed", node.start_mark)

    def _merge_as_text(self, node: yaml.Node) -> Any:
        return self.construct_scalar(node)  # type: ignore[arg-type]  # ``<<`` written as a value: plain text


# Dates stay strings (a config has no use for datetime objects, and an invalid date would crash);
# !!binary, !!set and !!omap are refused (no config value needs them).
_LimitedSafeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _tag in ("tag:yaml.org,2002:binary", "tag:yaml.org,2002:set", "tag:yaml.org,2002:omap", "tag:yaml.org,2002:pairs"):
    _LimitedSafeLoader.add_constructor(_tag, _LimitedSafeLoader._refuse_binary)
_LimitedSafeLoader.add_constructor(_MERGE_TAG, _LimitedSafeLoader._merge_as_text)


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


# --------------------------------------------------------------------------------------------
# Composition: ``extends``


@dataclasses.dataclass
class ComposedConfig:
    """A config mapping with every ``extends`` resolved, and the files it was composed from (the
    given file first, then its bases in the order they were read)."""

    data: dict[str, Any]
    files: list[Path]


def merge_configs(base: Any, override: Any) -> Any:
    """``override`` deep-merged over ``base``: mappings merge key by key, anything else (lists, scalars,
    null) replaces. A component mapping whose ``name`` changes replaces the base's whole, so the params
    of one component never leak into another."""
    if not (isinstance(base, dict) and isinstance(override, dict)):
        return copy.deepcopy(override)
    if "name" in base and "name" in override and base["name"] != override["name"]:
        return copy.deepcopy(override)
    merged = dict(base)
    for key, value in override.items():
        merged[key] = merge_configs(base[key], value) if key in base else copy.deepcopy(value)
    return merged


def _shown(path: Path) -> str:
    return os.path.normpath(str(path))


def _bases(raw: Any, source: str | None) -> list[tuple[str, str]]:
    """``(path as written, config path of the entry)`` for each file ``extends`` names."""
    if isinstance(raw, str):
        return [(raw, "extends")]
    if isinstance(raw, list) and raw and all(isinstance(item, str) for item in raw):
        return [(item, f"extends[{i}]") for i, item in enumerate(raw)]
    got = "an empty list" if raw == [] else f"a {type(raw).__name__}"
    message = f"expected a file path or a list of file paths (relative to this file), got {got}"
    raise ConfigError([ConfigIssue("extends", message)], source=source)


def _compose(path: Path, chain: tuple[Path, ...], files: list[Path]) -> dict[str, Any]:
    if len(files) >= MAX_EXTENDED_FILES:
        message = f"more than {MAX_EXTENDED_FILES} files are composed through extends"
        raise ConfigError([ConfigIssue("extends", message)], source=_shown(files[0]))
    files.append(path)
    return _extend(read_config_file(path), path, path.parent, chain, files)


def _extend(
    data: dict[str, Any], path: Path | None, folder: Path, chain: tuple[Path, ...], files: list[Path]
) -> dict[str, Any]:
    """``data`` (read from ``path``, or given as a mapping when ``path`` is None) over the files it extends."""
    if "extends" not in data:
        return data
    data = dict(data)
    source = _shown(path) if path is not None else None
    here = (*chain, path) if path is not None else chain
    composed: dict[str, Any] = {}
    for written, where in _bases(data.pop("extends"), source):
        target = folder / written
        if target.resolve() in {p.resolve() for p in here}:
            cycle = " → ".join(_shown(p) for p in (*here, target))
            raise ConfigError([ConfigIssue(where, f"{written!r} closes a cycle of extends: {cycle}")], source=source)
        if not target.is_file():
            what = "is a directory" if target.is_dir() else "does not exist"
            relative = "this file" if path is not None else "the working directory"
            message = f"{written!r}: the file {_shown(target)} {what} (extends paths are relative to {relative})"
            raise ConfigError([ConfigIssue(where, message)], source=source)
        composed = merge_configs(composed, _compose(target, here, files))
    merged: dict[str, Any] = merge_configs(composed, data)
    _check_size(merged, source or "<mapping>")
    return merged


def compose_config_file(path: str | Path) -> ComposedConfig:
    """Read ``path`` and every file it ``extends`` (recursively), deep-merged: the extending file wins.

    ``extends`` is a path, or a list of paths, relative to the file that names it; bases in a list are
    merged in order, each over the previous one, and the file itself over all of them. Each file is
    read like :func:`read_config_file` (safe loader, size limits); a cycle or a missing file is a
    :class:`ConfigError` at ``extends``.
    """
    files: list[Path] = []
    data = _compose(Path(path), (), files)
    return ComposedConfig(data, files)


def compose_mapping(data: dict[str, Any]) -> ComposedConfig:
    """A config given as a mapping, over the files its ``extends`` names (relative to the working directory)."""
    files: list[Path] = []
    composed = _extend(data, None, Path.cwd(), (), files)
    return ComposedConfig(composed, files)
