"""Each choice is defined once, in neural_kernels.settings and the registries; the CLI
derives its options from them, and this test fails when the workflow's schema drifts.

Every registered name (architectures, activations, solvers, sources) must be accepted
by the config schema and by the CLI, and every schema default and enum must equal the
settings field it configures.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex

import pytest
import yaml

from conftest import REPO
from neural_kernels import fields
from neural_kernels import settings as nks
from neural_kernels.architectures import ACTIVATIONS
from neural_kernels.catalog import MYRTLE_STAGES, SOLVERS
from neural_kernels.cli import build_parser
from neural_kernels.data.sources import SOURCES
from neural_kernels.errors import NeuralKernelsError

SCHEMA = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
DEFS = SCHEMA["$defs"]
#: (schema properties, settings class, fields the schema defines differently)
SECTIONS = [
    (DEFS["kernel"]["properties"], nks.KernelSpec, ()),
    (DEFS["kernel"]["properties"], nks.EstimateSettings, ("precision",)),
    (DEFS["kernel"]["properties"], nks.AnalyticSettings, ("precision",)),
    (DEFS["solver"]["properties"], nks.SolverSettings, ()),
    (DEFS["network"]["properties"], nks.TrainSettings, ()),
    (DEFS["dataset"]["properties"], nks.PrepareSettings, ()),
    (SCHEMA["properties"]["download"]["properties"], nks.DownloadSettings, ()),
]


#: Keys a config must give (the schema's "required"); all others have a default.
REQUIRED = {name for definition in DEFS.values() for name in definition.get("required", ())}
#: $defs/zca leaves its defaults to the global zca entry; rank and eps default to null.
REQUIRED |= {"rank", "eps"}


def _zca_schema() -> dict:
    """$defs/zca (enums) with the global zca entry's defaults laid over it."""
    properties = {key: dict(value) for key, value in DEFS["zca"]["properties"].items()}
    for key, value in SCHEMA["properties"]["zca"]["properties"].items():
        properties[key] |= value
    return properties


def _as_schema(value: object) -> object:
    """A settings default as the schema writes it (tuples: lists; empty grids: null)."""
    if isinstance(value, tuple):
        return list(value) or None
    return value


@pytest.mark.parametrize(
    ("properties", "cls", "special"),
    [*SECTIONS, (_zca_schema(), nks.ZcaSettings, ())],
    ids=lambda value: value.__name__ if isinstance(value, type) else "",
)
def test_schema_defaults_and_enums_equal_the_settings(properties, cls, special):
    for field in dataclasses.fields(cls):
        if field.name in special:
            continue
        assert field.name in properties, f"{cls.__name__}.{field.name} is not in the schema"
        schema = properties[field.name]
        # a key the schema requires (a network's model) has no default there
        if field.default is not dataclasses.MISSING and "default" in schema:
            assert schema.get("default") == _as_schema(field.default), (cls, field.name)
        choices = field.metadata["choices"]
        if choices is not None:
            assert schema["enum"] == list(choices), (cls, field.name)
        if "default" not in schema:
            assert field.name in REQUIRED, (cls, field.name)


def test_schema_precision_enum_is_both_methods_precisions():
    enum = DEFS["kernel"]["properties"]["precision"]["enum"]
    assert enum == [*nks.ANALYTIC_PRECISIONS, *nks.ESTIMATE_PRECISIONS[1:], None]
    assert DEFS["kernel"]["properties"]["method"]["enum"] == list(nks.KERNEL_METHODS)


@pytest.mark.parametrize(
    ("registry", "enums"),
    [
        (MYRTLE_STAGES, [("kernel", "arch")]),
        (ACTIVATIONS, [("kernel", "activation"), ("network", "activation")]),
        (SOLVERS, [("solver", "method")]),
        (SOURCES, [("dataset", "source")]),
    ],
    ids=["architectures", "activations", "solvers", "sources"],
)
def test_every_registered_name_is_in_the_schema(registry, enums):
    for definition, key in enums:
        assert DEFS[definition]["properties"][key]["enum"] == list(registry), (definition, key)
    if registry is MYRTLE_STAGES:
        assert DEFS["network"]["properties"]["model"]["enum"] == ["resnet18", *registry]


def test_every_registered_name_is_accepted_by_the_cli():
    parser = build_parser()
    files = ["--out-dir", "o", "--train", "t.npy"]
    for arch in MYRTLE_STAGES:
        for activation in ACTIVATIONS:
            args = parser.parse_args(
                ["kernel-analytic", *files, "--arch", arch, "--activation", activation]
            )
            assert (args.arch, args.activation) == (arch, activation)
            args = parser.parse_args(["train", "--data", "d", "--out-dir", "o", "--model", arch])
            assert args.model == arch
    for method in SOLVERS:
        args = parser.parse_args(
            ["solve", "--kernel-dir", "k", "--labels", "train=y", "--method", method, *files[:2]]
        )
        assert nks.SolverSettings(args.method).method == method
    for source in SOURCES:
        assert parser.parse_args(["prepare", "--source", source, "--out", "o"]).source == source


@pytest.mark.parametrize(
    "cls",
    [nks.KernelSpec, nks.EstimateSettings, nks.SolverSettings, nks.TrainSettings, nks.ZcaSettings],
)
def test_the_workflow_options_parse_back_to_the_same_settings(cls):
    # common.smk passes a config entry to the CLI as command_line(cls, entry): parsed
    # by the CLI's options, it must give the settings the entry describes.
    values = {
        nks.KernelSpec: {"arch": "myrtle7", "activation": "gaussian", "gamma": 0.5, "flips": True},
        nks.EstimateSettings: {"width": 8, "networks": 4, "chunk_networks": 2, "seed": 3},
        nks.SolverSettings: {"method": "boosting", "eta_t": [10.0, 1.0], "steps": 3},
        nks.TrainSettings: {"model": "myrtle5", "lr": None, "crop": 6, "flip": True},
        nks.ZcaSettings: {"variant": "shankar", "rank": None, "eps": 1e-5, "flips": True},
    }[cls]
    parser = argparse.ArgumentParser()
    fields.add_arguments(parser, cls)
    options = shlex.split(fields.command_line(cls, values))
    parsed = fields.from_arguments(cls, parser.parse_args(options))
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    assert parsed == cls(**given)


def test_settings_reject_bad_values_with_the_field_named():
    with pytest.raises(NeuralKernelsError, match="EstimateSettings: width must be at least 1"):
        nks.EstimateSettings(width=0)
    with pytest.raises(NeuralKernelsError, match="unknown precision 'fp8'"):
        nks.AnalyticSettings(precision="fp8")
    with pytest.raises(NeuralKernelsError, match="unknown activation 'tanh'"):
        nks.KernelSpec("myrtle5", activation="tanh")
    with pytest.raises(NeuralKernelsError, match="unknown arch 'vgg'"):
        nks.KernelSpec("vgg")


def test_the_cli_and_the_workflow_helpers_build_without_torch():
    # Every job pays for what it imports (torch: 6.5 s on 2 cores): building the CLI
    # and reading the settings, registries and layout (as common.smk does) stay light.
    code = (
        "import sys\n"
        "from neural_kernels.cli import build_parser\n"
        "build_parser().parse_args(['prepare', '--source', 'digits', '--out', 'x'])\n"
        "heavy = sorted({'numpy', 'torch'} & set(sys.modules))\n"
        "assert not heavy, f'the command line imported {heavy}'\n"
        "from neural_kernels import layout, settings, catalog\n"
        "from neural_kernels.data import sources\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
