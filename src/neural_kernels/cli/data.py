"""The data subcommands: sources, download, prepare, subset."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from neural_kernels.cli.options import Subparsers, pick
from neural_kernels.fields import add_arguments, from_arguments, positive_int
from neural_kernels.settings import DownloadSettings, PrepareSettings

# ------------------------------------------------------------------------------ data


def add_sources_parser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "sources",
        help="list the data sources, with the official URL and checksum of downloaded ones",
        description="Print every registered source as JSON (neural_kernels.data.sources).",
    )
    p.set_defaults(handler=_cmd_sources)


def _cmd_sources(args: argparse.Namespace) -> object:
    from neural_kernels.data.sources import describe_sources

    return describe_sources()


def add_download_parser(sub: Subparsers) -> None:
    from neural_kernels.data.sources import ARCHIVES

    p = sub.add_parser(
        "download",
        help="download an archive and verify its checksum",
        description=(
            "Download a file to --out, verifying its checksum; retries transient "
            "failures; never leaves an unverified file at --out. An existing --out "
            "with the right checksum is kept without network access."
        ),
    )
    p.add_argument("--source", choices=ARCHIVES, help="use this source's official URL and checksum")
    p.add_argument("--url", help="address to fetch (http, https or file); overrides --source's")
    p.add_argument("--checksum", help="'<md5|sha256|...>:<hex>'; overrides --source's")
    p.add_argument("--out", required=True, help="destination file, or directory (ends with /)")
    add_arguments(p, DownloadSettings)
    p.set_defaults(handler=_cmd_download)


def _cmd_download(args: argparse.Namespace) -> object:
    from neural_kernels.data.download import download_source

    settings = from_arguments(DownloadSettings, args)
    options = pick(vars(args), "source", "url", "checksum")
    return str(download_source(args.out, **options, **dataclasses.asdict(settings)))


def add_prepare_parser(sub: Subparsers) -> None:
    from neural_kernels.data.sources import SOURCES

    p = sub.add_parser(
        "prepare",
        help="convert a dataset into memory-mappable train/val/test .npy splits",
        description=(
            "Convert a source (digits, a downloaded archive, or a custom .npz of "
            "'images' (N,H,W[,C]) uint8 and 'labels' (N,) int, optionally "
            "'test_images'/'test_labels'/'classes') into OUT/{train,val,test}_"
            "{images,labels}.npy and OUT/meta.json. The validation split is a seeded, "
            "class-stratified fraction of the training data."
        ),
    )
    p.add_argument("--source", choices=SOURCES, required=True)
    p.add_argument("--archive", type=Path, help="the downloaded archive (sources that have one)")
    p.add_argument("--npz", type=Path, help="the .npz file (custom)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    add_arguments(p, PrepareSettings)
    p.add_argument("--checksum", help="recorded in meta.json for provenance")
    p.set_defaults(handler=_cmd_prepare)


def _cmd_prepare(args: argparse.Namespace) -> object:
    from neural_kernels.data.prepared import prepare_dataset

    settings = from_arguments(PrepareSettings, args)
    inputs = pick(vars(args), "archive", "npz", "checksum")
    meta = prepare_dataset(args.source, args.out, settings, **inputs)
    return {split: info["size"] for split, info in meta["splits"].items()}


def add_subset_parser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "subset",
        help="draw a class-balanced random subset of a prepared training split",
        description=(
            "Write OUT/train_{images,labels,indices}.npy and OUT/meta.json: SIZE "
            "training images of DATA, equally many per class, drawn with SEED."
        ),
    )
    p.add_argument("--data", type=Path, required=True, help="a prepared dataset directory")
    p.add_argument("--size", type=positive_int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(handler=_cmd_subset)


def _cmd_subset(args: argparse.Namespace) -> object:
    from neural_kernels.data.prepared import write_subset

    meta = write_subset(args.data, args.size, args.seed, args.out)
    return meta["splits"]["train"]
