"""``neural-kernels <stage> ...``: one subcommand per pipeline stage.

Every subcommand works on plain files without Snakemake; the workflow's rules call
the same subcommands. Each stage is a pair: ``_add_<stage>_parser`` declares its
options (the settings' options come from :mod:`neural_kernels.settings`, where each is
defined once) and ``_cmd_<stage>`` runs it. Errors a user can fix print one line
(``error: ...``) and exit with status 1; nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from neural_kernels import __version__
from neural_kernels.errors import NeuralKernelsError
from neural_kernels.settings import (
    ANALYTIC_PRECISIONS,
    DEFAULT_STORAGE,
    DEVICE_HELP,
    ESTIMATE_PRECISIONS,
    KERNEL_METHODS,
    KERNEL_STORAGES,
    STORAGE_HELP,
    AnalyticSettings,
    DownloadSettings,
    EstimateSettings,
    KernelSpec,
    PrepareSettings,
    SolverSettings,
    TrainSettings,
    ZcaSettings,
    add_arguments,
    changed_fields,
    from_arguments,
    positive_int,
    refuse_unused,
)

Handler = Callable[[argparse.Namespace], object]
Subparsers = argparse._SubParsersAction


def _named_path(item: str, option: str) -> tuple[str, Path]:
    """``NAME=PATH`` -> ``(NAME, Path(PATH))``, or a clear error."""
    name, sep, path = item.partition("=")
    if not sep or not name.isidentifier() or not path:
        raise NeuralKernelsError(f"{option} takes NAME=PATH, got {item!r}")
    return name, Path(path)


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help=DEVICE_HELP)


def _pick(record: dict, *keys: str) -> dict:
    return {key: record[key] for key in keys}


# ------------------------------------------------------------------------------ data


def _add_sources_parser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "sources",
        help="list the data sources, with the official URL and checksum of downloaded ones",
        description="Print every registered source as JSON (neural_kernels.data.sources).",
    )
    p.set_defaults(handler=_cmd_sources)


def _cmd_sources(args: argparse.Namespace) -> object:
    from neural_kernels.data.sources import SOURCES

    listing = {}
    for name, source in SOURCES.items():
        entry = {"description": source.description, "input": source.input}
        if source.archive is not None:
            entry |= {"url": source.archive.url, "checksum": source.archive.checksum}
        listing[name] = entry
    return listing


def _add_download_parser(sub: Subparsers) -> None:
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
    from neural_kernels.data.download import download_file
    from neural_kernels.data.sources import ARCHIVES

    source = ARCHIVES.get(args.source) if args.source else None
    url = args.url or (source.url if source else None)
    checksum = args.checksum or (source.checksum if source else None)
    if url is None or checksum is None:
        raise NeuralKernelsError("give --source, or both --url and --checksum")
    out = Path(args.out)
    if args.out.endswith("/") or out.is_dir():
        out = out / (source.filename if source else Path(url).name)
    settings = from_arguments(DownloadSettings, args)
    return str(
        download_file(url, out, checksum, retries=settings.retries, timeout=settings.timeout)
    )


def _add_prepare_parser(sub: Subparsers) -> None:
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
    inputs = _pick(vars(args), "archive", "npz", "checksum")
    meta = prepare_dataset(args.source, args.out, settings, **inputs)
    return {split: info["size"] for split, info in meta["splits"].items()}


def _add_subset_parser(sub: Subparsers) -> None:
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


# ------------------------------------------------------------------------------- ZCA


def _add_zca_parser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "zca",
        help="fit ZCA whitening on images and apply it (exact or randomized SVD)",
        description=(
            "Fit ZCA whitening on the first IMAGES file (N, H, W, C; uint8 pixels are "
            "scaled to [0, 1]), or on the first K stacked with --fit-on K, and apply it to "
            "every IMAGES file. Writes OUT_DIR/<file name> (float32, same shape) for each, "
            "OUT_DIR/transform.npz (re-apply it with --transform) and OUT_DIR/zca.json "
            "(settings, timings, device). Variants: 'thesis' = (x - mean) V "
            "diag(sqrt(N-1)/(D+eps)) V^T; 'shankar' = per-image centring and unit norm, "
            "then x (C + eps I)^(-1/2)."
        ),
    )
    p.add_argument("images", type=Path, nargs="+", metavar="IMAGES", help=".npy image arrays")
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--transform", type=Path, help="apply this saved transform.npz instead")
    p.add_argument(
        "--fit-on",
        type=positive_int,
        default=1,
        metavar="K",
        help="fit on the first K IMAGES files stacked (train and val: 2); default 1",
    )
    add_arguments(p, ZcaSettings)
    _add_device(p)
    p.add_argument("--block-rows", type=positive_int, help="rows per streamed block")
    p.set_defaults(handler=_cmd_zca)


def _cmd_zca(args: argparse.Namespace) -> object:
    from neural_kernels.zca import whiten_files

    settings = from_arguments(ZcaSettings, args)
    if args.transform is not None:  # a saved transform: only the working dtype applies
        unused = changed_fields(settings, keep=("dtype",)) + ["fit_on"] * (args.fit_on != 1)
        refuse_unused("zca --transform", unused, "a fit, without --transform")
    options = _pick(vars(args), "fit_on", "device", "block_rows")
    record = whiten_files(
        args.images, args.out_dir, settings, transform_path=args.transform, **options
    )
    return _pick(record, "variant", "solver", "rank", "device", "fit_seconds")


# --------------------------------------------------------------------------- kernels


def _add_kernel_spec(p: argparse.ArgumentParser) -> None:
    add_arguments(p, KernelSpec)
    _add_device(p)


def _add_kernel_inputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train", type=Path, required=True, help="train images .npy (N, H, W, C)")
    p.add_argument("--train-indices", type=Path, help="use only these rows of --train (.npy)")
    p.add_argument(
        "--val",
        type=Path,
        help="validation images .npy: fitted rows after the train rows, in the one "
        "symmetric train.npy (the solve selects on them, then refits on train + val)",
    )
    p.add_argument(
        "--eval",
        action="append",
        metavar="NAME=PATH",
        help="an eval split: writes NAME.npy = K(eval, fitted rows); repeatable",
    )
    p.add_argument("--out-dir", type=Path, required=True)


def _kernel_inputs(args: argparse.Namespace) -> object:
    from neural_kernels.kernels.stage import KernelInputs

    evals = dict(_named_path(item, "--eval") for item in args.eval or [])
    return KernelInputs(args.train, evals, args.train_indices, args.val)


def _add_kernel_parser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "kernel",
        help="compute a Myrtle kernel of .npy images (analytic or estimated)",
        description=(
            "Write OUT (float64 .npy): K(IMAGES, IMAGES), or K(IMAGES2, IMAGES) with "
            "--images2. Images are float (N, H, W, C) arrays; no preprocessing happens "
            "here. 'analytic' is the exact infinite-width recursion (Shankar et al. "
            "2020); 'estimate' is the normalised Gram matrix of NETWORKS random "
            "networks of WIDTH channels (F = NETWORKS x WIDTH features)."
        ),
    )
    _add_kernel_spec(p)
    p.add_argument("--method", choices=KERNEL_METHODS, required=True)
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--images2", type=Path, help="rows of a cross kernel K(IMAGES2, IMAGES)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--precision",
        choices=dict.fromkeys(ANALYTIC_PRECISIONS + ESTIMATE_PRECISIONS),
        help="analytic: float64 (default), mixed or float32; estimate: float32 (default), "
        "tf32 or bf16 features",
    )
    # one float64 file: the kernel directories' storage setting does not apply
    add_arguments(p, AnalyticSettings, skip=("precision", "storage"))
    add_arguments(p, EstimateSettings, skip=("precision",))
    p.set_defaults(handler=_cmd_kernel)


def _method_settings(args: argparse.Namespace) -> AnalyticSettings | EstimateSettings:
    """The ``kernel`` command's settings of its ``--method``."""
    cls = AnalyticSettings if args.method == "analytic" else EstimateSettings
    other = EstimateSettings if cls is AnalyticSettings else AnalyticSettings
    unused = changed_fields(args, other, keep=("precision", "storage"))
    users = "--method " + ("estimate" if other is EstimateSettings else "analytic")
    refuse_unused(f"kernel --method {args.method}", unused, users)
    precision = args.precision or cls.__dataclass_fields__["precision"].default
    if cls is AnalyticSettings:
        return from_arguments(cls, args, precision=precision, storage="float64")
    return from_arguments(cls, args, precision=precision)


def _cmd_kernel(args: argparse.Namespace) -> object:
    import time

    import numpy as np

    from neural_kernels.device import device_name, resolve_device
    from neural_kernels.kernels.analytic import analytic_kernel
    from neural_kernels.kernels.estimate import estimate_kernel
    from neural_kernels.kernels.stage import ImageRows, check_finite_blocks, crop_maker
    from neural_kernels.outputs import array_bytes, require_space, save_npy, staged_directory

    spec, settings = from_arguments(KernelSpec, args), _method_settings(args)
    images = ImageRows(args.images, flips=spec.flips, crop=crop_maker(spec, "train", args.images))
    images2 = None
    if args.images2 is not None:
        images2 = ImageRows(args.images2, crop=crop_maker(spec, None, args.images2))
    if images2 is not None and images2.shape[1:] != images.shape[1:]:
        raise NeuralKernelsError(
            f"--images2 has images of shape {images2.shape[1:]}, --images {images.shape[1:]}"
        )
    out = Path(args.out)
    shape = (len(images2 if images2 is not None else images), len(images))
    require_space(out.parent, {out.name: array_bytes(shape, np.float64)}, "kernel")
    device = resolve_device(args.device)
    started = time.perf_counter()
    if isinstance(settings, AnalyticSettings):
        kernel = analytic_kernel(
            spec.network(),
            images,
            images2,
            block_size=settings.block_size,
            precision=settings.precision,
            device=str(device),
        )
    else:
        kernel = estimate_kernel(spec.network(), images, images2, settings, device=device)
    seconds = time.perf_counter() - started
    check_finite_blocks({out.stem: kernel}, out.parent)
    with staged_directory(out.parent) as stage:
        save_npy(stage / out.name, kernel.astype(np.float64))
    shape = list(kernel.shape)
    return {"out": str(out), "shape": shape, "seconds": seconds, "device": device_name(device)}


def _add_kernel_shard_parser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "kernel-shard",
        help="one shard of an estimated kernel: raw sums over a range of random networks",
        description=(
            "Write OUT_DIR/{train,<eval>}.npy (float64 sums of feature products), "
            "<eval>_sqnorm.npy and shard.json for the networks of shard SHARD of SHARDS. "
            "Combine the shards with kernel-merge."
        ),
    )
    _add_kernel_inputs(p)
    _add_kernel_spec(p)
    add_arguments(p, EstimateSettings)
    p.add_argument("--shard", type=int, default=0, help="0-based shard index")
    p.add_argument("--shards", type=positive_int, default=1)
    p.set_defaults(handler=_cmd_kernel_shard)


def _cmd_kernel_shard(args: argparse.Namespace) -> object:
    from neural_kernels.kernels.stage import estimate_shard

    spec, settings = from_arguments(KernelSpec, args), from_arguments(EstimateSettings, args)
    options = _pick(vars(args), "shard", "shards", "device")
    record = estimate_shard(_kernel_inputs(args), args.out_dir, spec, settings, **options)
    return _pick(record, "shard", "shards", "features", "device", "seconds")


def _add_kernel_merge_parser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "kernel-merge",
        help="add estimate shards and apply the final projection",
        description="Write OUT_DIR/{train,<eval>}.npy (normalised kernels) and kernel.json.",
    )
    p.add_argument("shards", type=Path, nargs="+", metavar="SHARD_DIR")
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument(
        "--storage",
        choices=KERNEL_STORAGES,
        default=DEFAULT_STORAGE,
        help=f"{STORAGE_HELP} (default float64)",
    )
    p.set_defaults(handler=_cmd_kernel_merge)


def _cmd_kernel_merge(args: argparse.Namespace) -> object:
    from neural_kernels.kernels.stage import merge_shards

    record = merge_shards(args.shards, args.out_dir, storage=args.storage)
    return _pick(record, "features", "shards", "storage", "seconds")


def _add_kernel_analytic_parser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "kernel-analytic",
        help="the exact analytic kernel of train and eval splits (resumable)",
        description=(
            "Write OUT_DIR/{train,<eval>}.npy and kernel.json; an interrupted run "
            "resumes from its finished blocks."
        ),
    )
    _add_kernel_inputs(p)
    _add_kernel_spec(p)
    add_arguments(p, AnalyticSettings)
    p.set_defaults(handler=_cmd_kernel_analytic)


def _cmd_kernel_analytic(args: argparse.Namespace) -> object:
    from neural_kernels.kernels.stage import analytic_files

    spec, settings = from_arguments(KernelSpec, args), from_arguments(AnalyticSettings, args)
    record = analytic_files(_kernel_inputs(args), args.out_dir, spec, settings, device=args.device)
    return _pick(record, "pairs", "device", "seconds")


# -------------------------------------------------------------- solvers and networks


def _add_solve_parser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "solve",
        help="kernel regression on a kernel directory (a registered solver), selected on val",
        description=(
            "Fit every hyperparameter of the solver's grid on the train rows, pick the "
            "best on val, refit on train + val where the kernel holds both, and write "
            "OUT_DIR/predictions.npz and metrics.json."
        ),
    )
    p.add_argument("--kernel-dir", type=Path, required=True, help="holds train.npy, evals")
    p.add_argument(
        "--labels",
        nargs="+",
        required=True,
        metavar="SPLIT=PATH",
        help="integer labels of train, val and test (.npy)",
    )
    add_arguments(p, SolverSettings)
    _add_device(p)
    p.add_argument("--out-dir", type=Path, required=True)
    p.set_defaults(handler=_cmd_solve)


def _cmd_solve(args: argparse.Namespace) -> object:
    from neural_kernels.solvers.stage import solve_files

    labels = dict(_named_path(item, "--labels") for item in args.labels)
    settings = from_arguments(SolverSettings, args)
    record = solve_files(args.kernel_dir, labels, args.out_dir, settings, device=args.device)
    return {
        "selected": {k: v for k, v in record["selected"].items() if k != "rule"},
        "test_accuracy": record["test_accuracy"],
        "device": record["device"],
        "seconds": record["seconds"]["total"],
    }


def _add_train_parser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "train",
        help="train a network baseline (ResNet18 or a finite Myrtle network), resumable",
        description=(
            "Train --model on the train + val splits of the prepared dataset --data with "
            "SGD (momentum, weight decay, a per-step cosine or step schedule) and report "
            "the final epoch's test accuracy. Writes OUT_DIR/model.pt and "
            "OUT_DIR/metrics.json. Checkpoints after every epoch in .<OUT_DIR>.resume/ "
            "beside OUT_DIR: a rerun with the same options resumes there. Mixed "
            "precision and channels_last on CUDA, float32 on the CPU."
        ),
    )
    p.add_argument("--data", type=Path, required=True, help="a prepared dataset directory")
    add_arguments(p, TrainSettings)
    _add_device(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out-dir", type=Path, required=True)
    p.set_defaults(handler=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> object:
    from neural_kernels.networks import train_network

    settings, progress = from_arguments(TrainSettings, args), not args.no_progress
    record = train_network(args.data, args.out_dir, settings, device=args.device, progress=progress)
    keys = ("model", "training_size", "test_accuracy", "device")
    return _pick(record, *keys) | {"seconds": record["seconds"]["total"]}


# ---------------------------------------------------------------------------- report


def _add_report_parser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "report",
        help="render report.html and report.md from existing results (recomputes nothing)",
        description=(
            "Read every metrics JSON and benchmark file under RESULTS and write "
            "OUT_DIR/report.html (self-contained), report.md and figures/*.svg."
        ),
    )
    p.add_argument("--results", type=Path, default=Path("results"))
    p.add_argument("--out-dir", type=Path, default=Path("report"))
    p.add_argument("--thesis", type=Path, default=Path("report/thesis.yaml"))
    p.add_argument("--templates", type=Path, default=Path("report/templates"))
    p.add_argument("--config-json", help="the workflow's config (for provenance), as JSON")
    p.set_defaults(handler=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> object:
    from neural_kernels.report import render_report

    config = None
    if args.config_json is not None:
        try:
            config = json.loads(args.config_json)
        except ValueError as error:
            raise NeuralKernelsError(f"--config-json is not valid JSON ({error})") from None
    return render_report(
        args.results, args.out_dir, thesis_path=args.thesis, templates=args.templates, config=config
    )


#: Every subcommand, in the order of ``neural-kernels --help``.
SUBCOMMANDS = (
    _add_sources_parser,
    _add_download_parser,
    _add_prepare_parser,
    _add_subset_parser,
    _add_zca_parser,
    _add_kernel_parser,
    _add_kernel_shard_parser,
    _add_kernel_merge_parser,
    _add_kernel_analytic_parser,
    _add_train_parser,
    _add_solve_parser,
    _add_report_parser,
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="neural-kernels",
        description="Scalable neural-network kernels for image classification.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<stage>")
    for add_parser in SUBCOMMANDS:
        add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; print its result as JSON on stdout."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        result = args.handler(args)
    except NeuralKernelsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # a full, read-only or unwritable filesystem; else a bug
        from neural_kernels.outputs import disk_error_message

        message = disk_error_message(error)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        from neural_kernels.outputs import interrupted_message

        print(f"error: {interrupted_message()}", file=sys.stderr)
        return 130
    print(json.dumps(result, indent=2))
    return 0
