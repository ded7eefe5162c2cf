"""``grid:`` in a run: one run per combination of the values it lists, named ``cb_focal[beta=0.99,gamma=1]``.

Expanded on the raw config, before validation, so every combination is checked like any run (an issue's path
names the combination: ``runs[1][gamma=2].loss.params.gamma``), trains with the others (fused where it can) and is
written out expanded in config.yaml, which ``ib resume`` reads as it is.
"""

from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Mapping
from typing import Any

from ibcore.errors import ConfigIssue

MAX_COMBINATIONS = 1000
_SEGMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)((?:\[\d+\])*)$")
# Fields a run inherits from `defaults`: a grid over loss.params.gamma of a run without its own loss starts from
# the default loss.
_INHERITED = ("backbone", "loss", "optimizer", "sampler", "mixer", "step", "augmentation")


def _parse(path: str) -> list[str | int] | None:
    """``stages[0].from_epoch`` -> ["stages", 0, "from_epoch"]; None when it is not a path."""
    parts: list[str | int] = []
    for segment in path.split("."):
        match = _SEGMENT.match(segment)
        if match is None:
            return None
        parts.append(match.group(1))
        parts += [int(index) for index in re.findall(r"\[(\d+)\]", match.group(2))]
    return parts


def _set(run: dict[str, Any], parts: list[str | int], value: Any, defaults: Mapping[str, Any]) -> str | None:
    """Set ``value`` at ``parts`` in ``run`` (creating mappings on the way); why not, or None."""
    if parts[0] in _INHERITED and parts[0] not in run and isinstance(defaults.get(parts[0]), Mapping):
        run[str(parts[0])] = copy.deepcopy(dict(defaults[parts[0]]))
    node: Any = run
    for depth, part in enumerate(parts[:-1]):
        following = parts[depth + 1]
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                return f"there is no item {part} (the run has {len(node) if isinstance(node, list) else 0})"
            node = node[part]
            continue
        if not isinstance(node, dict):
            return f"{part!r} is inside a value that is not a mapping"
        if node.get(part) is None:
            if isinstance(following, int):
                return f"the run has no {part!r} list to index"
            node[part] = {}
        node = node[part]
    last = parts[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            return f"there is no item {last} to set"
        node[last] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        return f"{last!r} is inside a value that is not a mapping"
    return None


def _labels(paths: list[str]) -> list[str]:
    """Short labels for the grid's paths: the last name, or the whole path where two last names clash."""
    short = [path.rsplit(".", 1)[-1] for path in paths]
    return [s if short.count(s) == 1 else path for s, path in zip(short, paths, strict=True)]


def _text(value: Any) -> str:
    """A value as it appears in a run's name (characters a name cannot hold become '_')."""
    return re.sub(r"[^A-Za-z0-9_.\-+]", "_", str(value).replace(" ", ""))


def expand_grids(data: dict[str, Any]) -> tuple[dict[str, Any], list[ConfigIssue], dict[int, str]]:
    """The config with every ``grid:`` expanded, the issues found doing it, and for each expanded run's index
    the path prefix that names it in messages (``runs[1][gamma=2]``)."""
    runs = data.get("runs")
    if not isinstance(runs, list) or not any(isinstance(r, Mapping) and r.get("grid") is not None for r in runs):
        return data, [], {}
    found = data.get("defaults")
    defaults: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
    issues: list[ConfigIssue] = []
    expanded: list[Any] = []
    origins: dict[int, str] = {}
    for i, run in enumerate(runs):
        if not (isinstance(run, Mapping) and run.get("grid") is not None):
            origins[len(expanded)] = f"runs[{i}]"
            expanded.append(run)
            continue
        grid = run["grid"]
        where = f"runs[{i}].grid"
        if not isinstance(grid, Mapping) or not grid:
            issues.append(
                ConfigIssue(where, "must map param paths to lists of values, e.g. {loss.params.gamma: [1, 2]}")
            )
            continue
        paths, values, bad = [], [], False
        for path, options in grid.items():
            parts = _parse(str(path)) if isinstance(path, str) else None
            if parts is None or parts[0] in ("name", "grid", "seeds"):
                issues.append(ConfigIssue(f"{where}.{path}", "is not a param path of the run, e.g. loss.params.gamma"))
                bad = True
            elif not isinstance(options, list) or not options:
                issues.append(ConfigIssue(f"{where}.{path}", "needs a non-empty list of values"))
                bad = True
            else:
                paths.append(str(path))
                values.append(options)
        count = 1
        for options in values:
            count *= len(options)
        if count > MAX_COMBINATIONS:
            issues.append(ConfigIssue(where, f"{count} combinations; at most {MAX_COMBINATIONS} runs per grid"))
            continue
        if bad:
            continue
        labels = _labels(paths)
        for combination in itertools.product(*values):
            member = {k: copy.deepcopy(v) for k, v in run.items() if k != "grid"}
            label = ",".join(f"{label}={_text(value)}" for label, value in zip(labels, combination, strict=True))
            problems = [
                (path, _set(member, _parse(path) or [], copy.deepcopy(value), defaults))
                for path, value in zip(paths, combination, strict=True)
            ]
            failed = [(path, why) for path, why in problems if why is not None]
            for path, why in failed:
                issues.append(ConfigIssue(f"{where}.{path}", f"cannot be set in run {run.get('name')!r}: {why}"))
            if failed:
                break
            member["name"] = f"{run.get('name')}[{label}]"
            origins[len(expanded)] = f"runs[{i}][{label}]"
            expanded.append(member)
    return {**data, "runs": expanded}, issues, origins


def rename_paths(issues: list[ConfigIssue], origins: dict[int, str]) -> list[ConfigIssue]:
    """Issues at ``runs[k]...`` of the expanded config, named after the run of the file (and its combination)."""
    if not origins:
        return issues
    renamed = []
    for issue in issues:
        match = re.match(r"^runs\[(\d+)\]", issue.path)
        if match and int(match.group(1)) in origins:
            issue = ConfigIssue(origins[int(match.group(1))] + issue.path[match.end() :], issue.message)
        renamed.append(issue)
    return renamed
