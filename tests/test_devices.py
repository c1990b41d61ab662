"""Honest devices: a job that asked for a GPU and sees none fails with one line naming
the likely cause; ``device: auto`` falling back to the CPU on a host that lists a GPU
warns and says so in the stage's record. The missing GPU is simulated (torch's CUDA
check patched to False), and the host's GPU by an ``nvidia-smi`` on PATH that lists one.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from neural_kernels import device
from neural_kernels.cli import main
from neural_kernels.errors import NeuralKernelsError


@pytest.fixture
def no_cuda(monkeypatch):
    """torch sees no CUDA GPU, no SLURM GPU variable is set, no fallback recorded yet."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in device.SLURM_GPU_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(device, "_fallback", None)


@pytest.fixture
def host_lists_a_gpu(tmp_path, monkeypatch):
    """An ``nvidia-smi`` first on PATH that lists one H200 (driver 535.104.05)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA H200, 535.104.05'\n")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_cuda_requested_without_a_gpu_names_the_likely_cause(no_cuda, host_lists_a_gpu):
    with pytest.raises(NeuralKernelsError) as error:
        device.resolve_device("cuda")
    message = str(error.value)
    assert f"built for CUDA {torch.version.cuda}" in message
    assert "nvidia-smi lists 1 GPU(s) (NVIDIA H200, driver 535.104.05)" in message


def test_auto_in_a_slurm_job_given_gpus_is_an_error(no_cuda, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "1")
    with pytest.raises(NeuralKernelsError, match="this SLURM job was given GPUs"):
        device.resolve_device("auto")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((4, 8, 8, 1), np.float32))
    args = ["zca", str(tmp_path / "x.npy"), "--out-dir", str(tmp_path / "z")]
    assert main(["-q", *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: this SLURM job was given GPUs (SLURM_GPUS_ON_NODE=1)")
    assert not (tmp_path / "z").exists()


def test_auto_on_the_cpu_of_a_host_without_gpus_is_quiet(no_cuda, monkeypatch, caplog):
    monkeypatch.setenv("PATH", "/nonexistent")  # no nvidia-smi at all
    with caplog.at_level(logging.WARNING):
        assert device.resolve_device("auto", stage="zca").type == "cpu"
    assert not caplog.records and device.device_name(torch.device("cpu")) == "cpu"


def test_a_fallback_on_a_gpu_host_warns_and_is_recorded(
    no_cuda, host_lists_a_gpu, caplog, tmp_path: Path
):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((6, 8, 8, 1), np.float32))
    with caplog.at_level(logging.WARNING):
        assert main(["zca", str(tmp_path / "x.npy"), "--out-dir", str(tmp_path / "z")]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("zca runs on the CPU: device auto fell back" in w for w in warnings), warnings
    record = json.loads((tmp_path / "z" / "zca.json").read_text())
    assert record["device"].startswith("cpu (device auto fell back: nvidia-smi lists 1 GPU(s)")
