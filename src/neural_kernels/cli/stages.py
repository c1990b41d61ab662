"""The zca, solve, train and report subcommands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from neural_kernels.cli.options import Subparsers, add_device, named_path, pick
from neural_kernels.errors import NeuralKernelsError
from neural_kernels.fields import (
    add_arguments,
    from_arguments,
    positive_int,
)
from neural_kernels.settings import SolverSettings, TrainSettings, ZcaSettings

# ------------------------------------------------------------------------------- ZCA


def add_zca_parser(sub: Subparsers) -> None:
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
    add_device(p)
    p.add_argument("--block-rows", type=positive_int, help="rows per streamed block")
    p.set_defaults(handler=_cmd_zca)


def _cmd_zca(args: argparse.Namespace) -> object:
    from neural_kernels.zca import whiten_files

    settings = from_arguments(ZcaSettings, args)
    options = pick(vars(args), "fit_on", "device", "block_rows")
    record = whiten_files(
        args.images, args.out_dir, settings, transform_path=args.transform, **options
    )
    return pick(record, "variant", "solver", "rank", "device", "fit_seconds")


# -------------------------------------------------------------- solvers and networks


def add_solve_parser(sub: Subparsers) -> None:
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
    add_device(p)
    p.add_argument("--out-dir", type=Path, required=True)
    p.set_defaults(handler=_cmd_solve)


def _cmd_solve(args: argparse.Namespace) -> object:
    from neural_kernels.solvers.stage import solve_files

    labels = dict(named_path(item, "--labels") for item in args.labels)
    settings = from_arguments(SolverSettings, args)
    record = solve_files(args.kernel_dir, labels, args.out_dir, settings, device=args.device)
    return {
        "selected": {k: v for k, v in record["selected"].items() if k != "rule"},
        "test_accuracy": record["test_accuracy"],
        "device": record["device"],
        "seconds": record["seconds"]["total"],
    }


def add_train_parser(sub: Subparsers) -> None:
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
    add_device(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out-dir", type=Path, required=True)
    p.set_defaults(handler=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> object:
    from neural_kernels.networks import train_network

    settings, progress = from_arguments(TrainSettings, args), not args.no_progress
    record = train_network(args.data, args.out_dir, settings, device=args.device, progress=progress)
    keys = ("model", "training_size", "test_accuracy", "device")
    return pick(record, *keys) | {"seconds": record["seconds"]["total"]}


# ---------------------------------------------------------------------------- report


def add_report_parser(sub: Subparsers) -> None:
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
