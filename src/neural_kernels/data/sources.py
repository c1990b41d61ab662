"""The data sources by name: where each comes from and which reader decodes it.

:data:`SOURCES` is the registry that ``neural-kernels prepare --source``, the config
schema's check and the workflow read. A source is a reader (a function of
:class:`SourceFiles` returning a :class:`~neural_kernels.data.readers.RawDataset`) and,
for a downloaded dataset, its official archive: address, file name and checksum. The
digests are the published ones (torchvision's for CIFAR-10; the values every Tiny
ImageNet and ImageNet-R loader checks against). A config may override ``url`` and
``checksum`` per dataset (a mirror, or the loopback server of the tests).

A new source is one :func:`register_source` call with its reader.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from neural_kernels.registry import Registry
from neural_kernels.settings import PrepareSettings


@dataclass(frozen=True)
class ArchiveSource:
    """An archive on the web that :func:`neural_kernels.data.prepare.prepare_dataset` reads.

    ``train_images``, ``test_images`` (``None``: no official test split, all images
    are ``train_images``) and ``classes`` are its official sizes, which size the
    configured solves before anything is downloaded (:mod:`neural_kernels.sizing`).
    """

    name: str
    url: str
    filename: str
    checksum: str
    description: str
    train_images: int
    test_images: int | None
    classes: int


ARCHIVES: dict[str, ArchiveSource] = {
    source.name: source
    for source in (
        ArchiveSource(
            name="cifar10",
            url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
            filename="cifar-10-python.tar.gz",
            checksum="md5:c58f30108f718f92721af3b95e74349a",
            description="CIFAR-10, python pickles: 50000 train / 10000 test, 32x32x3, 10 classes",
            train_images=50_000,
            test_images=10_000,
            classes=10,
        ),
        ArchiveSource(
            name="tiny_imagenet",
            url="http://cs231n.stanford.edu/tiny-imagenet-200.zip",
            filename="tiny-imagenet-200.zip",
            checksum="md5:90528d7ca1a48142e341f4ef8d21d0de",
            description="Tiny ImageNet: 100000 train / 10000 val (our test), 64x64x3, 200 classes",
            train_images=100_000,
            test_images=10_000,
            classes=200,
        ),
        ArchiveSource(
            name="imagenet_r",
            url="https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar",
            filename="imagenet-r.tar",
            checksum="md5:a61312130a589d0ca1a8fca1f2bd3337",
            description="ImageNet-R: 30000 renditions of 200 ImageNet classes, variable size",
            train_images=30_000,
            test_images=None,
            classes=200,
        ),
    )
}


@dataclass(frozen=True)
class SourceFiles:
    """What a reader is given: its input file, a scratch directory it may fill and the
    prepare settings (their ``image_size`` resolved to the source's default)."""

    archive: Path | None  # the downloaded archive (sources with one)
    npz: Path | None  # the user's .npz (sources that read one)
    scratch: Path  # removed after the prepare stage
    image_size: int | None  # the square size of a source's images (image_size)
    settings: PrepareSettings | None = None  # what a generated source (synthetic) reads


@dataclass(frozen=True)
class Source:
    """A registered data source.

    ``read``: its reader, ``"module:function"`` (imported when it runs) or the function;
    ``input``: what it reads, ``"archive"`` (then ``archive`` is set), ``"npz"`` or
    ``None``; ``test_fraction``: the share held out as test when it has no official
    test split; ``image_size``: the default of the ``image_size`` setting for a source
    whose images take that size (imagenet_r resizes to it, synthetic draws at it;
    ``None``: the images keep their own).
    """

    name: str
    read: str | Callable
    description: str
    input: str | None = None
    archive: ArchiveSource | None = None
    test_fraction: float = 0.2
    image_size: int | None = None


SOURCES: Registry = Registry("source")


def register_source(source: Source) -> Source:
    """Add ``source`` under its name; ``neural-kernels prepare --source`` accepts it at
    once (a config needs it in the schema's ``source`` enum too)."""
    if (source.input == "archive") != (source.archive is not None):
        raise ValueError(f"{source.name}: input 'archive' goes with an ArchiveSource")
    return SOURCES.register(source.name, source)


_READERS = "neural_kernels.data.readers"
register_source(Source("digits", f"{_READERS}:digits_source", "scikit-learn's bundled 8x8 digits"))
for _archive in ARCHIVES.values():
    register_source(
        Source(
            _archive.name,
            f"{_READERS}:{_archive.name}_source",
            _archive.description,
            input="archive",
            archive=_archive,
            # the thesis splits ImageNet-R 9:1
            test_fraction=0.1 if _archive.name == "imagenet_r" else 0.2,
            image_size=224 if _archive.name == "imagenet_r" else None,
        )
    )
register_source(
    Source(
        "synthetic",
        "neural_kernels.data.synthetic:read_synthetic",
        "seeded class-structured images of any count and shape: size (train + val), "
        "test_size, image_size (32), channels (3), classes (10), seed",
        image_size=32,
    )
)
register_source(
    Source(
        "custom",
        f"{_READERS}:custom_source",
        "your .npz: 'images' (N,H,W[,C]) uint8, 'labels' (N,) int; optional "
        "'test_images', 'test_labels', 'classes'",
        input="npz",
    )
)


def describe_sources() -> dict[str, dict]:
    """Every registered source: its description and input, with the official URL and
    checksum of a downloaded one (what ``neural-kernels sources`` prints)."""
    listing = {}
    for name, source in SOURCES.items():
        entry = {"description": source.description, "input": source.input}
        if source.archive is not None:
            entry |= {"url": source.archive.url, "checksum": source.archive.checksum}
        listing[name] = entry
    return listing
