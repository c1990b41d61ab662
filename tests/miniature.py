"""Miniature copies of the real archives, byte-for-byte in the official layouts.

Each builder writes an archive and returns what a correct reader must recover from it.
Images are flat colour blocks so that JPEG round trips stay within a few levels.
"""

from __future__ import annotations

import io
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip


def _tar_add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def _jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def block_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """An RGB image made of one random flat colour (survives JPEG almost exactly)."""
    colour = rng.integers(0, 256, size=3, dtype=np.uint8)
    return np.broadcast_to(colour, (height, width, 3)).copy()


def make_cifar10(path: Path, per_batch: int = 20, n_test: int = 30, seed: int = 0) -> dict:
    """cifar-10-python.tar.gz: data_batch_1..5, test_batch, batches.meta (py2-style keys)."""
    rng = np.random.default_rng(seed)
    expected: dict[str, list] = {"train_images": [], "train_labels": []}
    with tarfile.open(path, "w:gz") as tar:
        _tar_add(
            tar,
            "cifar-10-batches-py/batches.meta",
            pickle.dumps(
                {
                    b"label_names": [c.encode() for c in CIFAR10_CLASSES],
                    b"num_cases_per_batch": per_batch,
                    b"num_vis": 3072,
                },
                protocol=2,
            ),
        )
        for name, n in [
            *[(f"data_batch_{i}", per_batch) for i in range(1, 6)],
            ("test_batch", n_test),
        ]:
            images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
            labels = (np.arange(n) % 10).tolist()
            record = {
                b"batch_label": name.encode(),
                b"labels": labels,
                b"data": images.transpose(0, 3, 1, 2).reshape(n, 3072),
                b"filenames": [f"img_{i}.png".encode() for i in range(n)],
            }
            _tar_add(tar, f"cifar-10-batches-py/{name}", pickle.dumps(record, protocol=2))
            if name == "test_batch":
                expected["test_images"], expected["test_labels"] = images, np.array(labels)
            else:
                expected["train_images"].append(images)
                expected["train_labels"].append(np.array(labels))
        _tar_add(tar, "cifar-10-batches-py/readme.html", b"<html></html>")
    expected["train_images"] = np.concatenate(expected["train_images"])
    expected["train_labels"] = np.concatenate(expected["train_labels"])
    expected["classes"] = CIFAR10_CLASSES
    return expected


def make_tiny_imagenet(
    path: Path, n_classes: int = 4, per_class: int = 10, val_per_class: int = 3, seed: int = 0
) -> dict:
    """tiny-imagenet-200.zip: wnids.txt, words.txt, train/<wnid>/images, val + annotations."""
    rng = np.random.default_rng(seed)
    wnids = [f"n{1440764 + 7 * i:08d}" for i in range(n_classes)]
    root = "tiny-imagenet-200/"
    train_colours, val_rows, val_colours = {}, [], {}
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(root + "wnids.txt", "\n".join(reversed(wnids)) + "\n")
        words = "".join(f"{w}\tclass {i}, synonym\n" for i, w in enumerate(wnids))
        zf.writestr(root + "words.txt", "n00000001\tentity\n" + words)
        for c, wnid in enumerate(wnids):
            boxes = []
            for i in range(per_class):
                name = f"{wnid}_{i}.JPEG"
                image = block_image(rng, 64, 64)
                if i == 0:  # one greyscale image per class, as in the real set
                    grey = Image.fromarray(image).convert("L")
                    buffer = io.BytesIO()
                    grey.save(buffer, format="JPEG", quality=95)
                    payload, image = buffer.getvalue(), np.asarray(grey.convert("RGB"))
                else:
                    payload = _jpeg(image)
                zf.writestr(f"{root}train/{wnid}/images/{name}", payload)
                train_colours[(c, i)] = image[0, 0]
                boxes.append(f"{name}\t0\t0\t63\t63")
            zf.writestr(f"{root}train/{wnid}/{wnid}_boxes.txt", "\n".join(boxes) + "\n")
        k = 0
        for c, wnid in enumerate(wnids):
            for _ in range(val_per_class):
                image = block_image(rng, 64, 64)
                zf.writestr(f"{root}val/images/val_{k}.JPEG", _jpeg(image))
                val_rows.append(f"val_{k}.JPEG\t{wnid}\t1\t2\t60\t61")
                val_colours[k] = (c, image[0, 0])
                k += 1
        zf.writestr(root + "val/val_annotations.txt", "\n".join(val_rows) + "\n")
        zf.writestr(root + "test/images/test_0.JPEG", _jpeg(block_image(rng, 64, 64)))
    return {
        "wnids": wnids,
        "classes": [f"class {i}" for i in range(n_classes)],
        "n_train": n_classes * per_class,
        "test_labels": np.array([c for c, _ in val_colours.values()]),
        "test_colours": np.array([col for _, col in val_colours.values()]),
    }


def make_imagenet_r(path: Path, n_classes: int = 3, per_class: int = 10, seed: int = 0) -> dict:
    """imagenet-r.tar: imagenet-r/<wnid>/<name>.jpg of varied sizes, plus README.txt."""
    rng = np.random.default_rng(seed)
    wnids = [f"n{1443537 + 11 * i:08d}" for i in range(n_classes)]
    with tarfile.open(path, "w") as tar:
        readme = "ImageNet-R\n" + "".join(f"{w} thing {i}\n" for i, w in enumerate(wnids))
        _tar_add(tar, "imagenet-r/README.txt", readme.encode())
        for wnid in wnids:
            for i in range(per_class):
                h, w = rng.integers(20, 90, size=2)
                _tar_add(tar, f"imagenet-r/{wnid}/art_{i}.jpg", _jpeg(block_image(rng, h, w)))
    return {
        "wnids": wnids,
        "classes": [f"thing {i}" for i in range(n_classes)],
        "n": n_classes * per_class,
    }
