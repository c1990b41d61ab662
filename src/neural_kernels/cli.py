"""``neural-kernels <stage> ...``: one subcommand per pipeline stage.

Every subcommand works on plain files without Snakemake; the workflow's rules call
the same subcommands. Errors a user can fix print one line (``error: ...``) and exit
with status 1; nothing half-written is left behind.
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

Handler = Callable[[argparse.Namespace], object]


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not strictly between 0 and 1")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


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
    return str(download_file(url, out, checksum, retries=args.retries, timeout=args.timeout))


def _cmd_prepare(args: argparse.Namespace) -> object:
    from neural_kernels.data.prepared import prepare_dataset

    meta = prepare_dataset(
        args.source,
        args.out,
        archive=args.archive,
        npz=args.npz,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        seed=args.seed,
        image_size=args.image_size,
        checksum=args.checksum,
    )
    return {split: info["size"] for split, info in meta["splits"].items()}


def _cmd_subset(args: argparse.Namespace) -> object:
    from neural_kernels.data.prepared import write_subset

    meta = write_subset(args.data, args.size, args.seed, args.out)
    return meta["splits"]["train"]


def _cmd_zca(args: argparse.Namespace) -> object:
    from neural_kernels.zca import whiten_files

    fit_options = {}
    if args.transform is None:
        fit_options = {
            "variant": args.variant,
            "solver": args.solver,
            "rank": args.rank,
            "eps": args.eps,
            "oversample": args.oversample,
            "power_iters": args.power_iters,
            "flips": args.flips,
            "seed": args.seed,
        }
    record = whiten_files(
        args.images,
        args.out_dir,
        transform_path=args.transform,
        fit_on=args.fit_on,
        device=args.device,
        dtype=args.dtype,
        block_rows=args.block_rows,
        **fit_options,
    )
    return {key: record[key] for key in ("variant", "solver", "rank", "device", "fit_seconds")}


def _estimate_settings(args: argparse.Namespace) -> object:
    from neural_kernels.kernels.estimate import EstimateSettings

    return EstimateSettings(
        width=args.width,
        networks=args.networks,
        chunk_networks=args.chunk_networks,
        batch_size=args.batch_size,
        precision=args.precision or "float32",
        seed=args.seed,
        tile_rows=args.tile_rows,
    )


def _cmd_kernel(args: argparse.Namespace) -> object:
    import time

    import numpy as np

    from neural_kernels.architectures import myrtle
    from neural_kernels.device import device_name, resolve_device
    from neural_kernels.kernels.analytic import analytic_kernel
    from neural_kernels.kernels.estimate import estimate_kernel
    from neural_kernels.kernels.stage import ImageRows
    from neural_kernels.outputs import staged_directory

    arch = myrtle(args.arch, args.activation, args.gamma)
    images = ImageRows(args.images, flips=args.flips)
    images2 = None if args.images2 is None else ImageRows(args.images2)
    if images2 is not None and images2.shape[1:] != images.shape[1:]:
        raise NeuralKernelsError(
            f"--images2 has images of shape {images2.shape[1:]}, --images {images.shape[1:]}"
        )
    device = resolve_device(args.device)
    started = time.perf_counter()
    if args.method == "analytic":
        kernel = analytic_kernel(
            arch,
            images,
            images2,
            block_size=args.block_size,
            precision=args.precision or "float64",
            device=str(device),
        )
    else:
        kernel = estimate_kernel(arch, images, images2, _estimate_settings(args), device=device)
    seconds = time.perf_counter() - started
    out = Path(args.out)
    with staged_directory(out.parent) as stage:
        np.save(stage / out.name, kernel.astype(np.float64))
    return {
        "out": str(out),
        "shape": list(kernel.shape),
        "seconds": seconds,
        "device": device_name(device),
    }


def _kernel_inputs(args: argparse.Namespace) -> dict:
    evals = dict(_named_path(item, "--eval") for item in args.eval or [])
    return {
        "train": args.train,
        "evals": evals,
        "train_indices": args.train_indices,
        "val": args.val,
    }


def _cmd_kernel_shard(args: argparse.Namespace) -> object:
    from neural_kernels.kernels.stage import estimate_shard

    record = estimate_shard(
        **_kernel_inputs(args),
        out_dir=args.out_dir,
        arch=args.arch,
        activation=args.activation,
        gamma=args.gamma,
        flips=args.flips,
        settings=_estimate_settings(args),
        shard=args.shard,
        shards=args.shards,
        device=args.device,
    )
    return {key: record[key] for key in ("shard", "shards", "features", "device", "seconds")}


def _cmd_kernel_merge(args: argparse.Namespace) -> object:
    from neural_kernels.kernels.stage import merge_shards

    record = merge_shards(args.shards, args.out_dir)
    return {key: record[key] for key in ("features", "shards", "seconds")}


def _cmd_kernel_analytic(args: argparse.Namespace) -> object:
    from neural_kernels.kernels.stage import analytic_files

    record = analytic_files(
        **_kernel_inputs(args),
        out_dir=args.out_dir,
        arch=args.arch,
        activation=args.activation,
        gamma=args.gamma,
        flips=args.flips,
        block_size=args.block_size,
        precision=args.precision or "float64",
        device=args.device,
    )
    return {key: record[key] for key in ("pairs", "device", "seconds")}


def _cmd_solve(args: argparse.Namespace) -> object:
    from neural_kernels.solvers.stage import SolverSettings, solve_files

    labels = dict(_named_path(item, "--labels") for item in args.labels)
    settings = SolverSettings(
        method=args.method,
        eta_t=tuple(args.eta_t or ()),
        lambdas=tuple(args.lambdas or ()),
        batch_size=args.batch_size,
        steps=args.steps,
        seed=args.seed,
    )
    record = solve_files(args.kernel_dir, labels, args.out_dir, settings, device=args.device)
    return {
        "selected": {k: v for k, v in record["selected"].items() if k != "rule"},
        "test_accuracy": record["test_accuracy"],
        "device": record["device"],
        "seconds": record["seconds"]["total"],
    }


def _cmd_report(args: argparse.Namespace) -> object:
    from neural_kernels.report import render_report

    config = None
    if args.config_json is not None:
        try:
            config = json.loads(args.config_json)
        except ValueError as error:
            raise NeuralKernelsError(f"--config-json is not valid JSON ({error})") from None
    return render_report(
        args.results,
        args.out_dir,
        thesis_path=args.thesis,
        templates=args.templates,
        config=config,
    )


def _named_path(item: str, option: str) -> tuple[str, Path]:
    """``NAME=PATH`` -> ``(NAME, Path(PATH))``, or a clear error."""
    name, sep, path = item.partition("=")
    if not sep or not name.isidentifier() or not path:
        raise NeuralKernelsError(f"{option} takes NAME=PATH, got {item!r}")
    return name, Path(path)


def _add_architecture(p: argparse.ArgumentParser) -> None:
    from neural_kernels.catalog import ACTIVATIONS, MYRTLE_STAGES

    p.add_argument("--arch", choices=sorted(MYRTLE_STAGES), required=True)
    p.add_argument("--activation", choices=ACTIVATIONS, default="relu")
    p.add_argument("--gamma", type=float, default=1.0, help="gaussian: exp(gamma (r - 1))")
    p.add_argument(
        "--flips",
        action="store_true",
        help="append the horizontal mirrors of the (train) images, doubling them",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda:1")


def _add_estimate_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--width", type=_positive_int, default=64, help="channels per network")
    p.add_argument("--networks", type=_positive_int, default=64, help="random networks")
    p.add_argument(
        "--chunk-networks",
        type=_positive_int,
        default=16,
        help="networks drawn and run together (the unit of seeding and sharding)",
    )
    p.add_argument("--batch-size", type=_positive_int, default=256, help="images per forward")
    p.add_argument("--tile-rows", type=_positive_int, default=2048, help="Gram tile rows")
    p.add_argument("--seed", type=int, default=0, help="seed of the random networks")


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


def _cmd_sources(args: argparse.Namespace) -> object:
    from neural_kernels.data.sources import ARCHIVES

    return {
        name: {"url": s.url, "checksum": s.checksum, "description": s.description}
        for name, s in ARCHIVES.items()
    }


#: `train` options that map one-to-one onto TrainSettings fields (None: its default).
_TRAIN_KEYS = (
    "model", "width", "activation", "gamma", "epochs", "batch_size", "lr", "momentum",
    "weight_decay", "schedule", "crop", "flip", "seed", "deterministic",
)  # fmt: skip


def _cmd_train(args: argparse.Namespace) -> object:
    from neural_kernels.networks import TrainSettings, train_network

    given = {key: getattr(args, key) for key in _TRAIN_KEYS if getattr(args, key) is not None}
    record = train_network(
        args.data,
        args.out_dir,
        TrainSettings(**given),
        device=args.device,
        progress=not args.no_progress,
    )
    keys = ("model", "training_size", "test_accuracy", "device")
    return {key: record[key] for key in keys} | {"seconds": record["seconds"]["total"]}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    from neural_kernels.data.sources import ARCHIVES, SOURCE_NAMES

    parser = argparse.ArgumentParser(
        prog="neural-kernels",
        description="Scalable neural-network kernels for image classification.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<stage>")

    p = sub.add_parser(
        "sources",
        help="list the downloadable datasets with their official URLs and checksums",
        description="Print the official archive URL, checksum and content of each dataset as JSON.",
    )
    p.set_defaults(handler=_cmd_sources)

    p = sub.add_parser(
        "download",
        help="download an archive and verify its checksum",
        description=(
            "Download a file to --out, verifying its checksum; retries transient "
            "failures; never leaves an unverified file at --out. An existing --out "
            "with the right checksum is kept without network access."
        ),
    )
    p.add_argument(
        "--source", choices=sorted(ARCHIVES), help="use this dataset's official URL and checksum"
    )
    p.add_argument("--url", help="address to fetch (http, https or file); overrides --source's")
    p.add_argument("--checksum", help="'<md5|sha256|...>:<hex>'; overrides --source's")
    p.add_argument("--out", required=True, help="destination file, or directory (ends with /)")
    p.add_argument(
        "--retries", type=int, default=3, help="extra attempts on transient failures (default 3)"
    )
    p.add_argument(
        "--timeout", type=float, default=60.0, help="socket timeout in seconds (default 60)"
    )
    p.set_defaults(handler=_cmd_download)

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
    p.add_argument("--source", choices=SOURCE_NAMES, required=True)
    p.add_argument(
        "--archive", type=Path, help="the downloaded archive (cifar10, tiny_imagenet, imagenet_r)"
    )
    p.add_argument("--npz", type=Path, help="the .npz file (custom)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument(
        "--val-fraction",
        type=_fraction,
        default=0.1,
        help="share of training data held out for validation (default 0.1)",
    )
    p.add_argument(
        "--test-fraction",
        type=_fraction,
        help="share held out for test when the source has no official test split "
        "(default 0.1 for imagenet_r, the thesis's 9:1, else 0.2)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the hold-out splits (default 0)")
    p.add_argument(
        "--image-size",
        type=_positive_int,
        default=224,
        help="imagenet_r: resize images to this square size (default 224)",
    )
    p.add_argument("--checksum", help="recorded in meta.json for provenance")
    p.set_defaults(handler=_cmd_prepare)

    p = sub.add_parser(
        "subset",
        help="draw a class-balanced random subset of a prepared training split",
        description=(
            "Write OUT/train_{images,labels,indices}.npy and OUT/meta.json: SIZE "
            "training images of DATA, equally many per class, drawn with SEED."
        ),
    )
    p.add_argument("--data", type=Path, required=True, help="a prepared dataset directory")
    p.add_argument("--size", type=_positive_int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(handler=_cmd_subset)

    p = sub.add_parser(
        "zca",
        help="fit ZCA whitening on images and apply it (exact or randomized SVD)",
        description=(
            "Fit ZCA whitening on the first IMAGES file (N, H, W, C; uint8 pixels are "
            "scaled to [0, 1]), or on the first K stacked with --fit-on K, and apply it to "
            "every IMAGES file. Writes OUT_DIR/<file "
            "name> (float32, same shape) for each, OUT_DIR/transform.npz (re-apply it "
            "with --transform) and OUT_DIR/zca.json (settings, timings, device). "
            "Variants: 'thesis' = (x - mean) V diag(sqrt(N-1)/(D+eps)) V^T; 'shankar' "
            "= per-image centring and unit norm, then x (C + eps I)^(-1/2)."
        ),
    )
    p.add_argument("images", type=Path, nargs="+", metavar="IMAGES", help=".npy image arrays")
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument(
        "--transform", type=Path, help="apply this saved transform.npz instead of fitting"
    )
    p.add_argument(
        "--fit-on",
        type=_positive_int,
        default=1,
        metavar="K",
        help="fit on the first K IMAGES files stacked (train and val: 2); default 1",
    )
    p.add_argument("--variant", choices=("thesis", "shankar"), default="thesis")
    p.add_argument(
        "--solver",
        choices=("exact", "randomized", "auto"),
        default="auto",
        help="auto: exact up to 4096 features, randomized above (default auto)",
    )
    p.add_argument(
        "--rank", type=_positive_int, help="k components (default min(N, P); randomized: needed)"
    )
    p.add_argument(
        "--eps",
        type=float,
        help="thesis: added to singular values (default 0.1); shankar: eigenvalue bias "
        "(default 1e-5)",
    )
    p.add_argument("--oversample", type=int, default=10, help="randomized: extra columns")
    p.add_argument("--power-iters", type=int, default=4, help="randomized: power iterations")
    p.add_argument(
        "--flips", action="store_true", help="fit on the images and their horizontal flips"
    )
    p.add_argument("--seed", type=int, default=0, help="randomized: seed of the test matrix")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--block-rows", type=_positive_int, help="rows per streamed block")
    p.set_defaults(handler=_cmd_zca)

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
    _add_architecture(p)
    p.add_argument("--method", choices=("analytic", "estimate"), required=True)
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--images2", type=Path, help="rows of a cross kernel K(IMAGES2, IMAGES)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--precision",
        choices=("float64", "mixed", "float32", "tf32", "bf16"),
        help="analytic: float64 (default), mixed (float64 after the last pool) or float32; "
        "estimate: float32 (default), tf32 or bf16 features",
    )
    p.add_argument(
        "--block-size",
        type=_positive_int,
        help="analytic: images per block side (default: sized to the cache or GPU memory)",
    )
    _add_estimate_options(p)
    p.set_defaults(handler=_cmd_kernel)

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
    _add_architecture(p)
    _add_estimate_options(p)
    p.add_argument("--precision", choices=("float32", "tf32", "bf16"), default="float32")
    p.add_argument("--shard", type=int, default=0, help="0-based shard index")
    p.add_argument("--shards", type=_positive_int, default=1)
    p.set_defaults(handler=_cmd_kernel_shard)

    p = sub.add_parser(
        "kernel-merge",
        help="add estimate shards and apply the final projection",
        description="Write OUT_DIR/{train,<eval>}.npy (normalised kernels) and kernel.json.",
    )
    p.add_argument("shards", type=Path, nargs="+", metavar="SHARD_DIR")
    p.add_argument("--out-dir", type=Path, required=True)
    p.set_defaults(handler=_cmd_kernel_merge)

    p = sub.add_parser(
        "kernel-analytic",
        help="the exact analytic kernel of train and eval splits (resumable)",
        description=(
            "Write OUT_DIR/{train,<eval>}.npy and kernel.json; an interrupted run "
            "resumes from its finished blocks."
        ),
    )
    _add_kernel_inputs(p)
    _add_architecture(p)
    p.add_argument("--precision", choices=("float64", "mixed", "float32"), default="float64")
    p.add_argument(
        "--block-size",
        type=_positive_int,
        help="images per block side (default: sized to the cache or GPU memory)",
    )
    p.set_defaults(handler=_cmd_kernel_analytic)

    from neural_kernels.catalog import ACTIVATIONS, MYRTLE_STAGES

    p = sub.add_parser(
        "train",
        help="train a network baseline (ResNet18 or a finite Myrtle network), resumable",
        description=(
            "Train --model on the prepared dataset --data with SGD (momentum, weight "
            "decay, a per-step cosine or step schedule); keep the epoch with the best "
            "validation accuracy. Writes OUT_DIR/model.pt and OUT_DIR/metrics.json "
            "(per-epoch loss and accuracies, test accuracy of the best epoch, timings, "
            "device, peak memory). Checkpoints after every epoch in .<OUT_DIR>.resume/ "
            "beside OUT_DIR: a rerun with the same options resumes there. Mixed "
            "precision and channels_last on CUDA, float32 on the CPU."
        ),
    )
    p.add_argument("--data", type=Path, required=True, help="a prepared dataset directory")
    p.add_argument("--model", choices=("resnet18", *MYRTLE_STAGES), required=True)
    p.add_argument("--width", type=_positive_int, help="myrtle: channels (default 64)")
    p.add_argument("--activation", choices=ACTIVATIONS, help="myrtle: nonlinearity (relu)")
    p.add_argument("--gamma", type=float, help="myrtle, gaussian: exp(gamma (r - 1)) (1.0)")
    p.add_argument("--epochs", type=_positive_int, help="default 30")
    p.add_argument("--batch-size", type=_positive_int, help="default 128")
    p.add_argument(
        "--lr", type=float, help="peak learning rate (default 0.1; Myrtle networks 0.02)"
    )
    p.add_argument("--momentum", type=float, help="SGD momentum (default 0.9)")
    p.add_argument("--weight-decay", type=float, help="default 5e-4")
    p.add_argument(
        "--schedule",
        choices=("cosine", "step"),
        help="per step: cosine to zero (default), or step (x0.1 at 50%% and 75%%)",
    )
    p.add_argument(
        "--crop",
        type=_positive_int,
        help="train on random CROP x CROP windows, evaluate on the centre one (default: none)",
    )
    p.add_argument(
        "--flip", action="store_true", default=None, help="random horizontal flips in training"
    )
    p.add_argument("--seed", type=int, help="seed of the weights, data order and augmentation")
    p.add_argument(
        "--deterministic",
        action="store_true",
        default=None,
        help="torch.use_deterministic_algorithms(True): bit-for-bit reruns (slower on GPUs)",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out-dir", type=Path, required=True)
    p.set_defaults(handler=_cmd_train)

    p = sub.add_parser(
        "solve",
        help="kernel regression on a kernel directory: flow, ridge or boosting, selected on val",
        description=(
            "Fit every hyperparameter of the solver's grid on KERNEL_DIR/train.npy, pick "
            "the best on val, and write OUT_DIR/predictions.npz and metrics.json."
        ),
    )
    p.add_argument("--kernel-dir", type=Path, required=True, help="holds {train,val,test}.npy")
    p.add_argument(
        "--labels",
        nargs="+",
        required=True,
        metavar="SPLIT=PATH",
        help="integer labels of train, val and test (.npy)",
    )
    p.add_argument("--method", choices=("flow", "ridge", "boosting"), required=True)
    p.add_argument(
        "--eta-t", type=float, nargs="+", help="flow/boosting: eta t grid (default: a log grid)"
    )
    p.add_argument("--lambdas", type=float, nargs="+", help="ridge: lambda grid")
    p.add_argument("--batch-size", type=_positive_int, default=256, help="boosting: M")
    p.add_argument("--steps", type=_positive_int, default=20, help="boosting: number of steps")
    p.add_argument("--seed", type=int, default=0, help="boosting: seed of the batch shuffles")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")
    p.add_argument("--out-dir", type=Path, required=True)
    p.set_defaults(handler=_cmd_solve)

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
    print(json.dumps(result, indent=2))
    return 0
