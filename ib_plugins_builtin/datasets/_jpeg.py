"""``decode: torchvision``: image files read by DataLoader workers, JPEGs decoded by torchvision.

Where the work happens:

- on a CUDA device (``decode_device: auto``), a worker only reads the file and parses the JPEG header
  for the image's size, which is all the random crop needs to be drawn there; the training process
  decodes the whole batch with nvjpeg (``torchvision.io.decode_jpeg(list, device="cuda")``) and crops,
  resizes, flips and normalises each image on the GPU;
- otherwise (the CPU, or ``decode_device: cpu``), a worker decodes with torchvision (libjpeg-turbo),
  crops and resizes; it sends uint8 crops to a GPU, which normalises them, and normalised crops when
  training on the CPU (where the training process is the trainer).

Only baseline 8-bit colour JPEGs that end where a JPEG ends go to nvjpeg; a progressive, grayscale or
CMYK JPEG, and a file that is no JPEG at all, is decoded in the worker (as a file of a format other than
JPEG, or a JPEG torchvision cannot decode, always is: with PIL, exactly as ``decode: pil`` opens it).
An image nvjpeg refuses is decoded on the CPU instead (with a warning); a file no decoder can read is a
``DataError`` naming it. Every random draw comes from the sample's seed, so batches do not depend on the
number of workers, and ``decode: pil`` with the same seeds cuts the same boxes (see ``_image_recipe``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import warnings
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from ib_plugins_builtin.datasets._image_recipe import CropDraw, ImageRecipe
from ibcore import DataError

JPEG_START = b"\xff\xd8\xff"
JPEG_END = b"\xff\xd9"
# Frame headers (SOFn) carry the size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but are no frame.
_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Baseline and extended sequential Huffman frames: what nvjpeg decodes on every GPU.
_DEVICE_FRAME_MARKERS = frozenset({0xC0, 0xC1})
# Markers without a length field: TEM and the restart markers.
_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})
# torchvision's messages start with the C++ function and source line: "decode_jpeg, /__w/.../x.cpp:171, ..."
_CPP_LOCATION = re.compile(r"^\w+, \S+:\d+, ")


@dataclasses.dataclass(frozen=True)
class JpegFrame:
    """What a JPEG's frame header says: size, colour components, sample precision and the frame type."""

    height: int
    width: int
    components: int
    precision: int
    marker: int


def jpeg_frame(data: bytes | bytearray | memoryview) -> JpegFrame | None:
    """The frame header of a JPEG, read from its markers without decoding; None when there is none to read."""
    if bytes(data[:3]) != JPEG_START:
        return None
    position, size = 2, len(data)
    while position + 4 <= size:
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker in _STANDALONE_MARKERS:
            position += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, or scan data, before any frame header
            return None
        length = (data[position + 2] << 8) | data[position + 3]
        if marker in _FRAME_MARKERS:
            if length < 8 or position + 10 > size:
                return None
            height = (data[position + 5] << 8) | data[position + 6]
            width = (data[position + 7] << 8) | data[position + 8]
            return JpegFrame(height, width, data[position + 9], data[position + 4], marker)
        if length < 2:
            return None
        position += 2 + length
    return None


def device_decodable(data: bytes | bytearray | memoryview) -> JpegFrame | None:
    """The frame of a JPEG nvjpeg decodes as libjpeg-turbo does (baseline, 8-bit, 3 components, complete), or None."""
    frame = jpeg_frame(data)
    if frame is None or bytes(data[-2:]) != JPEG_END:  # a truncated file goes to the CPU decoder, which says so
        return None
    if frame.marker not in _DEVICE_FRAME_MARKERS or frame.precision != 8 or frame.components != 3:
        return None
    return frame if frame.height > 0 and frame.width > 0 else None


@contextlib.contextmanager
def _torchvision_io() -> Iterator[None]:
    """torchvision 0.29 deprecates its decoders (for TorchCodec) with a warning on every call: kept out of the log."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchvision\.io")
        yield


def _reason(error: Exception) -> str:
    return _CPP_LOCATION.sub("", str(error)).strip()


def read_bytes(path: str, index: int) -> bytearray:
    """The file's bytes; a missing or unreadable file is a DataError naming it (as ``decode: pil`` says it)."""
    try:
        with open(path, "rb") as handle:
            return bytearray(handle.read())  # writable, so torch.frombuffer shares it without a warning
    except FileNotFoundError:
        raise DataError(f"Image file {path} (item {index} of this split) does not exist.") from None
    except OSError as exc:
        reason = exc.strerror or exc
        raise DataError(f"Image file {path} (item {index} of this split) cannot be read: {reason}") from exc


def open_rgb(path: str, index: int) -> Any:
    """The image file as an RGB PIL image; a missing or undecodable file is a DataError naming it."""
    from PIL import Image

    try:
        with Image.open(path) as opened:
            return opened.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"Image file {path} (item {index} of this split) does not exist.") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"Image file {path} (item {index} of this split) cannot be decoded: {exc}") from exc


def decode_on_cpu(data: bytearray, path: str, index: int) -> Tensor:
    """uint8 (3, H, W) RGB: a JPEG with torchvision (libjpeg-turbo), anything else with PIL as ``decode: pil``.

    A JPEG torchvision refuses goes to PIL too (CMYK before torchvision 0.19, 12-bit or arithmetic-coded
    files): PIL decides whether the file is corrupt, with the message ``decode: pil`` gives.
    """
    if bytes(data[:3]) == JPEG_START:
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            with _torchvision_io():
                return decode_jpeg(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:
            pass
    image = np.array(open_rgb(path, index))  # a writable copy: torch refuses to share a read-only buffer
    return torch.from_numpy(image).permute(2, 0, 1).contiguous()


def _generator(seed: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


class DeviceSample(NamedTuple):
    """One sample as a worker sends it for decoding on the device."""

    image: Tensor  # the JPEG file as uint8 (bytes,) when ``encoded``, else the image the worker decoded, (3, H, W)
    encoded: bool
    draw: CropDraw | None
    index: int
    label: int


@dataclasses.dataclass
class EncodedImages:
    """A batch as workers send it for decoding on the device: JPEG bytes, images decoded there, the draws."""

    encoded: list[Tensor]  # JPEG files for nvjpeg, as uint8 (bytes,) CPU tensors
    decoded: list[Tensor]  # images the workers decoded, uint8 (3, H, W)
    is_encoded: list[bool]  # per sample, in batch order: which of the two lists holds it
    draws: list[CropDraw | None]
    indices: list[int]
    labels: Tensor


@dataclasses.dataclass
class ImageFileReader:
    """How ``decode: torchvision`` reads a split through the engine's DataLoader (an ibcore ``BatchReader``).

    ``item`` and ``collate`` run in the workers, ``to_device`` in the training process. With
    ``decode_on_device``, JPEGs travel as bytes and are decoded on the device in batch; otherwise workers
    send crops: uint8 ones with ``normalise_on_device`` (a GPU normalises them for next to nothing, and
    they are a quarter of the bytes), else normalised ones (on the CPU, the training process is the trainer).
    """

    paths: list[str]
    targets: np.ndarray
    recipe: ImageRecipe
    decode_on_device: bool
    normalise_on_device: bool
    # images nvjpeg refused (decoded on the CPU instead): warned about once per reader
    _device_refusals: int = dataclasses.field(default=0, init=False, repr=False)

    @property
    def pin_memory(self) -> bool:
        """Page-locked copies pay for crops; JPEG bytes are read by nvjpeg from wherever they are."""
        return not self.decode_on_device

    @property
    def prefetch_factor(self) -> int:
        """Batches each worker keeps ready: more of the small JPEG-byte batches, to ride out slow reads."""
        return 4 if self.decode_on_device else 2

    def decoded_item(self, index: int, generator: torch.Generator | None) -> Tensor:
        """Image ``index`` decoded, cropped and resized on the CPU: uint8 (3, S, S); draws from ``generator``."""
        path = self.paths[index]
        image = decode_on_cpu(read_bytes(path, index), path, index)
        return self.recipe.crop(image, self.recipe.draw(image.shape[-2], image.shape[-1], generator))

    def item(self, index: int, seed: int) -> Any:
        """In a worker: what the training process needs of sample ``index``; its draws come from ``seed``."""
        label = int(self.targets[index])
        if not self.decode_on_device:
            crop = self.decoded_item(index, _generator(seed))
            return (crop if self.normalise_on_device else self.recipe.normalise(crop)), label
        path = self.paths[index]
        data = read_bytes(path, index)
        frame = device_decodable(data)
        if frame is not None:
            draw = self.recipe.draw(frame.height, frame.width, _generator(seed))
            return DeviceSample(torch.frombuffer(data, dtype=torch.uint8), True, draw, index, label)
        image = decode_on_cpu(data, path, index)
        draw = self.recipe.draw(image.shape[-2], image.shape[-1], _generator(seed))
        return DeviceSample(image, False, draw, index, label)

    def collate(self, items: list[Any]) -> Any:
        """In a worker: the crops stacked, or an :class:`EncodedImages` batch for the device."""
        if not self.decode_on_device:
            # torch's collate stacks straight into shared memory in a worker (torch.stack, then sending, copies twice)
            return torch.utils.data.default_collate(items)
        samples: list[DeviceSample] = items
        return EncodedImages(
            encoded=[sample.image for sample in samples if sample.encoded],
            decoded=[sample.image for sample in samples if not sample.encoded],
            is_encoded=[sample.encoded for sample in samples],
            draws=[sample.draw for sample in samples],
            indices=[sample.index for sample in samples],
            labels=torch.tensor([sample.label for sample in samples]),
        )

    def to_device(self, batch: Any, device: torch.device) -> tuple[Tensor, Tensor]:
        """In the training process: normalised float images (N, 3, S, S) and int64 labels, on ``device``."""
        if not isinstance(batch, EncodedImages):
            images, labels = batch
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, dtype=torch.long, non_blocking=True)
            return (self.recipe.normalise(images) if self.normalise_on_device else images), labels
        positions = [position for position, is_encoded in enumerate(batch.is_encoded) if is_encoded]
        jpegs = iter(self._decode_on_device(batch.encoded, [batch.indices[p] for p in positions], device))
        others = iter(batch.decoded)
        crops = [
            self.recipe.crop(next(jpegs) if is_encoded else next(others).to(device), draw)
            for is_encoded, draw in zip(batch.is_encoded, batch.draws, strict=True)
        ]
        return self.recipe.normalise(torch.stack(crops)), batch.labels.to(device, dtype=torch.long)

    def _decode_on_device(self, encoded: list[Tensor], indices: list[int], device: torch.device) -> list[Tensor]:
        """The JPEGs decoded on ``device`` in one call; when that fails, one by one, so the culprit is named."""
        if not encoded:
            return []
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            with _torchvision_io():
                return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))
        except (RuntimeError, TypeError, ValueError):  # a bad file, or torchvision < 0.19 (no batched decode)
            pass
        images = []
        for data, index in zip(encoded, indices, strict=True):
            try:
                with _torchvision_io():
                    images.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except RuntimeError as device_error:
                path = self.paths[index]
                # Raises a DataError naming the file when no decoder can read it; else the device is at fault.
                images.append(decode_on_cpu(bytearray(data.numpy()), path, index).to(device))
                self._warn_refused(path, device, device_error)
        return images

    def _warn_refused(self, path: str, device: torch.device, error: RuntimeError) -> None:
        self._device_refusals += 1
        if self._device_refusals == 1:
            warnings.warn(
                f"decode: torchvision: the {device.type} decoder refused {path} ({_reason(error)}), which the CPU "
                "decoder reads; such images are decoded on the CPU in the training process (slower). If many "
                "are, set the dataset's decode_device: cpu to decode every image in the DataLoader workers.",
                RuntimeWarning,
                stacklevel=2,
            )
