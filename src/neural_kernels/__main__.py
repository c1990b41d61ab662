"""``python -m neural_kernels``: the same as the ``neural-kernels`` console script."""

from neural_kernels.cli import main

raise SystemExit(main())
