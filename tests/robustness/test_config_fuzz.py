"""Broken configs by the thousand: every one is a ConfigError with a path, never another exception.

Property tests mutate the valid base config of ``_support`` (a value replaced by garbage, a key
deleted, renamed or added, a number pushed out of range), feed raw bytes and mutated YAML text to
``ib validate``, and build oversized or deeply nested YAML. Each example must be refused (or accepted)
within the hypothesis deadline. The number of examples each property ran is printed at the end of the
session and recorded in docs/reliability.md.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from _support import base_config, count_example, fuzz_settings, no_traceback
from hypothesis import assume, given
from hypothesis import strategies as st

import ibcore
from ibcore.config.errors import format_path
from ibcore.config.loading import MAX_FILE_BYTES, MAX_NODES, _LimitedSafeLoader
from ibcore.errors import ConfigError, ConfigIssue

Path_ = tuple[str | int, ...]


def node_paths(node: Any, prefix: Path_ = ()) -> Iterator[Path_]:
    """Every path below ``node`` (mapping keys and list indices), parents before children."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield prefix + (key,)
            yield from node_paths(value, prefix + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield prefix + (index,)
            yield from node_paths(value, prefix + (index,))


def value_at(node: Any, path: Path_) -> Any:
    for part in path:
        node = node[part]
    return node


def dotted(path: Path_) -> str:
    return format_path(path)


BASE_PATHS = list(node_paths(base_config()))
MAPPING_PATHS = [()] + [p for p in BASE_PATHS if isinstance(value_at(base_config(), p), dict)]
SCALAR_PATHS = [p for p in BASE_PATHS if not isinstance(value_at(base_config(), p), (dict, list))]
CONTAINER_PATHS = [p for p in BASE_PATHS if isinstance(value_at(base_config(), p), (dict, list))]


def in_class_weights(path: Path_) -> bool:
    return "class_weights" in path


# Keys with "[" or a "function-" prefix are left out of the general properties: pydantic uses such strings
# for union tags, and test_a_key_with_a_bracket_is_reported_not_a_crash covers them on their own.
safe_keys = st.text(min_size=1, max_size=10).filter(lambda k: "[" not in k and not k.startswith("function-"))
names = st.sampled_from(
    ["cross_entropy", "focal", "mnist_lt", "small_cnn", "sgd", "os:system", "ibcore:focal", "", " ", "nan"]
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | names
)
garbage = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(safe_keys | st.integers(), children, max_size=4),
    max_leaves=12,
)


@st.composite
def mutated_configs(draw: st.DrawFn) -> dict[str, Any]:
    """The base config after one to three random edits: replace a value, delete, misspell or add a key."""
    data = base_config()
    for _ in range(draw(st.integers(1, 3))):
        paths = list(node_paths(data))
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent, key = value_at(data, path[:-1]), path[-1]
        operation = draw(st.sampled_from(["replace", "delete", "misspell", "add"]))
        if operation == "replace":
            parent[key] = draw(garbage)
        elif operation == "delete":
            del parent[key]
        elif operation == "misspell" and isinstance(key, str):
            parent[key + draw(st.sampled_from(["s", "_", "x"]))] = parent.pop(key)
        elif operation == "add":
            target = parent[key]
            if isinstance(target, dict):
                target[draw(safe_keys)] = draw(garbage)
            elif isinstance(target, list):
                target.append(draw(garbage))
    return data


def assert_well_formed(error: ConfigError) -> None:
    assert error.issues, "a ConfigError must carry at least one issue"
    for issue in error.issues:
        assert isinstance(issue, ConfigIssue)
        assert isinstance(issue.path, str) and isinstance(issue.message, str) and issue.message.strip()
    assert str(error).splitlines()[0].endswith(":")  # renders without raising


def issues_of(data: Any) -> list[ConfigIssue]:
    """The issues of ``data``; fails the test on any exception other than ConfigError."""
    try:
        ibcore.load_experiment(data)
    except ConfigError as error:
        assert_well_formed(error)
        return error.issues
    return []


@pytest.fixture(scope="module", autouse=True)
def _warm_registry() -> None:
    """Import the built-in plugin modules once, so the first example does not pay for it against the deadline."""
    assert ibcore.validate(base_config()) == []


# --------------------------------------------------------------------------------------------
# Mutations of the mapping


@fuzz_settings(2000)
@given(mutated_configs())
def test_any_mutation_is_valid_or_a_config_error(data: dict[str, Any]) -> None:
    count_example("config: any mutation (1-3 edits) -> valid or ConfigError")
    issues = issues_of(copy.deepcopy(data))
    assert ibcore.validate(data) == issues  # the non-raising API agrees
    assert all(issue.path for issue in issues), issues  # the document is a mapping: every issue has a place


@fuzz_settings(300)
@given(mutated_configs())
def test_ib_validate_exits_1_exactly_for_a_broken_config(
    ib_cli: Callable[..., Any], tmp_path: Path, data: dict[str, Any]
) -> None:
    count_example("ib validate: any mutation written as YAML -> exit 1 iff ConfigError, every issue counted")
    path = tmp_path / "mutated.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    issues = issues_of(path)
    result = ib_cli("validate", str(path))
    assert result.rc == (1 if issues else 0) and no_traceback(result.output), result.output
    if issues:
        assert f"{len(issues)} error{'s' if len(issues) > 1 else ''} in {path}" in result.output


@fuzz_settings(400)
@given(st.sampled_from(MAPPING_PATHS), st.from_regex(r"[a-z][a-z_]{0,10}", fullmatch=True))
def test_an_unknown_key_is_reported_at_its_path(path: Path_, stem: str) -> None:
    count_example("config: unknown key added to any mapping -> issue at its path naming the key")
    data = base_config()
    key = stem + "_zq"  # no field of any model ends in _zq
    value_at(data, path)[key] = 1
    where = dotted(path + (key,))
    issues = issues_of(data)
    # at its path, or (for a class_weights mapping, checked as one value) at the mapping that holds it
    assert any(where.startswith(issue.path) and key in issue.message for issue in issues), (where, issues)


@fuzz_settings(400)
@given(st.data())
def test_a_value_of_the_wrong_type_is_reported_at_its_path(data: st.DataObject) -> None:
    count_example("config: scalar <-> container type swap -> issue at its path")
    config = base_config()
    if data.draw(st.booleans(), label="replace a scalar"):
        path = data.draw(st.sampled_from([p for p in SCALAR_PATHS if not in_class_weights(p)]), label="path")
        wrong: Any = data.draw(st.lists(garbage, max_size=3) | st.dictionaries(safe_keys, garbage, min_size=1))
    else:
        path = data.draw(st.sampled_from([p for p in CONTAINER_PATHS if not in_class_weights(p)]), label="path")
        wrong = data.draw(st.integers() | st.text(min_size=1) | st.booleans() | st.floats())
    value_at(config, path[:-1])[path[-1]] = wrong
    where = dotted(path)
    issues = issues_of(config)
    assert any(where.startswith(issue.path) or issue.path.startswith(where) for issue in issues), (where, issues)


# (path, lowest valid, highest valid, integer?) of numbers the schema or a built-in's params bound
NUMERIC_FIELDS: list[tuple[Path_, float | None, float | None, bool]] = [
    (("seed",), 0, 2**32 - 1, True),
    (("data", "batch_size"), 1, 2**20, True),
    (("trainer", "epochs"), 1, 100_000, True),
    (("trainer", "eval_every"), 1, None, True),
    (("trainer", "checkpoint_every"), 1, None, True),
    (("trainer", "keep_checkpoints"), 1, 1000, True),
    (("data", "dataset", "params", "imbalance_ratio"), 1.0, None, False),
    (("data", "dataset", "params", "test_per_class"), 1, 499, True),
    (("runs", 1, "loss", "params", "gamma"), 0.0, None, False),
    (("runs", 1, "stages", 0, "from_epoch"), 1, 3, True),
    (("defaults", "optimizer", "params", "momentum"), 0.0, None, False),
]


@fuzz_settings(400)
@given(st.sampled_from(NUMERIC_FIELDS), st.data())
def test_an_out_of_range_number_is_reported_at_its_path(
    field: tuple[Path_, float | None, float | None, bool], data: st.DataObject
) -> None:
    count_example("config: out-of-range number -> issue at its exact path")
    path, low, high, integer = field
    outside = []
    if low is not None:
        outside.append(
            st.integers(max_value=int(math.ceil(low)) - 1) if integer else st.floats(max_value=low, exclude_max=True)
        )
    if high is not None:
        outside.append(st.integers(min_value=int(high) + 1) if integer else st.floats(min_value=high, exclude_min=True))
    if not integer:
        outside.append(st.just(math.nan))
    value = data.draw(st.one_of(outside), label="value")
    config = base_config()
    value_at(config, path[:-1])[path[-1]] = value
    where = dotted(path)
    assert where in [issue.path for issue in issues_of(config)]


# (deleted path, where the issue must point)
REQUIRED: list[tuple[Path_, str]] = [
    (("data",), "data"),
    (("runs",), "runs"),
    (("data", "dataset"), "data.dataset"),
    (("data", "dataset", "name"), "data.dataset.name"),
    (("runs", 0, "name"), "runs[0].name"),
    (("runs", 1, "loss", "name"), "runs[1].loss.name"),
    (("runs", 1, "stages", 0, "from_epoch"), "runs[1].stages[0].from_epoch"),
    (("runs", 1, "loss", "params", "class_weights", "name"), "runs[1].loss.params.class_weights"),
    (("defaults", "optimizer", "name"), "defaults.optimizer.name"),
    (("defaults", "backbone"), "runs[0].backbone"),
    (("defaults", "optimizer"), "runs[1].optimizer"),
    (("defaults", "loss"), "runs[0].loss"),
    (("evaluators", 0, "name"), "evaluators[0].name"),
]


@pytest.mark.parametrize(("path", "where"), REQUIRED, ids=[w for _, w in REQUIRED])
def test_a_missing_required_field_is_reported_where_it_belongs(path: Path_, where: str) -> None:
    config = base_config()
    del value_at(config, path[:-1])[path[-1]]
    assert where in [issue.path for issue in issues_of(config)]


# --------------------------------------------------------------------------------------------
# Bytes and YAML text through `ib validate`


@fuzz_settings(500)
@given(st.binary(max_size=512))
def test_random_bytes_are_refused_by_ib_validate(ib_cli: Callable[..., Any], tmp_path: Path, data: bytes) -> None:
    count_example("ib validate: random bytes -> exit 1, no traceback")
    path = tmp_path / "random.yaml"
    path.write_bytes(data)
    result = ib_cli("validate", str(path))
    assert result.rc == 1 and no_traceback(result.output), result.output
    assert str(path) in result.output


BASE_TEXT = yaml.safe_dump(base_config(), sort_keys=False)
YAML_SNIPPETS = [
    ":",
    "- ",
    "{",
    "}",
    "[",
    "]",
    "&a ",
    "*a",
    "!!str ",
    "\t",
    "\n  ",
    "#",
    "'",
    '"',
    "? ",
    "|",
    ">",
    "%YAML 1.1\n---\n",
    "---\n",
    "...\n",
    "<<: *a",
    "\x00",
    "\ufeff",
    "\udcff",
]


def has_bracket_key(node: Any) -> bool:
    if isinstance(node, dict):
        return any(
            (isinstance(k, str) and ("[" in k or k.startswith("function-"))) or has_bracket_key(v)
            for k, v in node.items()
        )
    return isinstance(node, list) and any(has_bracket_key(v) for v in node)


@st.composite
def mutated_texts(draw: st.DrawFn) -> bytes:
    text = BASE_TEXT
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        piece = draw(st.text(max_size=6) | st.sampled_from(YAML_SNIPPETS))
        operation = draw(st.sampled_from(["insert", "delete", "overwrite"]))
        if operation == "insert":
            text = text[:at] + piece + text[at:]
        elif operation == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 12)) :]
        else:
            text = text[:at] + piece + text[at + len(piece) :]
    return text.encode("utf-8", "surrogatepass")  # lone surrogates become invalid UTF-8 on purpose


@fuzz_settings(600)
@given(mutated_texts())
def test_mutated_yaml_text_is_valid_or_refused(ib_cli: Callable[..., Any], tmp_path: Path, raw: bytes) -> None:
    try:
        assume(not has_bracket_key(yaml.safe_load(raw)))
    except Exception:  # noqa: BLE001 - only a pre-filter; the property itself must not see any
        pass
    count_example("ib validate: mutated YAML text -> exit 0 or 1 matching load_experiment, no traceback")
    path = tmp_path / "mutated.yaml"
    path.write_bytes(raw)
    result = ib_cli("validate", str(path))
    assert result.rc in (0, 1) and no_traceback(result.output), result.output
    assert (result.rc == 1) == bool(issues_of(path))


@st.composite
def oversized_yaml(draw: st.DrawFn) -> str:
    """Deep nesting, alias chains, long strings, many keys: documents a config never is."""
    kind = draw(st.sampled_from(["flow_list", "flow_map", "block_map", "block_list", "aliases", "string", "keys"]))
    depth = draw(st.integers(1, 400))
    if kind == "flow_list":
        return "x: " + "[" * depth + "]" * depth + "\n"
    if kind == "flow_map":
        return "x: " + "{a: " * depth + "1" + "}" * depth + "\n"
    if kind == "block_map":
        return "".join("  " * i + f"k{i}:\n" for i in range(depth)) + "  " * depth + "v\n"
    if kind == "block_list":
        return "".join("  " * i + "-\n" for i in range(depth)) + "  " * depth + "v\n"
    if kind == "aliases":  # a "billion laughs" document: `levels` levels, each repeating the previous `fan` times
        fan, levels = draw(st.integers(2, 9)), draw(st.integers(1, 14))
        lines = ["l0: &l0 [" + ", ".join(["lol"] * fan) + "]"]
        lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * fan) + "]" for i in range(1, levels)]
        return "\n".join(lines) + "\n"
    if kind == "string":
        return "x: " + "a" * draw(st.integers(1, 1_000_000)) + "\n"
    return "".join(f"k{i}: {i}\n" for i in range(draw(st.integers(1, 5000))))


@fuzz_settings(200)
@given(oversized_yaml())
def test_huge_or_deeply_nested_yaml_is_refused_in_bounded_time(tmp_path: Path, text: str) -> None:
    count_example("YAML: deep nesting / alias bombs / long strings / many keys -> ConfigError within the deadline")
    path = tmp_path / "big.yaml"
    path.write_text(text, encoding="utf-8")
    assert issues_of(path)  # none of these documents is an experiment


WORST_CASES = {
    "alias bomb 9^14": "\n".join(
        ["l0: &l0 [" + ", ".join(["lol"] * 9) + "]"]
        + [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 14)]
    ),
    "400 nested flow lists": "x: " + "[" * 400 + "]" * 400,
    "100 nested block mappings": "".join("  " * i + f"k{i}:\n" for i in range(100)) + "  " * 100 + "v",
    "5000 keys": "".join(f"k{i}: {i}\n" for i in range(5000)),
    "300 kB string": "x: " + "a" * 300_000,
}


@pytest.mark.parametrize("text", list(WORST_CASES.values()), ids=list(WORST_CASES))
def test_refusing_a_hostile_document_takes_little_memory(tmp_path: Path, text: str) -> None:
    path = tmp_path / "big.yaml"
    path.write_text(text + "\n", encoding="utf-8")
    tracemalloc.start()
    try:
        issues = issues_of(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert issues
    assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MiB"


# --------------------------------------------------------------------------------------------
# `--set` overrides

segments = st.sampled_from(
    [
        "seed",
        "data",
        "dataset",
        "params",
        "runs",
        "ce",
        "focal",
        "loss",
        "name",
        "trainer",
        "epochs",
        "stages",
        "x",
        "[0]",
        "[1]",
        "[-1]",
        "[99]",
        "[",
        "]",
        "",
        "defaults",
        "optimizer",
        "milestones",
        " ",
        "evaluators",
        "0",
    ]
)
override_values = st.text(max_size=30) | st.sampled_from(
    [
        "[1, 2",
        "{a: 1}",
        "null",
        "~",
        "&a [*a]",
        "*b",
        "!!python/name:os.system",
        "1e400",
        ".nan",
        ".inf",
        "[[[[[[]]]]]]",
        "{name: focal}",
        "'x'",
        "{name: focal, params: {gamma: -1}}",
    ]
)


@fuzz_settings(1000)
@given(
    st.lists(
        st.tuples(st.lists(segments, max_size=6).map(".".join), st.sampled_from(["=", "", "=="]), override_values).map(
            "".join
        ),
        min_size=1,
        max_size=3,
    )
)
def test_random_overrides_are_valid_or_a_config_error(overrides: list[str]) -> None:
    count_example("--set: random PATH=VALUE overrides -> valid or ConfigError")
    try:
        ibcore.load_experiment(base_config(), overrides=overrides)
    except ConfigError as error:
        assert_well_formed(error)


def test_an_alias_bomb_in_an_override_is_refused_in_bounded_memory() -> None:
    # `--set` values are parsed with yaml.safe_load, outside the size check of config files; validation must
    # report a bomb per element and never walk its expansion (9^10 values): checked in a process whose address
    # space is capped at 1 GiB, where materialising the expansion fails with a MemoryError.
    levels = ["&a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"] + [
        f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)
    ]
    bomb = "[" + ", ".join(levels) + "]"
    targets = ["plugins", "defaults.optimizer.params.milestones", "runs[0].stages", "evaluators"]
    code = f"""
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
import ibcore
config, bomb = json.loads(sys.argv[1]), sys.argv[2]
for target in {targets!r}:
    issues = ibcore.validate(config, overrides=[f"{{target}}={{bomb}}"])
    print(json.dumps([target, [issue.path for issue in issues]]))
"""
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(base_config()), bomb], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    reported = dict(json.loads(line) for line in done.stdout.splitlines())
    assert list(reported) == targets
    for target, paths in reported.items():
        assert paths and all(path.startswith(target.split("[")[0]) for path in paths), (target, paths)


# --------------------------------------------------------------------------------------------
# `ib run` on broken configs


@fuzz_settings(60)
@given(mutated_configs())
def test_ib_run_on_a_broken_config_exits_1_before_creating_a_run_directory(
    ib_cli: Callable[..., Any], tmp_path: Path, data: dict[str, Any]
) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    assume(ibcore.validate(path))  # a mutation that is still valid would train
    count_example("ib run: broken config -> exit 1, no run directory")
    out = tmp_path / "out"
    result = ib_cli("run", str(path), "--quiet", "--out", str(out))
    assert result.rc == 1 and no_traceback(result.output), result.output
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# Class weights: the number of classes comes from the data set, so a wrong length is a build-time error


def wrong_length_class_weights(tmp_path: Path) -> Path:
    config = base_config()
    config["runs"] = [
        {"name": "weighted", "loss": {"name": "cross_entropy", "params": {"class_weights": [1.0, 2.0, 3.0]}}}
    ]
    path = tmp_path / "weights.yaml"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def test_wrong_length_class_weights_are_refused_by_ib_validate(ib_cli: Callable[..., Any], tmp_path: Path) -> None:
    # mnist_lt says it has 10 classes without loading data (num_classes_hint), so `ib validate` checks the
    # length; `ib run` refuses the config before creating a run directory.
    path = wrong_length_class_weights(tmp_path)
    validated = ib_cli("validate", str(path))
    assert validated.rc == 1 and no_traceback(validated.output)
    assert "expected 10 values, one per class" in " ".join(validated.output.split())
    result = ib_cli("run", str(path), "--quiet", "--out", str(tmp_path / "out"))
    assert result.rc == 1 and no_traceback(result.output), result.output
    assert not (tmp_path / "out").exists()


def test_wrong_length_class_weights_error_names_the_run_path(ib_cli: Callable[..., Any], tmp_path: Path) -> None:
    path = wrong_length_class_weights(tmp_path)
    result = ib_cli("run", str(path), "--quiet", "--out", str(tmp_path / "out"))
    assert "runs[0].loss.params.class_weights" in result.err and str(path) in result.err


# --------------------------------------------------------------------------------------------
# Known bugs, each shown by its smallest case


def test_a_key_with_a_bracket_is_reported_not_a_crash() -> None:
    config = base_config()
    config["defaults"]["optimizer"]["params"]["milestones[0]"] = 3  # a plausible typo for a list element
    issues = issues_of(config)
    assert any("milestones[0]" in issue.message for issue in issues)


@pytest.mark.parametrize(
    ("value", "where"),
    [
        ([1.0, "x"], "runs[1].loss.params.class_weights[1]"),
        ({"name": "effective_number", "beta": {"a": 1}}, "runs[1].loss.params.class_weights.beta"),
    ],
    ids=["list", "mapping"],
)
def test_class_weight_errors_point_at_the_yaml_path(value: Any, where: str) -> None:
    config = base_config()
    config["runs"][1]["loss"]["params"]["class_weights"] = value
    assert [issue.path for issue in issues_of(config)] == [where]


def _float_params() -> list[tuple[str, str, str]]:
    from ibcore.registry import list_components

    found = []
    for info in list_components(load=True):
        if info.params is None or info.kind == "dataset" and info.name != "mnist_lt":
            continue  # the other data sets need a root; mnist_lt stands for them
        for field_name, field in info.params.model_fields.items():
            if "float" in str(field.annotation) and "list" not in str(field.annotation):
                found.append((info.kind, info.name, field_name))
    return found


def test_infinity_is_refused_by_every_float_param() -> None:
    accepted = []
    for kind, name, field_name in _float_params():
        extra = {"shape": "exp"} if (name, field_name) == ("label_aware_smoothing", "power") else {}
        config = base_config()
        spec = {"name": name, "params": {**extra, field_name: math.inf}}
        if kind == "dataset":
            config["data"]["dataset"] = spec
        elif kind in ("evaluator",):
            config["evaluators"] = [spec]
        elif kind == "adjustment":
            config["runs"][0]["posthoc"] = [spec]
        else:
            config["runs"][0][kind] = spec
        if not [i for i in issues_of(config) if field_name in i.path]:
            accepted.append(f"{kind} {name}.{field_name}")
    assert not accepted, f"accepted .inf: {', '.join(accepted)}"


@pytest.mark.parametrize(
    "scalar", ["2001-02-30", "2024-12-14 25:61:61", "9" * 5000], ids=["date", "time", "5000-digit-int"]
)
def test_a_date_like_value_that_is_not_a_date_is_not_a_crash(tmp_path: Path, scalar: str) -> None:
    path = tmp_path / "date.yaml"
    path.write_text(BASE_TEXT.replace("name: ce", f"name: {scalar}"), encoding="utf-8")
    issues_of(path)  # a ConfigError, or valid if the loader keeps such scalars as strings: anything but a crash


def test_a_duplicate_key_is_reported(tmp_path: Path) -> None:
    text = BASE_TEXT + "trainer: {epochs: 400}\n"  # a second `trainer:` that silently replaces the first
    path = tmp_path / "duplicate.yaml"
    path.write_text(text, encoding="utf-8")
    assert any("trainer" in f"{issue.path} {issue.message}" for issue in issues_of(path))


def test_a_binary_tagged_component_name_is_checked(tmp_path: Path) -> None:
    text = BASE_TEXT.replace("name: cross_entropy", "name: !!binary bm9wZQ==")  # b"nope"
    assert "!!binary" in text
    path = tmp_path / "binary.yaml"
    path.write_text(text, encoding="utf-8")
    assert issues_of(path)


def test_a_large_flat_document_is_refused_after_a_bounded_amount_of_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ib_cli: Callable[..., Any]
) -> None:
    """A million-value list under the 5 MiB file limit is refused once MAX_NODES values are composed, not after
    building the whole document: the work is bounded by the node count, whatever the machine's speed."""
    path = tmp_path / "flat.yaml"
    path.write_text("x: [" + "0," * 1_000_000 + "0]\n", encoding="utf-8")
    assert path.stat().st_size < MAX_FILE_BYTES
    composed = 0
    original = _LimitedSafeLoader.compose_node

    def counting(self: Any, parent: Any, index: Any) -> Any:
        nonlocal composed
        composed += 1
        return original(self, parent, index)

    monkeypatch.setattr(_LimitedSafeLoader, "compose_node", counting)
    result = ib_cli("validate", str(path))
    assert result.rc == 1 and no_traceback(result.output)
    assert f"more than {MAX_NODES} values" in result.output
    assert composed <= MAX_NODES + 1
