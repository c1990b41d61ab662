"""``neural-kernels <stage> ...``: one subcommand per pipeline stage.

Every subcommand works on plain files without Snakemake; the workflow's rules call
the same subcommands. Each stage is a pair, in :mod:`.data`, :mod:`.kernels` or
:mod:`.stages`: ``add_<stage>_parser`` declares its options (the settings' options come
from :mod:`neural_kernels.settings`, where each is defined once) and ``_cmd_<stage>``
parses them and calls one stage function. Errors a user can fix print one line
(``error: ...``) and exit with status 1; nothing half-written is left behind. Building
the parser imports neither numpy nor torch: the handlers import their stage when run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from neural_kernels import __version__
from neural_kernels.cli.data import (
    add_download_parser,
    add_prepare_parser,
    add_sources_parser,
    add_subset_parser,
)
from neural_kernels.cli.kernels import (
    add_kernel_analytic_parser,
    add_kernel_merge_parser,
    add_kernel_parser,
    add_kernel_shard_parser,
)
from neural_kernels.cli.stages import (
    add_report_parser,
    add_solve_parser,
    add_train_parser,
    add_zca_parser,
)
from neural_kernels.errors import NeuralKernelsError

#: Every subcommand, in the order of ``neural-kernels --help``.
SUBCOMMANDS = (
    add_sources_parser,
    add_download_parser,
    add_prepare_parser,
    add_subset_parser,
    add_zca_parser,
    add_kernel_parser,
    add_kernel_shard_parser,
    add_kernel_merge_parser,
    add_kernel_analytic_parser,
    add_train_parser,
    add_solve_parser,
    add_report_parser,
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
