#!/usr/bin/env bash
# Snakemake runs this once, inside the rules' conda environment (neural_kernels.yaml,
# which pins every dependency), right after it creates it: it installs the package the
# rules call (`python -m neural_kernels`), which the environment file cannot name by
# path. Snakemake runs it from the workflow's working directory, the repository root.
set -euo pipefail
if ! grep -q '^name = "neural-kernels"' pyproject.toml 2>/dev/null; then
    echo "error: run snakemake --sdm conda from the repository root ($PWD has no" \
        "neural-kernels pyproject.toml)" >&2
    exit 1
fi
python -m pip install --no-deps -e .
