"""Source ``synthetic``: seeded, class-structured images at any count and shape."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from sklearn.linear_model import LogisticRegression
from snakemake.utils import validate

from conftest import REPO
from neural_kernels.cli import main
from neural_kernels.data import load_meta, load_split, prepare_dataset, synthetic
from neural_kernels.errors import DataError

SCHEMA = REPO / "workflow/schemas/config.schema.yaml"


def test_any_count_shape_and_class_count_seeded(tmp_path):
    meta = prepare_dataset(
        "synthetic", tmp_path / "a", size=90, test_size=30, image_size=12, channels=2,
        classes=3, seed=5,
    )  # fmt: skip
    assert meta["image_shape"] == [12, 12, 2] and meta["num_classes"] == 3
    assert meta["official_test_split"] and meta["image_size"] == 12
    sizes = {split: meta["splits"][split]["size"] for split in ("train", "val", "test")}
    assert sizes == {"train": 81, "val": 9, "test": 30}  # val: 10% of the 90
    assert meta["splits"]["test"]["class_counts"] == [10, 10, 10]  # balanced
    test = load_split(tmp_path / "a", "test")
    assert test.images.dtype == np.uint8 and 100 < test.images.mean() < 156
    # the same seed, the same images; another seed, others
    prepare_dataset("synthetic", tmp_path / "b", size=90, test_size=30, image_size=12,
                    channels=2, classes=3, seed=5)  # fmt: skip
    prepare_dataset("synthetic", tmp_path / "c", size=90, test_size=30, image_size=12,
                    channels=2, classes=3, seed=6)  # fmt: skip
    for split in ("train", "val", "test"):
        a, b, c = (load_split(tmp_path / name, split).images for name in "abc")
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)
    # defaults: 32x32x3, 10 classes, test a fifth of size
    meta = prepare_dataset("synthetic", tmp_path / "d", size=200)
    assert meta["image_shape"] == [32, 32, 3] and meta["splits"]["test"]["size"] == 40


def test_images_are_shifted_windows_of_their_class_template(monkeypatch):
    monkeypatch.setattr(synthetic, "CLUTTER", 0.0)  # the template alone, to see it
    monkeypatch.setattr(synthetic, "NOISE", 0.0)
    rng = np.random.default_rng(0)
    templates = synthetic.class_templates(2, 16, 1, rng)
    s = synthetic.max_shift(16)
    assert templates.shape == (2, 16 + 2 * s, 16 + 2 * s, 1)
    np.testing.assert_allclose(templates.std(axis=(1, 2)), 1.0, rtol=1e-5)
    labels = np.array([0, 1] * 10)
    images = synthetic.draw_images(templates, labels, 16, rng).astype(float)[..., 0]

    def best_correlation(image: np.ndarray, template: np.ndarray) -> float:
        windows = [template[dy : dy + 16, dx : dx + 16, 0].ravel()
                   for dy in range(2 * s + 1) for dx in range(2 * s + 1)]  # fmt: skip
        return max(float(np.corrcoef(image.ravel(), w)[0, 1]) for w in windows)

    for image, label in zip(images, labels, strict=True):
        own, other = (best_correlation(image, templates[c]) for c in (label, 1 - label))
        assert own > 0.999 and other < 0.95  # a window of its own template, to rounding


def test_classes_are_learnable_but_not_trivial(tmp_path):
    prepare_dataset("synthetic", tmp_path / "s", size=1500, test_size=500, image_size=16, seed=0)
    train, test = (load_split(tmp_path / "s", split) for split in ("train", "test"))
    flat = {name: d.images.reshape(len(d.images), -1) / 255.0 for name, d in
            (("train", train), ("test", test))}  # fmt: skip
    model = LogisticRegression(max_iter=500, C=0.1).fit(flat["train"], train.labels)
    accuracy = model.score(flat["test"], test.labels)
    assert 0.3 < accuracy < 0.98, accuracy  # far above chance (0.1), short of perfect
    shuffled = LogisticRegression(max_iter=500, C=0.1).fit(
        flat["train"], np.random.default_rng(1).permutation(train.labels)
    )
    assert shuffled.score(flat["test"], test.labels) < 0.2  # the control: chance


def test_the_cli_and_the_config_schema_take_its_settings(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["prepare", "--source", "synthetic", "--size", "60", "--image-size", "8",
                 "--classes", "4", "--out", str(out)]) == 0  # fmt: skip
    meta = load_meta(out)
    assert meta["source"] == "synthetic" and meta["image_shape"] == [8, 8, 3]
    assert main(["prepare", "--source", "synthetic", "--out", str(tmp_path / "no")]) == 1
    assert "source 'synthetic' needs a size" in capsys.readouterr().err
    assert not list((tmp_path / "no").iterdir())  # nothing written
    with pytest.raises(DataError, match="synthetic size 10 is too small for 10 classes"):
        prepare_dataset("synthetic", tmp_path / "small", size=10)
    config = {"datasets": {"s": {"source": "synthetic", "size": 24000, "image_size": 32}}}
    validate(config, str(SCHEMA))
    assert config["datasets"]["s"]["classes"] == 10 and config["datasets"]["s"]["channels"] == 3
    with pytest.raises(Exception, match=r"\['s'\]\['size'\]"):  # names the missing key
        validate(yaml.safe_load("datasets: {s: {source: synthetic}}"), str(SCHEMA))


def test_the_sizing_plan_counts_a_synthetic_datasets_rows():
    from neural_kernels.sizing import planned_solves

    config = {
        "gpus": False, "resources": {},
        "datasets": {"s": {"source": "synthetic", "size": 100_000, "image_size": 32,
                           "kernels": ["k"], "solvers": ["f", "p"]}},
        "kernels": {"k": {"arch": "myrtle5", "method": "estimate", "flips": True}},
        "solvers": {"f": {"method": "flow"}, "p": {"method": "pcg"}},
    }  # fmt: skip
    validate(config, str(SCHEMA))
    flow, pcg = planned_solves(config)
    assert flow.sizes.rows == 200_000 and flow.sizes.eval_rows == 20_000  # flips; a fifth
    assert flow.sizes.classes == 10 and flow.holds_bytes > 4 * 8 * 200_000**2
    assert pcg.holds_bytes < flow.holds_bytes / 100
