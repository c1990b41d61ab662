"""Network baselines: models, augmentation, training, model selection, resume, CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from conftest import prepared_digits
from neural_kernels import networks
from neural_kernels.architectures import Conv, myrtle
from neural_kernels.cli import main
from neural_kernels.data.prepared import load_split, prepare_dataset
from neural_kernels.errors import NeuralKernelsError
from neural_kernels.kernels.analytic import analytic_kernel
from neural_kernels.networks import (
    Augmentation,
    MyrtleNetwork,
    Normalizer,
    TrainSettings,
    build_model,
    evaluate,
    load_model,
    load_splits,
    lr_factor,
    train_batches,
    train_network,
)

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]
TIMING_KEYS = ("seconds", "train_seconds", "images_per_second")


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> Path:
    """All of scikit-learn's digits, prepared: 1293 train, 144 val, 360 test, 8x8x1."""
    out = tmp_path_factory.mktemp("data") / "digits"
    prepare_dataset("digits", out)
    return out


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory) -> Path:
    """The first 300 digits as a custom dataset (192 train, 24 val, 60 test)."""
    return prepared_digits(tmp_path_factory.mktemp("small"), 300)


@pytest.fixture(scope="module")
def unique_dir(tmp_path_factory) -> Path:
    """60 distinct random 10x10 RGB images in 3 classes (36 train, 4 val, 12 test...)."""
    root = tmp_path_factory.mktemp("unique")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (60, 10, 10, 3), dtype=np.uint8)
    np.savez(root / "u.npz", images=images, labels=np.arange(60) % 3)
    prepare_dataset("custom", root / "u", npz=root / "u.npz")
    return root / "u"


def without_timings(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in epoch.items() if k not in TIMING_KEYS} for epoch in history]


def saved_state(out_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(out_dir / "model.pt", weights_only=True)["state_dict"]


class Interrupt(Exception):
    """Stands in for a killed job."""


def interrupt_after(epoch: int):
    def callback(record: dict) -> None:
        if record["epoch"] == epoch:
            raise Interrupt

    return callback


# --------------------------------------------------------------------------- models


def test_resnet18_is_torchvision_randomly_initialised():
    from torchvision.models import ResNet

    a, b = build_model("resnet18", 10, 3, seed=0), build_model("resnet18", 10, 3, seed=1)
    assert isinstance(a, ResNet) and a.fc.out_features == 10
    assert not torch.equal(a.conv1.weight, b.conv1.weight)  # random, not a fixed checkpoint
    torch.testing.assert_close(a.state_dict(), build_model("resnet18", 10, 3, seed=0).state_dict())
    gray = build_model("resnet18", 10, 1)
    assert gray.conv1.in_channels == 1
    assert gray(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_myrtle_network_is_the_myrtle_definition():
    net = build_model("myrtle7", 4, 3, width=16, seed=3)
    assert isinstance(net, MyrtleNetwork) and net.arch == myrtle("myrtle7")
    convs = [name for name, _ in net.named_parameters() if name.startswith("conv")]
    assert len(convs) == sum(isinstance(layer, Conv) for layer in net.arch.layers) == 6
    assert [name for name, _ in net.named_parameters() if name.startswith("dense")] == ["dense15"]
    weights = net.arch.init(torch.Generator().manual_seed(3), 3, 1, 16)

    def flat(params: list) -> list:
        return [p for item in params for p in (item if isinstance(item, tuple) else (item,))]

    for got, expected in zip(flat(net.layer_params()), flat(weights), strict=True):
        assert (got is None) == (expected is None)
        if got is not None:
            torch.testing.assert_close(got.detach(), expected, rtol=0, atol=0)
    x = torch.randn(5, 3, 12, 12)
    # The same layers as the kernel's, the final projection's finite layer included.
    expected = net.arch.apply(x, weights)
    torch.testing.assert_close(net.features(x), expected, rtol=0, atol=0)
    pooled = net.arch.apply(x, weights, project=False)
    assert pooled.shape == expected.shape == (5, 16) and not torch.allclose(pooled, expected)
    assert net(x).shape == (5, 4)
    gaussian = build_model("myrtle5", 3, 1, width=8, activation="gaussian")
    assert any(name.startswith("phases") for name, _ in gaussian.named_buffers())
    assert not any(name.startswith("phases") for name, _ in gaussian.named_parameters())


def test_myrtle_network_features_approach_the_analytic_kernel():
    x = load_digits().images[:12, :, :, None] / 16.0
    x = (x - x.mean(0)) / x.std()
    analytic = analytic_kernel(myrtle("myrtle5"), x, progress=False)
    upper = np.triu_indices(len(x), 1)

    def correlation(width: int, seed: int) -> float:
        net = MyrtleNetwork(
            "myrtle5", 10, width=width, in_channels=1, generator=torch.Generator().manual_seed(seed)
        )
        with torch.no_grad():
            f = net.features(torch.tensor(x, dtype=torch.float32).permute(0, 3, 1, 2)).double()
        f = f / f.norm(dim=1, keepdim=True)
        return np.corrcoef((f @ f.T).numpy()[upper], analytic[upper])[0, 1]

    wide = np.mean([correlation(512, seed) for seed in range(2)])
    narrow = np.mean([correlation(16, seed) for seed in range(2)])
    assert wide > 0.85 and wide > narrow


# --------------------------------------------------------------------- augmentation


def test_train_augmentation_draws_a_crop_and_flip_per_image():
    image = torch.randint(0, 256, (8, 8, 3), dtype=torch.uint8)
    batch = image.expand(400, 8, 8, 3).contiguous()
    out = Augmentation(crop=6, flip=True).train(batch, torch.Generator().manual_seed(0))
    assert out.shape == (400, 3, 6, 6) and out.dtype == torch.uint8
    chw = image.permute(2, 0, 1)
    candidates = {
        (top, left, mirror): TF.horizontal_flip(TF.crop(chw, top, left, 6, 6))
        if mirror
        else TF.crop(chw, top, left, 6, 6)
        for top in range(3)
        for left in range(3)
        for mirror in (False, True)
    }
    seen = set()
    for crop in out:
        matches = [key for key, value in candidates.items() if torch.equal(crop, value)]
        assert matches, "an output is not a 6x6 window of the image (or its mirror)"
        seen.update(matches)
    assert seen == set(candidates)  # every window and both orientations, within one batch
    again = Augmentation(crop=6, flip=True).train(batch, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # seeded by the generator


def test_eval_transform_is_the_deterministic_centre_crop():
    batch = torch.randint(0, 256, (7, 9, 8, 3), dtype=torch.uint8)
    augment = Augmentation(crop=5, flip=True)
    out = augment.eval(batch)
    assert torch.equal(out, augment.eval(batch))
    for got, image in zip(out, batch, strict=True):
        assert torch.equal(got, v2.CenterCrop(5)(image.permute(2, 0, 1)))
    plain = Augmentation()
    assert torch.equal(plain.eval(batch), batch.permute(0, 3, 1, 2))
    assert torch.equal(plain.train(batch, torch.Generator()), batch.permute(0, 3, 1, 2))
    flips = Augmentation(flip=True).train(batch, torch.Generator().manual_seed(1))
    for got, image in zip(flips, batch.permute(0, 3, 1, 2), strict=True):
        assert torch.equal(got, image) or torch.equal(got, image.flip(-1))


def test_networks_train_on_train_and_val_augmented_and_see_test_once(
    unique_dir, tmp_path, monkeypatch
):
    calls: dict[str, list[bytes]] = {"train": [], "eval": []}
    real_train, real_eval = Augmentation.train, Augmentation.eval

    def spy_train(self, batch, generator):
        calls["train"] += [image.numpy().tobytes() for image in batch]
        return real_train(self, batch, generator)

    def spy_eval(self, batch):
        calls["eval"] += [image.numpy().tobytes() for image in batch]
        return real_eval(self, batch)

    monkeypatch.setattr(Augmentation, "train", spy_train)
    monkeypatch.setattr(Augmentation, "eval", spy_eval)
    settings = TrainSettings(model="myrtle5", width=4, epochs=2, batch_size=8, crop=8, flip=True)
    train_network(unique_dir, tmp_path / "net", settings, progress=False)

    def rows(split: str) -> list[bytes]:
        return [image.tobytes() for image in load_split(unique_dir, split).images]

    train, val, test = rows("train"), rows("val"), rows("test")
    # The refit: every train and val image, each epoch, augmented; the test split is
    # seen once, after the last epoch, centre-cropped; nothing is selected on val.
    assert sorted(calls["train"]) == sorted((train + val) * 2)
    assert sorted(calls["eval"]) == sorted(test)
    assert not set(calls["train"]) & set(test)


def test_normalizer_uses_training_statistics():
    images = torch.tensor([[[[0, 255]]], [[[255, 0]]]], dtype=torch.uint8)  # (2, 1, 1, 2)
    mean, std = networks.channel_stats(images)
    assert mean == [0.5, 0.5] and std == pytest.approx([0.5, 0.5])
    out = Normalizer(mean, std, CPU, channels_last=False)(images.permute(0, 3, 1, 2))
    torch.testing.assert_close(out.flatten(), torch.tensor([-1.0, 1.0, 1.0, -1.0]))


def test_schedules_and_batches():
    assert lr_factor(0, 100, "cosine") == 1.0 and lr_factor(100, 100, "cosine") == 0.0
    assert lr_factor(50, 100, "cosine") == pytest.approx(0.5)
    assert [lr_factor(s, 100, "step") for s in (0, 49, 50, 74, 75, 99)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01]
    )
    sizes = [len(b) for b in train_batches(torch.arange(9), 4)]
    assert sizes == [4, 5]  # a last batch of one joins the previous one (batch norm)
    assert [len(b) for b in train_batches(torch.arange(10), 4)] == [4, 4, 2]


# -------------------------------------------------------------------------- training


def test_myrtle_network_learns_digits(digits_dir, tmp_path):
    settings = TrainSettings(model="myrtle5", width=64, epochs=5, batch_size=64, lr=0.02)
    out = tmp_path / "myrtle5"
    record = train_network(digits_dir, out, settings, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["myrtle5"]  # no resume dir left
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "model.pt"]
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(record))
    history = record["epochs"]
    assert [e["epoch"] for e in history] == [1, 2, 3, 4, 5]
    for key in ("train_loss", "train_accuracy", "seconds", "images_per_second"):
        assert all(np.isfinite(e[key]) for e in history)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["lr"] == 0.0  # the cosine schedule ends at zero: report the last epoch
    assert record["training_size"] == {"images": 1293 + 144, "splits": ["train", "val"]}
    assert record["test_accuracy"] > 0.6  # chance: 0.1
    assert record["device"] == "cpu" and record["precision"] == "float32"
    assert record["host_peak_rss_mb"] > 0 and record["settings"]["width"] == 64
    assert len(record["normalization"]["mean"]) == 1
    # model.pt holds the final weights and what rebuilds them.
    model, meta = load_model(out / "model.pt")
    assert meta["epoch"] == 5
    splits, _ = load_splits(digits_dir, CPU)
    normalize = Normalizer(meta["mean"], meta["std"], CPU, channels_last=False)
    accuracy = evaluate(model, splits["test"], Augmentation(), normalize, CPU, 256)
    assert accuracy == record["test_accuracy"]


def test_resume_after_interruption_equals_an_uninterrupted_run(small_dir, tmp_path):
    settings = TrainSettings(
        model="resnet18",
        epochs=3,
        batch_size=32,
        lr=0.05,
        crop=6,
        flip=True,
        seed=5,
        deterministic=True,
    )
    whole = train_network(small_dir, tmp_path / "whole", settings, progress=False)
    out = tmp_path / "parts"
    with pytest.raises(Interrupt):
        train_network(small_dir, out, settings, progress=False, on_epoch_end=interrupt_after(2))
    assert not out.exists()
    assert (tmp_path / ".parts.resume" / "checkpoint.pt").exists()
    resumed = train_network(small_dir, out, settings, progress=False)
    assert resumed["resumed_from_epoch"] == 2 and whole["resumed_from_epoch"] == 0
    assert without_timings(resumed["epochs"]) == without_timings(whole["epochs"])
    assert resumed["test_accuracy"] == whole["test_accuracy"]
    torch.testing.assert_close(saved_state(out), saved_state(tmp_path / "whole"), rtol=0, atol=0)
    assert not (tmp_path / ".parts.resume").exists()


def test_changed_settings_discard_a_stale_checkpoint(small_dir, tmp_path):
    first = TrainSettings(model="myrtle5", width=8, epochs=2, batch_size=32, deterministic=True)
    out = tmp_path / "net"
    with pytest.raises(Interrupt):
        train_network(small_dir, out, first, progress=False, on_epoch_end=interrupt_after(1))
    changed = TrainSettings(
        model="myrtle5", width=8, epochs=2, batch_size=32, lr=0.03, deterministic=True
    )
    record = train_network(small_dir, out, changed, progress=False)
    assert record["resumed_from_epoch"] == 0 and record["settings"]["lr"] == 0.03
    fresh = train_network(small_dir, tmp_path / "fresh", changed, progress=False)
    assert without_timings(record["epochs"]) == without_timings(fresh["epochs"])
    torch.testing.assert_close(saved_state(out), saved_state(tmp_path / "fresh"), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (TrainSettings(model="resnet18", crop=9), ["8x8x1", "crop 9x9", "at most 8", "no crop"]),
        (TrainSettings(model="myrtle5", crop=9, flip=True), ["8x8x1", "crop 9x9"]),
        (TrainSettings(model="myrtle15"), ["needs images of at least 32x32"]),
    ],
)
def test_images_smaller_than_the_crop_are_a_clear_error(small_dir, tmp_path, settings, message):
    with pytest.raises(NeuralKernelsError) as error:
        train_network(small_dir, tmp_path / "out" / "net", settings, progress=False)
    for part in message:
        assert part in str(error.value)
    assert not (tmp_path / "out").exists()  # nothing written, not even a resume dir


def test_bad_settings_are_clear_errors():
    with pytest.raises(NeuralKernelsError, match="unknown model 'vgg'"):
        TrainSettings(model="vgg")
    with pytest.raises(NeuralKernelsError, match="unknown schedule"):
        TrainSettings(schedule="linear")
    with pytest.raises(NeuralKernelsError, match="crop must be at least 1"):
        TrainSettings(crop=0)


# ------------------------------------------------------------------------------- CLI


def test_cli_trains_and_reports(small_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["train", "--data", str(small_dir), "--model", "myrtle5", "--width", "8"]
    args += ["--epochs", "1", "--schedule", "step", "--no-progress", "--out-dir", str(out)]
    assert main(["-q", *args]) == 0
    printed = json.loads(capsys.readouterr().out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert printed["test_accuracy"] == metrics["test_accuracy"]
    defaults = TrainSettings()
    assert metrics["settings"] == {
        **defaults.as_dict(),
        "model": "myrtle5",
        "width": 8,
        "epochs": 1,
        "schedule": "step",
        "lr": 0.02,  # the Myrtle networks' default
    }
    assert defaults.lr == 0.1 and TrainSettings(model="myrtle10", lr=0.3).lr == 0.3


def test_cli_errors(small_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["train", "--data", str(small_dir), "--model", "myrtle5", "--crop", "12"]
    assert main([*args, "--out-dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "crop 12x12" in err and "8x8x1" in err
    assert not out.exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", str(small_dir), "--model", "vgg", "--out-dir", str(out)])
    assert exit_info.value.code == 2
    assert main(["train", "--data", str(tmp_path / "none"), "--model", "myrtle5",
                 "--out-dir", str(out)]) == 1  # fmt: skip
    assert "meta.json is missing" in capsys.readouterr().err


# -------------------------------------------------------------------------- workflow


@pytest.mark.workflow
def test_unknown_network_name_is_a_clear_workflow_error(tmp_path):
    shutil.copy(REPO / "Snakefile", tmp_path / "Snakefile")
    shutil.copytree(REPO / "workflow", tmp_path / "workflow")
    shutil.copytree(REPO / "config", tmp_path / "config")
    (tmp_path / "c.yaml").write_text(
        json.dumps({"datasets": {"d": {"source": "digits", "networks": ["nope"]}}})
    )
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--configfile", "c.yaml"],
        cwd=tmp_path, capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    assert (
        "lists network 'nope', which is not defined under 'networks'"
        in result.stdout + result.stderr
    )
