"""``decode: torchvision`` for ``image_list`` / ``image_folder``, and the engine's DataLoader path.

What a user relies on: the same images as ``decode: pil`` within a stated number of levels (the same crop
boxes and flips, only decoder and resampling differ), the same labels and class counts, batches that do not
depend on the number of workers, every kind of file read (PNG, grayscale, CMYK, progressive JPEG), a corrupt
file named in a DataError, and an experiment that trains end to end through ``ibcore.run``.

Fixtures are a few dozen tiny images written with PIL into tmp_path in an ImageFolder layout; nothing is
downloaded, and work is bounded by image counts. The route for a CUDA device (batched decode in the
training process, crops there) runs here on the CPU: ``decode_jpeg(list, device="cpu")`` is the same call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ibcore
from ib_plugins_builtin.datasets._jpeg import (
    DeviceSample,
    decode_on_cpu,
    device_decodable,
    jpeg_frame,
    open_rgb,
    read_bytes,
)
from ibcore import BuildContext, ConfigError, DataError
from ibcore.engine.batches import LoaderData
from ibcore.engine.experiment_data import AUTO_WORKERS_CAP, loader_workers

#: levels (of 0..255) two JPEG decoders may differ by: libjpeg builds differ in IDCT and upsampling details.
#: Measured: 0 between PIL 13.0 and torchvision 0.29.1, both bundling libjpeg-turbo 3.x.
DECODER_LEVELS = 2
#: PIL's bilinear resize vs torch's antialiased bilinear one, both rounded to uint8: measured at most 1.
RESAMPLE_LEVELS = 1
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
CPU = torch.device("cpu")

# Every kind of file a data set of photos holds, with how PIL writes it.
FILE_KINDS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "baseline": ("jpg", "RGB", {"quality": 90}),  # chroma subsampled 4:2:0, as most photos
    "baseline 444": ("jpg", "RGB", {"quality": 95, "subsampling": 0}),
    "progressive": ("jpg", "RGB", {"quality": 90, "progressive": True}),
    "grayscale": ("jpg", "L", {"quality": 90}),
    "cmyk": ("jpg", "CMYK", {"quality": 90}),
    "png": ("png", "RGB", {}),
}


def photo(seed: int, size: tuple[int, int]) -> np.ndarray:
    """A smooth colour image with some grain (as photos are; pure noise is what JPEG handles worst)."""
    rng = np.random.default_rng(seed)
    width, height = size
    coarse = rng.integers(0, 256, (height // 8 + 2, width // 8 + 2, 3), dtype=np.uint8)
    from PIL import Image

    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    return np.clip(smooth + rng.integers(-6, 7, smooth.shape), 0, 255).astype(np.uint8)


def write_image(path: Path, seed: int, kind: str = "baseline", size: tuple[int, int] = (40, 30)) -> Path:
    from PIL import Image

    _, mode, options = FILE_KINDS[kind]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(photo(seed, size)).convert(mode).save(path, format="PNG" if kind == "png" else "JPEG", **options)
    return path


def image_tree(root: Path) -> Path:
    """root/{train,test}/<class>/*: 13 baseline JPEGs in train (7, 4, 2 per class) plus one file of every other
    kind, and two test JPEGs per class; images of several sizes, some portrait."""
    for label, (name, count) in enumerate({"ant": 7, "bee": 4, "cat": 2}.items()):
        for k in range(count):
            write_image(root / "train" / name / f"{k}.jpg", seed=10 * label + k, size=(40 + 4 * k, 30 + 2 * label))
        for k in range(2):
            write_image(root / "test" / name / f"{k}.jpg", seed=100 + 10 * label + k, size=(30, 44))
    for position, kind in enumerate(kind for kind in FILE_KINDS if kind != "baseline"):
        extension = FILE_KINDS[kind][0]
        write_image(root / "train" / "bee" / f"z_{kind.replace(' ', '_')}.{extension}", seed=50 + position, kind=kind)
    return root


def image_folder(root: Path, **params: Any) -> Any:
    return ibcore.build(
        "dataset", "image_folder", {"root": str(root), "image_size": 16, **params}, context=BuildContext()
    )


def levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| of two ImageNet-normalised batches, in levels of the 0..255 pixels they came from."""
    return (a - b).abs() * IMAGENET_STD * 255


def one_pass(
    split: Any, *, workers: int = 0, train: bool = True, seed: int = 7, on_device: bool = False, batch_size: int = 6
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One pass over ``split`` in a fixed shuffled order, as the engine reads it (its epoch generator seeded)."""
    data = LoaderData(split, CPU, workers)
    if on_device:  # the CUDA route, run on the CPU
        data.reader.decode_on_device = True  # type: ignore[attr-defined]
    order = np.random.default_rng(seed).permutation(len(split)) if train else np.arange(len(split))
    generator = torch.Generator()
    generator.manual_seed(seed)
    return list(data.iterate(order, batch_size, generator if train else None, train, False))


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return image_tree(tmp_path_factory.mktemp("images"))


# --------------------------------------------------------------------------------------------
# Decoding


@pytest.mark.parametrize("kind", list(FILE_KINDS))
def test_torchvision_decodes_every_kind_of_file_as_pil_does(tmp_path: Path, kind: str) -> None:
    path = str(write_image(tmp_path / f"image.{FILE_KINDS[kind][0]}", seed=3, kind=kind))
    decoded = decode_on_cpu(read_bytes(path, 0), path, 0)
    reference = torch.from_numpy(np.array(open_rgb(path, 0))).permute(2, 0, 1)
    assert decoded.dtype == torch.uint8 and decoded.shape == reference.shape == (3, 30, 40)  # always RGB
    difference = (decoded.int() - reference.int()).abs().max().item()
    assert difference <= (0 if kind == "png" else DECODER_LEVELS), difference


def test_the_jpeg_header_gives_the_size_and_which_files_go_to_the_device_decoder(tmp_path: Path) -> None:
    for kind in FILE_KINDS:
        path = write_image(tmp_path / f"{kind}.img", seed=1, kind=kind, size=(52, 36))
        data = path.read_bytes()
        frame = jpeg_frame(data)
        if kind == "png":
            assert frame is None and device_decodable(data) is None
            continue
        assert frame is not None and (frame.height, frame.width) == (36, 52), kind
        # nvjpeg gets baseline colour JPEGs only; the rest is decoded in the workers
        assert (device_decodable(data) is not None) == kind.startswith("baseline"), kind
    complete = (tmp_path / "baseline.img").read_bytes()
    assert device_decodable(complete[:-300]) is None  # truncated: the CPU decoder reports it


# --------------------------------------------------------------------------------------------
# The two decoders give the same data


def test_both_decoders_cut_the_same_training_crops_within_a_level(tree: Path) -> None:
    pil, torchvision = image_folder(tree), image_folder(tree, decode="torchvision")
    pil_batches, torchvision_batches = one_pass(pil.train), one_pass(torchvision.train)
    assert len(pil_batches) == len(torchvision_batches) == 3  # 18 training images, batches of 6
    for (x_pil, y_pil), (x_tv, y_tv) in zip(pil_batches, torchvision_batches, strict=True):
        assert torch.equal(y_pil, y_tv)
        assert x_tv.shape == x_pil.shape and x_tv.dtype == x_pil.dtype == torch.float32
        apart = levels(x_pil, x_tv)
        # a box cut elsewhere, or a flip missed, would be tens of levels off on these images
        assert apart.max() <= DECODER_LEVELS + RESAMPLE_LEVELS + 1e-3 and apart.mean() < 0.5


def test_both_decoders_give_the_same_evaluation_images_within_a_level(tree: Path) -> None:
    pil, torchvision = image_folder(tree), image_folder(tree, decode="torchvision")
    for (x_pil, y_pil), (x_tv, y_tv) in zip(
        one_pass(pil.test, train=False), one_pass(torchvision.test, train=False), strict=True
    ):
        assert torch.equal(y_pil, y_tv) and levels(x_pil, x_tv).max() <= DECODER_LEVELS + RESAMPLE_LEVELS + 1e-3
    image, label = torchvision.test[0]  # split[i], as the preflight reads one image
    assert image.shape == (3, 16, 16) and label == 0
    assert levels(image[None], pil.test[0][0][None]).max() <= DECODER_LEVELS + RESAMPLE_LEVELS + 1e-3


def test_labels_and_class_counts_do_not_depend_on_the_decoder(tree: Path, tmp_path: Path) -> None:
    pil, torchvision = image_folder(tree), image_folder(tree, decode="torchvision")
    assert torchvision.class_names == pil.class_names == ["ant", "bee", "cat"]
    for split in ("train", "test"):
        a, b = getattr(pil, split), getattr(torchvision, split)
        assert a.paths == b.paths and np.array_equal(a.targets, b.targets) and a.class_counts == b.class_counts
    assert torchvision.train.class_counts == [7, 9, 2]
    pairs = zip(pil.train.paths, pil.train.targets, strict=True)
    list_file = tmp_path / "train.txt"
    list_file.write_text("".join(f"{Path(path).relative_to(tree)} {label}\n" for path, label in pairs))
    listed = {
        decode: ibcore.build(
            "dataset",
            "image_list",
            {"root": str(tree), "train_list": str(list_file), "test_list": str(list_file), "decode": decode},
            context=BuildContext(),
        )
        for decode in ("pil", "torchvision")
    }
    assert listed["torchvision"].train.class_counts == listed["pil"].train.class_counts == [7, 9, 2]
    assert np.array_equal(listed["torchvision"].train.targets, pil.train.targets)


def test_decode_device_cpu_is_refused_without_decode_torchvision(tree: Path) -> None:
    with pytest.raises(ConfigError, match="decode_device: cpu applies to decode: torchvision only"):
        image_folder(tree, decode_device="cpu")
    assert image_folder(tree, decode="torchvision", decode_device="cpu").train.decode_device == "cpu"


# --------------------------------------------------------------------------------------------
# The DataLoader path: workers, persistent passes, the device route


@pytest.mark.parametrize("decode", ["pil", "torchvision"])
def test_batches_depend_on_the_seed_not_on_the_workers_or_earlier_passes(tree: Path, decode: str) -> None:
    split = image_folder(tree, decode=decode).train
    alone = one_pass(split)
    data = LoaderData(split, CPU, num_workers=2)
    order = np.random.default_rng(7).permutation(len(split))

    def generator() -> torch.Generator:
        made = torch.Generator()
        made.manual_seed(7)
        return made

    first = data.iterate(order, 6, generator(), True, False)
    next(first)
    first.close()  # stopped after one batch, as a smoke run stops: the persistent workers still hold batches
    with_workers = list(data.iterate(order, 6, generator(), True, False))
    for (x_alone, y_alone), (x_workers, y_workers) in zip(alone, with_workers, strict=True):
        assert torch.equal(y_alone, y_workers) and torch.equal(x_alone, x_workers)
    another_epoch = torch.Generator()
    another_epoch.manual_seed(8)
    assert not torch.equal(next(data.iterate(order, 6, another_epoch, True, False))[0], alone[0][0])


def test_the_device_route_gives_the_batches_the_workers_give(tree: Path) -> None:
    split = image_folder(tree, decode="torchvision").train
    for (x_workers, y_workers), (x_device, y_device) in zip(
        one_pass(split), one_pass(split, on_device=True), strict=True
    ):
        assert torch.equal(y_workers, y_device) and torch.equal(x_workers, x_device)
    reader = LoaderData(split, CPU, 0).reader
    reader.decode_on_device = True  # type: ignore[attr-defined]
    sent_encoded = {Path(split.paths[i]).name: reader.item(i, seed=0).encoded for i in range(len(split))}
    # baseline colour JPEGs travel as bytes; every other file is decoded in the worker
    assert sent_encoded["0.jpg"] and sent_encoded["z_baseline_444.jpg"]
    assert not any(sent_encoded[name] for name in ("z_progressive.jpg", "z_grayscale.jpg", "z_cmyk.jpg", "z_png.png"))
    assert isinstance(reader.item(0, seed=0), DeviceSample)


def test_images_the_device_decoder_refuses_are_decoded_on_the_cpu_with_one_warning(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.io

    decode_jpeg = torchvision.io.decode_jpeg

    def device_refuses(data: Any, mode: Any, device: Any = None) -> Any:
        if device is not None:  # the route for the device names one; the CPU decoder does not
            raise RuntimeError("nvjpeg: this image is not supported")
        return decode_jpeg(data, mode=mode)

    split = image_folder(tree, decode="torchvision").train
    expected = one_pass(split)
    monkeypatch.setattr(torchvision.io, "decode_jpeg", device_refuses)
    with pytest.warns(RuntimeWarning, match="refused .*decode_device: cpu") as warned:
        refused = one_pass(split, on_device=True)
    assert len(warned) == 1
    for (x_expected, y_expected), (x_refused, y_refused) in zip(expected, refused, strict=True):
        assert torch.equal(y_expected, y_refused) and torch.equal(x_expected, x_refused)


def test_reading_data_in_the_training_process_leaves_its_random_streams_alone(tree: Path) -> None:
    split = image_folder(tree).train  # PIL's transforms draw from torch's global generator
    torch.manual_seed(11)
    state = torch.get_rng_state()
    one_pass(split)
    assert torch.equal(torch.get_rng_state(), state)


# --------------------------------------------------------------------------------------------
# Errors name the file


def corrupt_jpeg(folder: Path, broken: str) -> Path:
    """A broken JPEG among good ones: not a JPEG at all, cut short, or a header with no image data after it."""
    good = write_image(folder / f"{broken}.jpg", seed=5).read_bytes()
    content = {
        "not_a_jpeg": b"this is not a JPEG",
        "truncated": good[: len(good) // 2],
        "no_scan": good[: good.find(b"\xff\xda")] + b"\xff\xd9",  # ends as a JPEG ends
    }[broken]
    (folder / f"{broken}.jpg").write_bytes(content)
    return folder / f"{broken}.jpg"


@pytest.mark.parametrize("broken", ["not_a_jpeg", "truncated", "no_scan"])
def test_a_corrupt_jpeg_is_a_data_error_naming_the_file(tmp_path: Path, broken: str) -> None:
    root = image_tree(tmp_path / "data")
    path = corrupt_jpeg(root / "train" / "cat", broken)
    split = image_folder(root, decode="torchvision").train
    position = split.paths.index(str(path))
    message = rf"Image file {path} \(item {position} of this split\) cannot be decoded"
    with pytest.raises(DataError, match=message):
        split[position]
    with pytest.raises(DataError, match=message):
        one_pass(split)
    with pytest.raises(DataError, match=message):
        one_pass(split, on_device=True)  # the header looks fine for no_scan: the batched decode fails, then the CPU's


def test_a_corrupt_file_read_by_a_worker_is_named_without_the_workers_traceback(tmp_path: Path) -> None:
    root = image_tree(tmp_path / "data")
    path = corrupt_jpeg(root / "train" / "cat", "truncated")
    with pytest.raises(DataError) as caught:
        one_pass(image_folder(root, decode="torchvision").train, workers=1)
    assert str(path) in str(caught.value) and "Traceback" not in str(caught.value)


def test_a_missing_image_is_named(tmp_path: Path) -> None:
    root = image_tree(tmp_path / "data")
    split = image_folder(root, decode="torchvision").train
    Path(split.paths[3]).unlink()
    with pytest.raises(DataError, match=rf"Image file {split.paths[3]} \(item 3 of this split\) does not exist"):
        split[3]


# --------------------------------------------------------------------------------------------
# Through the engine


def test_an_experiment_with_decode_torchvision_trains_end_to_end(tmp_path: Path) -> None:
    root = image_tree(tmp_path / "data")
    params = {"root": str(root), "image_size": 16, "decode": "torchvision"}
    config = {
        "seed": 0,
        "data": {
            "dataset": {"name": "image_folder", "params": params},
            "batch_size": 8,
            "num_workers": 1,
        },
        "trainer": {"epochs": 1, "eval_every": 1, "device": "cpu"},
        "defaults": {
            "backbone": {"name": "small_cnn", "params": {"in_channels": 3, "width": 4}},
            "optimizer": {"name": "sgd", "params": {"lr": 0.05}},
            "loss": {"name": "cross_entropy"},
        },
        "runs": [{"name": "ce"}, {"name": "balanced", "loss": {"name": "balanced_softmax"}}],
        "evaluators": [{"name": "accuracy"}],
    }
    results = ibcore.run(config, out_dir=tmp_path / "out", quiet=True)
    for name in ("ce", "balanced"):
        row = results.row(name)
        assert row["status"] == "ok" and 0 <= row["acc1"] <= 100
    assert "18 training images via a DataLoader" in (results.run_dir / "train.log").read_text()


def test_num_workers_auto_takes_the_cpus_of_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    from ibcore.config import load_experiment

    assert loader_workers(3) == 3 and loader_workers(0) == 0
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for cpus, expected in ((2, 2), (5, 5), (64, AUTO_WORKERS_CAP)):
        monkeypatch.setattr("os.sched_getaffinity", lambda _pid, n=cpus: set(range(n)), raising=False)
        assert loader_workers("auto") == expected
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun's processes on this node share its CPUs
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(16)), raising=False)
    assert loader_workers("auto") == 4
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: {0, 1}, raising=False)
    assert loader_workers("auto") == 1
    experiment = load_experiment(
        {
            "data": {"dataset": {"name": "mnist_lt"}, "num_workers": "auto"},
            "defaults": {
                "backbone": {"name": "small_cnn"},
                "optimizer": {"name": "sgd", "params": {"lr": 0.1}},
                "loss": {"name": "cross_entropy"},
            },
            "runs": [{"name": "ce"}],
        }
    )
    assert experiment.data.num_workers == "auto"
