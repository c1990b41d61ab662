"""neural-tangents' NNGP kernel of Myrtle5 before its final projection (a test helper).

Usage: ``python nt_reference.py DIR OUT.npy`` reads ``DIR/images.npy`` (N, H, W, C),
writes the globally pooled NNGP kernel ``(N, N)`` of Myrtle5 and prints ``seconds=<t>``,
the time of the kernel computation alone (``benchmarks/kernels.py`` reads it). The
kernel: ``[Conv 3x3 SAME, Relu]`` stages of 2, 1 and 1 convolutions, 2x2 average
pools between them, a global average pool, computed by ``neural_tangents.stax`` in
float64. Run in its own interpreter by
``test_reference_kernels.py`` so that JAX and TensorFlow stay out of the test process.
"""

import os
import sys
import time

os.environ.setdefault("JAX_ENABLE_X64", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import neural_tangents as nt  # noqa: E402
import numpy as np  # noqa: E402
from neural_tangents import stax  # noqa: E402


def myrtle5() -> tuple:
    def block() -> list:
        return [stax.Conv(1, (3, 3), padding="SAME", W_std=2**0.5), stax.Relu()]

    pool = stax.AvgPool((2, 2), strides=(2, 2))
    return stax.serial(*block(), *block(), pool, *block(), pool, *block(), stax.GlobalAvgPool())


def main() -> None:
    jax.config.update("jax_enable_x64", True)
    images = np.load(os.path.join(sys.argv[1], "images.npy")).astype(np.float64)
    _, _, kernel_fn = myrtle5()
    # In blocks of at most 128 x 128 images: all 1024 digits at once would hold a
    # (1024, 1024, 8, 8, 8, 8) float64 covariance, 34 GB.
    block = max(b for b in range(1, min(len(images), 128) + 1) if len(images) % b == 0)
    kernel_fn = nt.batch(kernel_fn, batch_size=block, store_on_device=False)
    started = time.perf_counter()
    kernel = np.asarray(kernel_fn(images, None, "nngp"), dtype=np.float64)
    print(f"seconds={time.perf_counter() - started}")
    np.save(sys.argv[2], kernel)


if __name__ == "__main__":
    main()
