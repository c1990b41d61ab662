"""The ``zca`` stage: fit on the training images (or load a saved transform), whiten
every input file, and write ``transform.npz`` and ``zca.json``, all or nothing.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray

from neural_kernels.checks import check_finite
from neural_kernels.data.rows import StackedRows
from neural_kernels.device import (
    device_name,
    peak_memory_mb,
    reset_peak_memory,
    resolve_device,
    resolve_dtype,
)
from neural_kernels.errors import DataError, NeuralKernelsError
from neural_kernels.fields import changed_fields, refuse_unused
from neural_kernels.layout import ZCA_META, ZCA_TRANSFORM
from neural_kernels.outputs import (
    array_bytes,
    open_memmap,
    require_space,
    staged_directory,
    write_json,
)
from neural_kernels.settings import ZcaSettings
from neural_kernels.zca.fit import zca_fit
from neural_kernels.zca.transform import ZCATransform, zca_apply


def _check_transform_options(settings: ZcaSettings, fit_on: int) -> None:
    """With a saved transform only the working dtype applies: a fit's options are errors."""
    unused = changed_fields(settings, keep=("dtype",)) + ["fit_on"] * (fit_on != 1)
    refuse_unused("zca --transform", unused, "a fit, without --transform")


def _check_names(inputs: list[Path]) -> None:
    """The inputs' file names must differ: the outputs are named after them."""
    names = [Path(p).name for p in inputs]
    if len(set(names)) != len(names):
        raise NeuralKernelsError(
            f"input file names must differ (outputs are named after them): {names}"
        )


def _read_inputs(inputs: list[Path], fit_on: int) -> list[NDArray]:
    """Memory-map every input ``.npy``; ``fit_on`` must be in ``1..len(inputs)``."""
    arrays = []
    for path in inputs:
        try:
            arrays.append(np.load(path, mmap_mode="r"))
        except (OSError, ValueError) as error:
            raise DataError(f"cannot read {path} as a .npy array ({error})") from None
    if not 1 <= fit_on <= len(inputs):
        raise NeuralKernelsError(f"fit_on must be in 1..{len(inputs)} (the inputs), got {fit_on}")
    return arrays


def _zca_record(
    transform: ZCATransform,
    fitted_on: list[str],
    options: dict,
    device: torch.device,
    dtype: str,
    fit_seconds: float,
) -> dict:
    """zca.json before the apply timings and peak memory are added."""
    return {
        "variant": transform.variant,
        "solver": transform.solver,
        "rank": transform.rank,
        "eps": transform.eps,
        "n_samples": transform.n_samples,
        "n_features": int(math.prod(transform.image_shape)),
        "image_shape": list(transform.image_shape),
        "fitted_on": fitted_on,
        "options": options,
        "singular_values": {
            "first": float(transform.singular_values[0]),
            "last": float(transform.singular_values[-1]),
        },
        "complement_scale": transform.complement_scale,
        "device": device_name(device),
        "dtype": dtype,
        "fit_seconds": fit_seconds,
        "apply_seconds": {},
    }


def _whiten_file(
    transform: ZCATransform,
    images: NDArray,
    out_path: Path,
    name: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    block_rows: int | None,
) -> float:
    """Whiten ``images`` into the float32 ``.npy`` ``out_path``; returns the seconds taken."""
    started = time.perf_counter()
    out = open_memmap(out_path, np.float32, images.shape)
    zca_apply(
        transform, images, out=out, device=device, dtype=dtype, block_rows=block_rows, name=name
    )
    check_finite(
        out,
        f"the whitened {name}",
        "the transform is not finite (eps 0 with a singular covariance?); nothing was written",
    )
    out.flush()
    del out
    return time.perf_counter() - started


def whiten_files(
    inputs: list[Path],
    out_dir: Path,
    settings: ZcaSettings | None = None,
    *,
    transform_path: Path | None = None,
    fit_on: int = 1,
    device: str = "auto",
    block_rows: int | None = None,
) -> dict:
    """The ``zca`` stage: fit on ``inputs[:fit_on]`` stacked (or load ``transform_path``),
    whiten all. The workflow fits on train + val: the training set of the refit.

    ``settings`` (default :class:`ZcaSettings`) define the fit; with ``transform_path``
    only their ``dtype`` is used. Writes ``out_dir/<input file name>`` (float32, same
    shape) for every input, ``out_dir/transform.npz`` and ``out_dir/zca.json``
    (settings, spectrum summary, timings, device and peak memory), all or nothing.
    Returns the JSON record.
    """
    settings = ZcaSettings() if settings is None else settings
    if transform_path is not None:
        _check_transform_options(settings, fit_on)
    _check_names(inputs)
    run_device = resolve_device(device, stage="zca")
    work_dtype = resolve_dtype(settings.dtype)
    reset_peak_memory(run_device)
    arrays = _read_inputs(inputs, fit_on)
    sizes = {p.name: array_bytes(a.shape, np.float32) for p, a in zip(inputs, arrays, strict=True)}
    require_space(out_dir, sizes, "zca")
    fitted = [str(path) for path in inputs[:fit_on]]
    started = time.perf_counter()
    if transform_path is None:
        transform = zca_fit(
            StackedRows(arrays[:fit_on]),
            settings,
            device=run_device,
            block_rows=block_rows,
            name=" + ".join(fitted),
        )
        fitted_on, options = fitted, settings.fit_options()
    else:
        transform = ZCATransform.load(transform_path)
        fitted_on, options = [str(transform_path)], {}
    fit_seconds = time.perf_counter() - started
    record = _zca_record(transform, fitted_on, options, run_device, settings.dtype, fit_seconds)
    with staged_directory(out_dir, last=ZCA_META) as stage:
        transform.save(stage / ZCA_TRANSFORM)
        for path, images in zip(inputs, arrays, strict=True):
            record["apply_seconds"][path.name] = _whiten_file(
                transform,
                images,
                stage / path.name,
                str(path),
                device=run_device,
                dtype=work_dtype,
                block_rows=block_rows,
            )
        record.update(peak_memory_mb(run_device))
        write_json(stage / ZCA_META, record)
    return record
