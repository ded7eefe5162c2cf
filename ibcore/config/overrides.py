"""``--set path=value`` overrides, applied to the raw mapping before validation."""

from __future__ import annotations

import copy
import re
from typing import Any

from ibcore.config.loading import parse_yaml
from ibcore.errors import ConfigError, ConfigIssue

_TOKEN = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _tokens(path: str) -> list[str | int]:
    tokens: list[str | int] = []
    position = 0
    for match in _TOKEN.finditer(path):
        between = path[position : match.start()].strip(".")
        if between:
            raise ValueError(f"cannot parse {path!r}")
        tokens.append(match.group(1) if match.group(1) is not None else int(match.group(2)))
        position = match.end()
    if not tokens or path[position:].strip("."):
        raise ValueError(f"cannot parse {path!r}")
    return tokens


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> tuple[dict[str, Any], list[ConfigIssue]]:
    """Return a copy of ``data`` with every ``a.b[0].c=value`` applied, and the overrides that failed.

    Values are parsed as YAML scalars/flow collections (``5``, ``0.1``, ``[160, 180]``, ``null``), with the
    safe loader and limits of config files: duplicate keys, ``!!binary`` and Python tags are refused, at the
    path the override sets. ``runs.NAME`` selects the run called NAME (as well as ``runs[1]``).
    """
    data = copy.deepcopy(data)
    issues: list[ConfigIssue] = []
    for override in overrides:
        where = f"--set {override}"
        if "=" not in override:
            issues.append(ConfigIssue(where, "expected PATH=VALUE, e.g. trainer.epochs=5"))
            continue
        path, raw_value = override.split("=", 1)
        try:
            tokens = _tokens(path.strip())
        except ValueError as exc:
            issues.append(ConfigIssue(where, f"cannot parse override: {exc}"))
            continue
        try:
            value = parse_yaml(raw_value, source="--set") if raw_value.strip() else ""
        except ConfigError as exc:
            problem = "; ".join(issue.message for issue in exc.issues)
            issues.append(ConfigIssue(path.strip(), f"cannot parse override (the --set value): {problem}"))
            continue
        node: Any = data
        for i, token in enumerate(tokens):
            last = i == len(tokens) - 1
            if isinstance(node, list) and isinstance(token, str) and tokens[i - 1] == "runs" and i > 0:
                matches = [r for r in node if isinstance(r, dict) and r.get("name") == token]
                if not matches:
                    names = [r.get("name") for r in node if isinstance(r, dict)]
                    issues.append(ConfigIssue(where, f"no run named {token!r}; runs are {names}"))
                    break
                token = node.index(matches[0])
            if isinstance(node, list):
                if not isinstance(token, int) or not -len(node) <= token < len(node):
                    issues.append(ConfigIssue(where, f"index {token!r} is out of range (length {len(node)})"))
                    break
            elif isinstance(node, dict):
                if isinstance(token, int):
                    issues.append(ConfigIssue(where, f"{path}: [{token}] used on a mapping"))
                    break
            else:
                issues.append(ConfigIssue(where, f"cannot set {token!r} inside the value {node!r}"))
                break
            if last:
                node[token] = value
            else:
                if isinstance(node, dict) and (token not in node or node[token] is None):
                    node[token] = {}
                node = node[token]
    return data, issues
