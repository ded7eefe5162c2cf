"""The README's promises: its "Add a method" code registers a loss a config can use (a name no shipped plugin
takes), and its commands name files that exist."""

from __future__ import annotations

import json
import re
from pathlib import Path

import ibcore

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def test_the_add_a_method_example_trains(tmp_path: Path) -> None:
    section = README[README.index("## Add a method") :]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    (tmp_path / "my_losses.py").write_text(code.group(1), encoding="utf-8")
    name = re.search(r'@register_loss\("(\w+)"', code.group(1))
    assert name is not None and name.group(1) != "poly1"  # poly1 belongs to examples/plugin-package
    config = {
        "plugins": ["my_losses"],
        "data": {"dataset": {"name": "mnist_lt", "params": {"test_per_class": 10}}, "batch_size": 256},
        "trainer": {"epochs": 1, "device": "cpu"},
        "defaults": {"backbone": {"name": "small_cnn"}, "optimizer": {"name": "sgd"}},
        "runs": [{"name": "poly", "loss": {"name": name.group(1), "params": {"epsilon": 2.0}}}],
    }
    path = tmp_path / "exp.yaml"
    path.write_text(json.dumps(config), encoding="utf-8")
    with ibcore.registry_snapshot():
        results = ibcore.run(path, out_dir=tmp_path / "runs", quiet=True)
    assert [row["status"] for row in results.rows] == ["ok"]


def test_the_readme_commands_name_files_that_exist() -> None:
    root = Path(__file__).resolve().parents[1]
    for config in set(re.findall(r"ib (?:run|validate) (examples/\S+\.yaml)", README)):
        assert (root / config).is_file(), config
