"""Where each dataset comes from: official archive address, file name and checksum.

The digests are the published ones (torchvision's for CIFAR-10; the values every
Tiny ImageNet and ImageNet-R loader checks against). A config may override ``url`` and
``checksum`` per dataset (a mirror, or the loopback server of the tests).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchiveSource:
    """An archive on the web that :func:`neural_kernels.data.prepare.prepare_dataset` reads."""

    name: str
    url: str
    filename: str
    checksum: str
    description: str


ARCHIVES: dict[str, ArchiveSource] = {
    source.name: source
    for source in (
        ArchiveSource(
            name="cifar10",
            url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
            filename="cifar-10-python.tar.gz",
            checksum="md5:c58f30108f718f92721af3b95e74349a",
            description="CIFAR-10, python pickles: 50000 train / 10000 test, 32x32x3, 10 classes",
        ),
        ArchiveSource(
            name="tiny_imagenet",
            url="http://cs231n.stanford.edu/tiny-imagenet-200.zip",
            filename="tiny-imagenet-200.zip",
            checksum="md5:90528d7ca1a48142e341f4ef8d21d0de",
            description="Tiny ImageNet: 100000 train / 10000 val (our test), 64x64x3, 200 classes",
        ),
        ArchiveSource(
            name="imagenet_r",
            url="https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar",
            filename="imagenet-r.tar",
            checksum="md5:a61312130a589d0ca1a8fca1f2bd3337",
            description="ImageNet-R: 30000 renditions of 200 ImageNet classes, variable size",
        ),
    )
}

#: Every value the config's ``source`` key accepts.
SOURCE_NAMES: tuple[str, ...] = ("digits", *ARCHIVES, "custom")
