#!/usr/bin/env bash
# With --software-deployment-method conda, Snakemake runs this inside the new
# environment from the working directory (the repository root): it adds the package
# itself, whose dependencies neural_kernels.yaml already lists.
set -euo pipefail
pip install --no-deps -e .
