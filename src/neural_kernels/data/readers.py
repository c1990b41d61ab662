"""Readers that turn each source's native layout into uint8 NHWC arrays and int labels.

Archives are read in place (``tarfile``/``zipfile`` members are streamed), so no
half-extracted tree is ever left behind. Large image sets are decoded into a
memory-mapped scratch ``.npy`` that the caller owns and deletes.
"""

from __future__ import annotations

import io
import logging
import pickle
import re
import tarfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from neural_kernels.errors import DataError
from neural_kernels.outputs import open_memmap

if TYPE_CHECKING:
    from neural_kernels.data.sources import SourceFiles

log = logging.getLogger(__name__)

WNID = re.compile(r"^n\d{8}$")


@dataclass
class LabelledImages:
    """Images ``(N, H, W, C)`` uint8 (possibly a memmap) and labels ``(N,)`` int64."""

    images: NDArray[np.uint8]
    labels: NDArray[np.int64]

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or len(self.images) != len(self.labels):
            raise DataError(
                f"expected images (N, H, W, C) and N labels, got {self.images.shape} and "
                f"{self.labels.shape}"
            )


@dataclass
class RawDataset:
    """A source as published: its official splits (``train``/``test``, or ``all``)."""

    splits: dict[str, LabelledImages]
    classes: list[str]
    extra: dict[str, object] = field(default_factory=dict)


def open_scratch_images(path: Path, n: int, shape: tuple[int, int, int]) -> np.memmap:
    """A writable memory-mapped ``(n, *shape)`` uint8 ``.npy`` to decode images into."""
    return open_memmap(path, np.uint8, (n, *shape))


def decode_rgb(data: bytes, name: str, size: int | None = None) -> NDArray[np.uint8]:
    """Decode an encoded image (JPEG, PNG, ...) to ``(H, W, 3)`` uint8 RGB.

    Greyscale and palette images are converted to RGB. With ``size`` the image is
    resized to ``size x size`` (bilinear, antialiased), as the thesis resizes ImageNet-R.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            rgb = image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(f"cannot decode image {name}: {error}") from None
    if size is not None and rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def _archive_error(archive: Path, what: str, hint: str) -> DataError:
    return DataError(f"{archive}: {what}. {hint} Delete the file and rerun to download it again.")


# --------------------------------------------------------------------------- digits


def read_digits() -> RawDataset:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes, no network).

    Pixel values 0..16 are scaled to 0..255 (``round(v * 255 / 16)``).
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = bunch.target.astype(np.int64)
    return RawDataset(
        splits={"all": LabelledImages(images, labels)},
        classes=[str(name) for name in bunch.target_names],
    )


# --------------------------------------------------------------------------- CIFAR-10

CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR10_TEST = ["test_batch"]


def _unpickle_member(tar: tarfile.TarFile, name: str, archive: Path) -> dict:
    try:
        handle = tar.extractfile(f"{CIFAR10_DIR}/{name}")
    except KeyError:
        raise _archive_error(
            archive,
            f"member {CIFAR10_DIR}/{name} is missing",
            "Is this the CIFAR-10 *python* archive (cifar-10-python.tar.gz)?",
        ) from None
    if handle is None:
        raise _archive_error(archive, f"{CIFAR10_DIR}/{name} is not a file", "")
    record = pickle.load(handle, encoding="bytes")
    # The official pickles were written by Python 2: keys are bytes.
    return {key.decode() if isinstance(key, bytes) else key: value for key, value in record.items()}


def _cifar10_batches(tar: tarfile.TarFile, names: list[str], archive: Path) -> LabelledImages:
    images, labels = [], []
    for name in names:
        batch = _unpickle_member(tar, name, archive)
        data = np.asarray(batch["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise _archive_error(archive, f"{name} holds data of shape {data.shape}", "")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch["labels"], dtype=np.int64))
    return LabelledImages(np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels))


def read_cifar10(archive: Path) -> RawDataset:
    """The CIFAR-10 python archive: five training pickles and one test pickle.

    Each pickle holds ``data`` (N x 3072, channel-major 32x32 planes) and ``labels``;
    ``batches.meta`` holds ``label_names``.
    """
    try:
        with tarfile.open(archive, "r:*") as tar:
            meta = _unpickle_member(tar, "batches.meta", archive)
            classes = [
                name.decode() if isinstance(name, bytes) else str(name)
                for name in meta["label_names"]
            ]
            splits = {
                "train": _cifar10_batches(tar, CIFAR10_TRAIN, archive),
                "test": _cifar10_batches(tar, CIFAR10_TEST, archive),
            }
    except (tarfile.TarError, EOFError, pickle.UnpicklingError, OSError) as error:
        raise _archive_error(archive, f"unreadable archive ({error})", "") from None
    return RawDataset(splits=splits, classes=classes)


# --------------------------------------------------------------------------- Tiny ImageNet


def _decode_members(
    read: Callable[[str], bytes],
    members: list[tuple[str, int]],
    scratch: Path,
    key: str,
    size: int | None,
    expected_hw: tuple[int, int] | None,
    desc: str,
) -> LabelledImages:
    """Decode ``members`` (name, label) with ``read(name) -> bytes`` into a scratch memmap."""
    if not members:
        raise DataError(f"no images found for split {key!r}")
    first = decode_rgb(read(members[0][0]), members[0][0], size)
    shape = first.shape
    if expected_hw is not None and shape[:2] != expected_hw:
        raise DataError(f"{members[0][0]} is {shape[:2]}, expected {expected_hw}")
    images = open_scratch_images(scratch / f"{key}_images.npy", len(members), shape)
    labels = np.empty(len(members), dtype=np.int64)
    for i, (name, label) in enumerate(tqdm(members, desc=desc, unit="img", mininterval=1.0)):
        pixels = first if i == 0 else decode_rgb(read(name), name, size)
        if pixels.shape != shape:
            raise DataError(f"{name} is {pixels.shape}, expected {shape} like the others")
        images[i] = pixels
        labels[i] = label
    images.flush()
    return LabelledImages(images, labels)


def _word_names(text: str, wnids: Iterable[str]) -> list[str]:
    """First synonym of each WordNet id in a ``words.txt``-style ``wnid<TAB>names`` text."""
    names: dict[str, str] = {}
    for line in text.splitlines():
        wnid, _, words = line.partition("\t")
        if words:
            names[wnid.strip()] = words.split(",")[0].strip()
    return [names.get(wnid, wnid) for wnid in wnids]


def read_tiny_imagenet(archive: Path, scratch: Path) -> RawDataset:
    """The tiny-imagenet-200 zip: ``train/<wnid>/images/*.JPEG`` and the labelled val set.

    The official val split (labels in ``val/val_annotations.txt``) is our test split,
    as in the thesis (train:val = 10:1); the unlabelled official test set is ignored.
    Classes are the sorted WordNet ids of ``wnids.txt``.
    """
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as error:
        raise _archive_error(archive, f"not a readable zip file ({error})", "") from None
    with zf:
        names = zf.namelist()
        roots = [n.removesuffix("wnids.txt") for n in names if n.endswith("wnids.txt")]
        if len(roots) != 1:
            raise _archive_error(
                archive,
                "no single wnids.txt found",
                "Is this tiny-imagenet-200.zip?",
            )
        root = roots[0]

        def read(name: str) -> bytes:
            try:
                return zf.read(name)
            except (KeyError, zipfile.BadZipFile, OSError) as error:
                raise _archive_error(archive, f"cannot read {name} ({error})", "") from None

        wnids = sorted(w.strip() for w in read(root + "wnids.txt").decode().split() if w.strip())
        index = {wnid: i for i, wnid in enumerate(wnids)}
        train = sorted(
            (name, index[PurePosixPath(name).parts[-3]])
            for name in names
            if name.startswith(root + "train/")
            and name.lower().endswith((".jpeg", ".jpg", ".png"))
            and PurePosixPath(name).parts[-3] in index
        )
        annotations = root + "val/val_annotations.txt"
        if annotations not in names:
            raise _archive_error(
                archive, f"{annotations} is missing", "Is this tiny-imagenet-200.zip?"
            )
        test = []
        for line in read(annotations).decode().splitlines():
            fields = line.split("\t")
            if len(fields) < 2:
                continue
            filename, wnid = fields[0], fields[1]
            if wnid not in index:
                raise _archive_error(archive, f"val_annotations.txt names unknown class {wnid}", "")
            test.append((f"{root}val/images/{filename}", index[wnid]))
        words = root + "words.txt"
        classes = _word_names(read(words).decode(), wnids) if words in names else list(wnids)
        splits = {
            key: _decode_members(read, members, scratch, key, None, (64, 64), f"decode {key}")
            for key, members in (("train", train), ("test", test))
        }
    return RawDataset(splits=splits, classes=classes, extra={"wnids": wnids})


# --------------------------------------------------------------------------- ImageNet-R


def read_imagenet_r(archive: Path, image_size: int, scratch: Path) -> RawDataset:
    """The imagenet-r tar: ``imagenet-r/<wnid>/*.jpg``, resized to ``image_size`` squared.

    Returned as one ``all`` split (the thesis splits it 9:1 with a seed).
    """
    try:
        tar = tarfile.open(archive, "r:*")  # noqa: SIM115 -- closed by `with tar` below
    except (tarfile.TarError, OSError) as error:
        raise _archive_error(archive, f"not a readable tar file ({error})", "") from None
    with tar:
        try:
            members = [m for m in tar.getmembers() if m.isfile()]
        except (tarfile.TarError, EOFError, OSError) as error:
            raise _archive_error(archive, f"unreadable archive ({error})", "") from None
        images = [
            m
            for m in members
            if len(PurePosixPath(m.name).parts) >= 2
            and WNID.match(PurePosixPath(m.name).parts[-2])
            and m.name.lower().endswith((".jpg", ".jpeg", ".png"))
        ]
        wnids = sorted({PurePosixPath(m.name).parts[-2] for m in images})
        if not wnids:
            raise _archive_error(
                archive, "no <wnid>/<image> members found", "Is this imagenet-r.tar?"
            )
        index = {wnid: i for i, wnid in enumerate(wnids)}
        by_name = {m.name: m for m in images}

        def read(name: str) -> bytes:
            try:
                handle = tar.extractfile(by_name[name])
                assert handle is not None
                return handle.read()
            except (tarfile.TarError, EOFError, OSError) as error:
                raise _archive_error(archive, f"cannot read {name} ({error})", "") from None

        ordered = sorted((m.name, index[PurePosixPath(m.name).parts[-2]]) for m in images)
        readme = [m for m in members if m.name.endswith("README.txt")]
        names = (
            _word_names(
                re.sub(r"^(n\d{8}) ", r"\1\t", read_text(tar, readme[0]), flags=re.M), wnids
            )
            if readme
            else list(wnids)
        )
        split = _decode_members(read, ordered, scratch, "all", image_size, None, "decode all")
    return RawDataset(splits={"all": split}, classes=names, extra={"wnids": wnids})


def read_text(tar: tarfile.TarFile, member: tarfile.TarInfo) -> str:
    """A text member of a tar archive, decoded as UTF-8 (undecodable bytes replaced)."""
    handle = tar.extractfile(member)
    return handle.read().decode("utf-8", errors="replace") if handle else ""


# --------------------------------------------------------------------------- custom .npz

CUSTOM_KEYS = ("images", "labels", "test_images", "test_labels", "classes")


def _custom_images(npz: Path, key: str, array: np.ndarray) -> NDArray[np.uint8]:
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or min(array.shape) == 0:
        raise DataError(
            f"{npz}: '{key}' has shape {array.shape}; expected (N, H, W, C) or (N, H, W) "
            f"with no empty axis"
        )
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.integer) and array.min() >= 0 and array.max() <= 255:
        return array.astype(np.uint8)
    raise DataError(
        f"{npz}: '{key}' has dtype {array.dtype} (range {array.min()}..{array.max()}); "
        f"expected uint8 pixels 0..255. Convert floats in [0, 1] with "
        f"(x * 255).round().astype(np.uint8)."
    )


def _custom_labels(npz: Path, key: str, array: np.ndarray, n: int) -> NDArray[np.int64]:
    if array.ndim != 1 or len(array) != n:
        raise DataError(
            f"{npz}: '{key}' has shape {array.shape}; expected ({n},), one label per image"
        )
    if not np.issubdtype(array.dtype, np.integer):
        raise DataError(
            f"{npz}: '{key}' has dtype {array.dtype}; expected integer class ids 0..C-1"
        )
    if n and array.min() < 0:
        raise DataError(f"{npz}: '{key}' holds negative labels; expected class ids 0..C-1")
    return array.astype(np.int64)


def read_custom(npz: Path) -> RawDataset:
    """A user's ``.npz``: ``images`` (N, H, W[, C]) uint8 and ``labels`` (N,) int.

    Optional: ``test_images`` and ``test_labels`` (an official test split; otherwise
    one is carved out with a seed) and ``classes`` (one name per class id).
    """
    try:
        with np.load(npz, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except FileNotFoundError:
        raise DataError(f"{npz} does not exist: set the dataset's 'path' in the config") from None
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as error:
        raise DataError(
            f"{npz} is not a readable .npz file ({error}); write it with "
            f"numpy.savez(path, images=..., labels=...)"
        ) from None
    unknown = sorted(set(arrays) - set(CUSTOM_KEYS))
    if unknown:
        raise DataError(f"{npz}: unknown keys {unknown}; allowed keys are {list(CUSTOM_KEYS)}")
    for key in ("images", "labels"):
        if key not in arrays:
            raise DataError(f"{npz}: missing key '{key}'; found {sorted(arrays)}")
    if ("test_images" in arrays) != ("test_labels" in arrays):
        raise DataError(f"{npz}: give both 'test_images' and 'test_labels', or neither")

    splits: dict[str, LabelledImages] = {}
    pairs = [("images", "labels", "train" if "test_images" in arrays else "all")]
    if "test_images" in arrays:
        pairs.append(("test_images", "test_labels", "test"))
    for image_key, label_key, split in pairs:
        images = _custom_images(npz, image_key, arrays[image_key])
        labels = _custom_labels(npz, label_key, arrays[label_key], len(images))
        splits[split] = LabelledImages(images, labels)
    shapes = {s.images.shape[1:] for s in splits.values()}
    if len(shapes) > 1:
        raise DataError(f"{npz}: train and test images differ in shape: {sorted(shapes)}")

    num_classes = int(max(s.labels.max() for s in splits.values())) + 1
    if "classes" in arrays:
        classes = [str(c) for c in np.asarray(arrays["classes"]).ravel()]
        if len(classes) < num_classes:
            raise DataError(
                f"{npz}: 'classes' names {len(classes)} classes but labels go up to "
                f"{num_classes - 1}"
            )
    else:
        classes = [str(i) for i in range(num_classes)]
    return RawDataset(splits=splits, classes=classes)


# ------------------------------------------------- the registered sources' entry points


def digits_source(files: SourceFiles) -> RawDataset:
    """Source ``digits``: :func:`read_digits`."""
    return read_digits()


def cifar10_source(files: SourceFiles) -> RawDataset:
    """Source ``cifar10``: :func:`read_cifar10` of the downloaded archive."""
    return read_cifar10(files.archive)


def tiny_imagenet_source(files: SourceFiles) -> RawDataset:
    """Source ``tiny_imagenet``: :func:`read_tiny_imagenet` of the downloaded archive."""
    return read_tiny_imagenet(files.archive, files.scratch)


def imagenet_r_source(files: SourceFiles) -> RawDataset:
    """Source ``imagenet_r``: :func:`read_imagenet_r`, resized to ``image_size``."""
    return read_imagenet_r(files.archive, files.image_size, files.scratch)


def custom_source(files: SourceFiles) -> RawDataset:
    """Source ``custom``: :func:`read_custom` of the user's ``.npz``."""
    return read_custom(files.npz)
