"""The pipeline's run parameters have one definition (habla.runs.parameters.RunParameters): the compiled
pipeline's inputs, their defaults and descriptions, the start_run step's inputs, run.json, run-local's defaults
and habla compare's columns all come from it."""

from __future__ import annotations

import dataclasses

import yaml
from habla.components.training import start_run
from habla.pipelines.training_pipeline import compile_pipeline

from habla.kubeflow.compile import CompileOptions
from habla.ops import compare
from habla.runs.parameters import COMPARE_COLUMNS, NOT_COMPARED, RunParameters, default_of, typed
from habla.runs.record import RUN_OUTCOME

KFP_TYPES = {"str": "STRING", "int": "NUMBER_INTEGER", "float": "NUMBER_DOUBLE", "dict": "STRUCT", "list": "LIST"}


def test_the_compiled_pipeline_takes_exactly_the_run_parameters(tmp_path):
    options = CompileOptions(train_image="reg.example/train:9")
    ir = next(yaml.safe_load_all(open(compile_pipeline(str(tmp_path / "p.yaml"), options), encoding="utf-8")))
    inputs = ir["root"]["inputDefinitions"]["parameters"]
    fields = {f.name: f for f in dataclasses.fields(RunParameters)}
    assert set(inputs) == set(fields)
    for name, spec in inputs.items():
        field = fields[name]
        assert spec["parameterType"] == KFP_TYPES[field.type], name
        assert spec["description"] == field.metadata["help"], name
        if default_of(field) is dataclasses.MISSING:
            assert "defaultValue" not in spec and not spec.get("isOptional"), name
        else:
            expected = options.train_image if name == "train_image" else default_of(field)
            assert spec["defaultValue"] == expected, name


def test_the_start_run_step_records_every_parameter():
    inputs = start_run.component_spec.inputs
    assert set(inputs) == {"run_id", "step_image", *RunParameters.names()}
    record = RunParameters(release_uri="s3://cv/cv-corpus-25.0-2026-03-09/es", output_uri="s3://o").record()
    assert record["release"] == "cv-corpus-25.0-2026-03-09-es" and record["gpus_per_node"] == 1
    assert set(record) == {"release", "format", *RunParameters.names()} - {"output_uri", "run_name", "audio_format"}


def test_run_local_settings_and_compare_columns_come_from_the_definition():
    local = RunParameters.local_defaults()
    assert local["launcher"] == "local" and local["config"] == "tiny_ctc_char" and local["audio_format"] == "wav"
    assert set(local) <= set(RunParameters.names())
    assert typed("nodes", "4") == 4 and typed("promotion_margin", "0.5") == 0.5 and typed("gpus_per_node", "8") == "8"
    assert [c for c, _ in COMPARE_COLUMNS] == compare.COLUMNS[3:8]
    assert {name for _, name in COMPARE_COLUMNS} <= NOT_COMPARED <= set(RunParameters.names()) | {
        "run_name", "run_id", "run_dir", "started", "release", "promotion"} | set(RUN_OUTCOME)  # fmt: skip
