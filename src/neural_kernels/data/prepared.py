"""The prepared-dataset format, and the steps that write it.

A prepared dataset is a directory (``results/data/<name>/``) of plain ``.npy`` files
that ``numpy.load(..., mmap_mode="r")`` memory-maps::

    train_images.npy   (N_train, H, W, C) uint8      train_labels.npy  (N_train,) int64
    val_images.npy     (N_val,   H, W, C) uint8      val_labels.npy    (N_val,)   int64
    test_images.npy    (N_test,  H, W, C) uint8      test_labels.npy   (N_test,)  int64
    meta.json          classes, split sizes and class counts, source, checksum, seeds

``val`` is carved from the training data with a seed (never from the test data);
``test`` is the official test split where the source has one, otherwise a seeded,
class-stratified hold-out. ``meta.json`` is written last: a directory without it is
incomplete. A class-balanced subset (``subsets/n<size>-seed<seed>/``) holds
``train_images.npy``, ``train_labels.npy``, ``train_indices.npy`` (rows of the parent's
train split) and its own ``meta.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from neural_kernels import __version__
from neural_kernels.checks import check_classes
from neural_kernels.data.download import verify_checksum
from neural_kernels.data.readers import LabelledImages, RawDataset
from neural_kernels.data.sources import SOURCES, Source, SourceFiles
from neural_kernels.data.splits import balanced_subset, stratified_holdout
from neural_kernels.errors import ChecksumError, DataError
from neural_kernels.fields import replace_none
from neural_kernels.outputs import (
    array_bytes,
    open_memmap,
    require_space,
    save_npy,
    staged_directory,
    write_json,
)
from neural_kernels.registry import resolve
from neural_kernels.settings import PrepareSettings

log = logging.getLogger(__name__)

FORMAT = "neural_kernels.prepared/1"
SPLITS = ("train", "val", "test")
#: The refit's training set (hyperparameters are selected on val, then the models are
#: refit on both): the leading splits of SPLITS, in that order.
REFIT_SPLITS = SPLITS[:2]
META = "meta.json"
COPY_CHUNK = 4096


def split_files(split: str) -> tuple[str, str]:
    """File names of a split's images and labels inside a prepared directory."""
    return f"{split}_images.npy", f"{split}_labels.npy"


def prepared_files() -> list[str]:
    """Every file a prepared dataset directory holds, ``meta.json`` last."""
    return [name for split in SPLITS for name in split_files(split)] + [META]


def subset_files() -> list[str]:
    """Every file a subset directory holds, ``meta.json`` last."""
    return [*split_files("train"), "train_indices.npy", META]


def _write_rows(path: Path, source: NDArray, rows: NDArray[np.int64]) -> None:
    """Write ``source[rows]`` to a ``.npy`` in chunks (``source`` may be a memmap)."""
    out = open_memmap(path, source.dtype, (len(rows), *source.shape[1:]))
    for start in range(0, len(rows), COPY_CHUNK):
        out[start : start + COPY_CHUNK] = source[rows[start : start + COPY_CHUNK]]
    out.flush()
    del out


def _write_split(stage: Path, split: str, data: LabelledImages, rows: NDArray[np.int64]) -> None:
    """Write ``data[rows]`` (in the order of ``rows``) as ``<split>_{images,labels}.npy``."""
    image_file, label_file = split_files(split)
    _write_rows(stage / image_file, data.images, rows)
    save_npy(stage / label_file, data.labels[rows])


def class_counts(labels: NDArray[np.integer], num_classes: int) -> list[int]:
    """How many labels fall in each class id ``0..num_classes-1``."""
    return np.bincount(labels, minlength=num_classes).tolist()


def carve_splits(
    raw: RawDataset, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, tuple[LabelledImages, NDArray[np.int64]]]:
    """Map each of train/val/test to (source split, row indices into it).

    Test is the official test split if there is one, else a stratified
    ``test_fraction`` of everything; val is a stratified ``val_fraction`` of what
    remains for training. Both hold-outs use ``seed``.
    """
    if "test" in raw.splits:
        pool, test = raw.splits["train"], raw.splits["test"]
        test_rows = np.arange(len(test.labels), dtype=np.int64)
        pool_rows = np.arange(len(pool.labels), dtype=np.int64)
    else:
        pool = test = raw.splits["all"]
        pool_rows, test_rows = stratified_holdout(pool.labels, test_fraction, seed)
    kept, held = stratified_holdout(pool.labels[pool_rows], val_fraction, seed)
    return {
        "train": (pool, pool_rows[kept]),
        "val": (pool, pool_rows[held]),
        "test": (test, test_rows),
    }


def check_archive(archive: Path, checksum: str | None) -> None:
    """Fail clearly when an archive is missing or (with ``checksum``) not the right file."""
    if not archive.is_file():
        raise DataError(
            f"{archive} does not exist: download it first (`neural-kernels download`, or "
            f"the Snakemake rule download_archive) or fix --archive"
        )
    if checksum is not None and not verify_checksum(archive, checksum):
        raise ChecksumError(
            f"{archive} does not match {checksum}: it is truncated or not the expected "
            f"archive. Delete it and rerun to download it again."
        )


def read_source(
    source: str,
    scratch: Path,
    *,
    archive: Path | None = None,
    npz: Path | None = None,
    settings: PrepareSettings | None = None,
) -> RawDataset:
    """Read one registered source's native layout (see :mod:`neural_kernels.data.sources`)
    with ``settings`` (their ``image_size`` defaulting to the source's)."""
    entry = SOURCES.lookup(source)
    settings = replace_none(settings or PrepareSettings(), image_size=entry.image_size)
    if entry.input == "archive" and archive is None:
        raise DataError(
            f"source {source!r} needs --archive (the downloaded {entry.archive.filename})"
        )
    if entry.input == "npz" and npz is None:
        raise DataError(f"source {source!r} needs --npz (your images and labels)")
    files = SourceFiles(archive, npz, scratch, settings.image_size, settings)
    return resolve(entry.read)(files)


def prepare_dataset(
    source: str,
    out_dir: Path | str,
    settings: PrepareSettings | None = None,
    *,
    archive: Path | None = None,
    npz: Path | None = None,
    checksum: str | None = None,
    **options: object,
) -> dict:
    """Convert a source into a prepared dataset directory (see the module docstring).

    ``settings`` (or its fields as keywords, ``options``) sets the hold-outs:
    ``test_fraction`` is used only by sources without an official test split
    (digits, imagenet_r, a custom ``.npz`` without ``test_images``); ``None`` means the
    source's own (0.1 for imagenet_r, the thesis's 9:1 split; 0.2 otherwise). Returns
    the metadata written to ``meta.json``.
    """
    settings = dataclasses.replace(settings or PrepareSettings(), **options)
    entry = SOURCES.lookup(source)
    settings = replace_none(
        settings, test_fraction=entry.test_fraction, image_size=entry.image_size
    )
    out_dir = Path(out_dir)
    if archive is not None:
        check_archive(Path(archive), checksum)
    with staged_directory(out_dir, last=META) as stage:
        scratch = stage / "scratch"
        scratch.mkdir()
        raw = read_source(source, scratch, archive=archive, npz=npz, settings=settings)
        _check_raw(raw, source)
        carved = carve_splits(raw, settings.val_fraction, settings.test_fraction, settings.seed)
        sizes = {
            split_files(split)[0]: array_bytes((len(rows), *data.images.shape[1:]), np.uint8)
            for split, (data, rows) in carved.items()
        }
        require_space(out_dir, sizes, "prepare")
        inputs = {"archive": archive, "npz": npz, "checksum": checksum}
        meta = _prepared_meta(entry, raw, settings, inputs)
        for split, (data, rows) in carved.items():
            _write_split(stage, split, data, rows)
            meta["splits"][split] = {
                "size": len(rows),
                "class_counts": class_counts(data.labels[rows], meta["num_classes"]),
            }
            log.info("%s: %d images", split, len(rows))
        shutil.rmtree(scratch)
        write_json(stage / META, meta)
    return meta


def _check_raw(raw: RawDataset, source: str) -> None:
    """Every split of the source holds images, and its training images two classes or
    more (:func:`~neural_kernels.checks.check_classes`)."""
    for name, split in raw.splits.items():
        if len(split.labels) == 0:
            raise DataError(
                f"source {source!r}: its {name} split holds no images; give a dataset "
                "with images in every split"
            )
    pool = raw.splits.get("train", raw.splits.get("all"))
    check_classes(pool.labels, f"source {source!r}, training labels")


def _prepared_meta(entry: Source, raw: RawDataset, settings: PrepareSettings, inputs: dict) -> dict:
    """meta.json of a prepared dataset, but for its splits."""
    official_test = "test" in raw.splits
    return {
        "format": FORMAT,
        "source": entry.name,
        "classes": raw.classes,
        "num_classes": len(raw.classes),
        "image_shape": list(next(iter(raw.splits.values())).images.shape[1:]),
        "splits": {},
        "val_fraction": settings.val_fraction,
        "test_fraction": None if official_test else settings.test_fraction,
        "official_test_split": official_test,
        "seed": settings.seed,
        "archive": str(inputs["archive"]) if inputs["archive"] else None,
        "npz": str(inputs["npz"]) if inputs["npz"] else None,
        "checksum": inputs["checksum"],
        "image_size": settings.image_size,
        "neural_kernels_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        **raw.extra,
    }


def load_meta(data_dir: Path | str) -> dict:
    """The ``meta.json`` of a prepared dataset or subset directory."""
    path = Path(data_dir) / META
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(
            f"{path} is missing: {data_dir} is not a (complete) prepared dataset. "
            f"Run `neural-kernels prepare` or the Snakemake target for it."
        ) from None
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path} is not valid JSON ({error}); delete the directory and prepare again"
        ) from None
    if meta.get("format") != FORMAT:
        raise DataError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def load_split(data_dir: Path | str, split: str, mmap: bool = True) -> LabelledImages:
    """Images and labels of one split; images memory-mapped read-only when ``mmap``."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    data_dir = Path(data_dir)
    load_meta(data_dir)
    image_file, label_file = split_files(split)
    images = np.load(data_dir / image_file, mmap_mode="r" if mmap else None)
    labels = np.load(data_dir / label_file)
    return LabelledImages(images, labels)


def write_subset(data_dir: Path | str, size: int, seed: int, out_dir: Path | str) -> dict:
    """Write a class-balanced random subset of ``size`` training images (seeded)."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    parent = load_meta(data_dir)
    train = load_split(data_dir, "train")
    if size > len(train.labels):
        raise DataError(
            f"a subset of {size} images is larger than the {len(train.labels)} training "
            f"images of {data_dir}"
        )
    rows = balanced_subset(train.labels, size, seed)
    with staged_directory(out_dir, last=META) as stage:
        _write_split(stage, "train", train, rows)
        save_npy(stage / "train_indices.npy", rows)
        meta = {
            "format": FORMAT,
            "parent": str(data_dir),
            "size": size,
            "seed": seed,
            "sampling": "class-balanced random",
            "classes": parent["classes"],
            "num_classes": parent["num_classes"],
            "image_shape": parent["image_shape"],
            "splits": {
                "train": {
                    "size": size,
                    "class_counts": class_counts(train.labels[rows], parent["num_classes"]),
                }
            },
            "neural_kernels_version": __version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        write_json(stage / META, meta)
    return meta
