"""The kernel subcommands: kernel, kernel-shard, kernel-merge, kernel-analytic."""

from __future__ import annotations

import argparse
from pathlib import Path

from neural_kernels.cli.options import Subparsers, add_device, named_path, pick
from neural_kernels.fields import (
    add_arguments,
    changed_fields,
    from_arguments,
    positive_int,
    refuse_unused,
)
from neural_kernels.settings import (
    ANALYTIC_PRECISIONS,
    DEFAULT_STORAGE,
    ESTIMATE_PRECISIONS,
    KERNEL_METHODS,
    KERNEL_STORAGES,
    STORAGE_HELP,
    AnalyticSettings,
    EstimateSettings,
    KernelSpec,
)

# --------------------------------------------------------------------------- kernels


def _add_kernel_spec(p: argparse.ArgumentParser) -> None:
    add_arguments(p, KernelSpec)
    add_device(p)


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
    from neural_kernels.kernels.inputs import KernelInputs

    evals = dict(named_path(item, "--eval") for item in args.eval or [])
    return KernelInputs(args.train, evals, args.train_indices, args.val)


def add_kernel_parser(sub: Subparsers) -> None:
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
    from neural_kernels.kernels.stage import kernel_file

    spec, settings = from_arguments(KernelSpec, args), _method_settings(args)
    return kernel_file(
        args.images, args.out, spec, settings, images2=args.images2, device=args.device
    )


def add_kernel_shard_parser(sub: Subparsers) -> None:
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
    options = pick(vars(args), "shard", "shards", "device")
    record = estimate_shard(_kernel_inputs(args), args.out_dir, spec, settings, **options)
    return pick(record, "shard", "shards", "features", "device", "seconds")


def add_kernel_merge_parser(sub: Subparsers) -> None:
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
    from neural_kernels.kernels.merge import merge_shards

    record = merge_shards(args.shards, args.out_dir, storage=args.storage)
    return pick(record, "features", "shards", "storage", "seconds")


def add_kernel_analytic_parser(sub: Subparsers) -> None:
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
    return pick(record, "pairs", "device", "seconds")
