"""Odd trees under ``image_folder`` and odd paths in ``image_list`` (issue 14, round 2).

Symbolic-link loops once multiplied a class's images (6 became 246, one copy per level until the OS
refused to resolve more links) and two such links hung ``ib run``. The rule now (the module docstring
of ib_plugins_builtin/datasets/_image_files.py): links are followed, every real folder is read once
per class folder, hidden entries are skipped, and counts are what is on disk.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _support import base_config, no_traceback

from ibcore import build
from ibcore.errors import DataError

Cli = Callable[..., Any]


def write_png(path: Path, seed: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)


def image_tree(root: Path, train: dict[str, int], test: dict[str, int] | None = None) -> Path:
    for split, per_class in (("train", train), ("test", test or dict.fromkeys(train, 1))):
        for name, count in per_class.items():
            for i in range(count):
                write_png(root / split / name / f"{i}.png", seed=i)
    return root


def image_folder(root: Path) -> Any:
    return build("dataset", "image_folder", {"root": str(root), "image_size": 8})


def test_a_symlink_loop_in_a_class_folder_does_not_multiply_its_images(tmp_path: Path) -> None:
    root = image_tree(tmp_path / "data", {"cat": 6, "dog": 3})
    os.symlink(".", root / "train" / "cat" / "loop")
    dataset = image_folder(root)
    assert dataset.train.class_counts == [6, 3]  # was [246, 3]
    assert len(set(map(os.path.realpath, dataset.train.paths))) == 9


def test_two_symlink_loops_do_not_hang_the_listing(tmp_path: Path) -> None:
    root = image_tree(tmp_path / "data", {"cat": 2, "dog": 1})
    for name in ("a", "b"):
        os.symlink(".", root / "train" / "cat" / name)
    os.symlink("..", root / "train" / "dog" / "up")  # to the split folder above it: adds nothing either
    code = textwrap.dedent(
        f"""
        from ibcore import build
        d = build("dataset", "image_folder", {{"root": {str(root)!r}, "image_size": 8}})
        print(d.train.class_counts)
        """
    )
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("listing an image folder with two symlink loops did not finish within 60 s")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[2, 1]", done.stdout


def test_links_to_files_and_to_other_folders_are_followed_once(tmp_path: Path) -> None:
    root = image_tree(tmp_path / "data", {"cat": 2, "dog": 1})
    extra = tmp_path / "elsewhere"
    write_png(extra / "x.png", seed=9)
    write_png(extra / "y.png", seed=8)
    os.symlink(extra, root / "train" / "cat" / "more")
    os.symlink(extra, root / "train" / "cat" / "again")  # a second link to the same folder adds nothing
    os.symlink(extra / "x.png", root / "train" / "dog" / "x.png")  # a link to a file is one image
    assert image_folder(root).train.class_counts == [4, 2]


def test_a_dangling_link_or_a_fifo_named_like_an_image_is_refused_when_the_set_is_built(tmp_path: Path) -> None:
    root = image_tree(tmp_path / "data", {"cat": 2, "dog": 1})
    os.symlink(tmp_path / "gone.png", root / "train" / "cat" / "gone.png")
    with pytest.raises(DataError, match=r"gone\.png is a symbolic link to nothing"):
        image_folder(root)
    (root / "train" / "cat" / "gone.png").unlink()
    os.mkfifo(root / "train" / "dog" / "pipe.png")  # opening it to decode would block forever
    with pytest.raises(DataError, match=r"pipe\.png is not a regular file"):
        image_folder(root)


def test_hidden_entries_inside_a_class_folder_are_skipped(tmp_path: Path) -> None:
    root = image_tree(tmp_path / "data", {"cat": 2, "dog": 1})
    (root / "train" / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")  # macOS resource fork
    write_png(root / "train" / "cat" / ".ipynb_checkpoints" / "0-checkpoint.png", seed=0)
    dataset = image_folder(root)
    assert dataset.train.class_counts == [2, 1]
    assert all("/." not in path for path in dataset.train.paths)


def test_a_folder_that_cannot_be_listed_is_a_data_error_not_a_silent_gap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = image_tree(tmp_path / "data", {"cat": 2, "dog": 1})
    write_png(root / "train" / "cat" / "sub" / "9.png", seed=9)
    locked = str(root / "train" / "cat" / "sub")
    original = os.scandir

    def scandir(path: Any = ".") -> Any:  # chmod 000 does not stop root: refuse the listing itself
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return original(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DataError, match=r"cannot list the image folder .*cat/sub: Permission denied"):
        image_folder(root)


def test_an_image_folder_with_a_loop_trains_on_what_is_on_disk_through_ib_run(ib_cli: Cli, tmp_path: Path) -> None:
    root = image_tree(tmp_path / "data", {"cat": 4, "dog": 2})
    os.symlink(".", root / "train" / "cat" / "loop")  # one link: the old listing made it 164 images, not a hang
    config = base_config()
    config["data"]["dataset"] = {"name": "image_folder", "params": {"root": str(root), "image_size": 8}}
    config["data"]["batch_size"] = 4
    config["trainer"].update(epochs=1, eval_every=1)
    config["runs"] = [{"name": "ce"}]
    config["defaults"]["backbone"] = {"name": "small_cnn", "params": {"in_channels": 3, "width": 4}}
    path = tmp_path / "exp.yaml"
    path.write_text(json.dumps(config), encoding="utf-8")
    result = ib_cli("run", str(path), "--quiet", "--out", str(tmp_path / "out"))
    assert result.rc == 0 and no_traceback(result.output), result.output
    (run_dir,) = (tmp_path / "out").iterdir()
    assert json.loads((run_dir / "meta.json").read_text())["class_counts"] == [4, 2]


# --------------------------------------------------------------------------------------------
# image_list: paths stay inside root; a repeated line is allowed


def image_list(root: Path, train_lines: list[str]) -> Any:
    (root / "train.txt").write_text("\n".join(train_lines) + "\n", encoding="utf-8")
    (root / "test.txt").write_text("a.png 0\nb.png 1\n", encoding="utf-8")
    return build(
        "dataset",
        "image_list",
        {"root": str(root), "train_list": "train.txt", "test_list": "test.txt", "image_size": 8},
    )


@pytest.mark.parametrize("escaping", ["../outside.png", "sub/../../outside.png", "{absolute}"])
def test_an_image_list_path_leading_outside_root_is_refused(tmp_path: Path, escaping: str) -> None:
    root = tmp_path / "data"
    for name in ("a.png", "b.png"):
        write_png(root / name, seed=1)
    write_png(tmp_path / "outside.png", seed=2)
    escaping = escaping.format(absolute=tmp_path / "outside.png")
    with pytest.raises(DataError, match=rf"train\.txt:2: image path '{escaping}' leads outside root"):
        image_list(root, ["a.png 0", f"{escaping} 1"])


def test_an_image_list_may_name_an_image_twice_and_use_dotted_paths_inside_root(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for name in ("a.png", "b.png", "sub/c.png"):
        write_png(root / name, seed=1)
    dataset = image_list(root, ["a.png 0", "a.png 0", "sub/../b.png 1", "./sub/c.png 1"])
    assert dataset.train.class_counts == [2, 2]


def test_absolute_paths_are_accepted_under_root_and_root_slash_takes_a_list_of_absolute_paths(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for name in ("a.png", "b.png"):
        write_png(root / name, seed=1)
    assert image_list(root, [f"{root / 'a.png'} 0", "b.png 1"]).train.class_counts == [1, 1]
    (root / "train.txt").write_text(f"{root / 'a.png'} 0\n{root / 'b.png'} 1\n", encoding="utf-8")
    (root / "test.txt").write_text(f"{root / 'a.png'} 0\n", encoding="utf-8")
    params = {"root": "/", "train_list": str(root / "train.txt"), "test_list": str(root / "test.txt"), "image_size": 8}
    assert build("dataset", "image_list", params).train.class_counts == [1, 1]
