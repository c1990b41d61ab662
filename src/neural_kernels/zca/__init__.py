"""ZCA whitening, exact or by randomized SVD, streamed in row blocks (CPU or GPU).

Let ``X`` be the ``N x P`` matrix of flattened training images (uint8 pixels are
scaled to [0, 1]; float images are used as given), centred by its feature mean
``mu``, with thin SVD ``X - 1 mu^T = U D V^T``. Two variants are provided:

* ``thesis`` (the thesis, slide "ZCA"): ``zca(x) = (x - mu) V diag(sqrt(N-1) / (D + eps)) V^T``.
  With rank ``k < P`` this projects onto the top-``k`` principal subspace.
* ``shankar`` (Shankar et al. 2020, reference code of "Neural Kernels Without
  Tangents"): every image is first centred over its own pixels and scaled to unit L2
  norm; then, with ``C = X^T X / N`` (no feature centring) and eigenvalue bias
  ``eps`` (1e-5 for CIFAR-10), ``zca(x) = x (C + eps I)^{-1/2}``. With rank ``k < P``
  the top-``k`` eigenpairs ``(D^2/N, V)`` are kept exactly and the ``P - k`` other
  eigenvalues are replaced by their mean, which is known exactly from the trace,
  ``m = (tr C - sum D^2/N) / (P - k)`` with ``tr C`` the mean squared norm of the
  images (1 after the unit-norm step), so
  ``zca(x) = x V diag((D^2/N + eps)^{-1/2}) V^T + (m + eps)^{-1/2} (x - x V V^T)``.
  (Scaling the complement by ``eps^{-1/2}``, i.e. taking ``m = 0``, is far from the
  exact transform when ``eps`` is comparable to ``1/P``, as for 224x224 images.)

Solvers: ``exact`` accumulates the ``P x P`` covariance and eigendecomposes it
(``O(N P^2 + P^3)``, float64); ``randomized`` is the Halko-Martinsson-Tropp range
finder with ``q`` power iterations (``O(N P l q)`` with ``l = k + oversample``) and never
forms a ``P x P`` matrix. Both stream ``X`` in row blocks, so ``X`` may be a memory-map
larger than device memory; with ``flips`` each block is followed by its horizontally
flipped copy, so the fit sees ``2N`` images.
"""

from neural_kernels.zca.fit import zca_fit
from neural_kernels.zca.stage import whiten_files
from neural_kernels.zca.transform import DEFAULT_EPS, ZCATransform, zca_apply

__all__ = ["DEFAULT_EPS", "ZCATransform", "whiten_files", "zca_apply", "zca_fit"]
