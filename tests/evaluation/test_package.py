"""A promoted model's package: the ONNX export verified against the .nemo with onnxruntime on the bundled
test split, and the model card with Hugging Face model-index metadata (a real trained model, slow)."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from conftest import MINI

from habla.core import jsonl, storage
from habla.core.layout import OutputLayout
from habla.data.options import PrepareOptions
from habla.data.prepare import prepare
from habla.evaluation.evaluate import evaluate
from habla.evaluation.package import package
from habla.ops import registry


def test_the_pipeline_passes_dataset_and_model_artifacts_for_lineage(tmp_path):
    """The compiled pipeline: register-dataset makes a Dataset, evaluate-models consumes it and makes a Model,
    package-model consumes that Model and makes the packaged one (what the KFP UI draws as lineage)."""
    from habla.pipelines.training_pipeline import compile_pipeline

    spec = next(yaml.safe_load_all(open(compile_pipeline(str(tmp_path / "p.yaml")))))  # then platform specs
    components = spec["components"]

    def artifacts(component: str, side: str) -> dict:
        section = components[component].get(side + "Definitions", {}).get("artifacts", {})
        return {name: a["artifactType"]["schemaTitle"] for name, a in section.items()}

    assert artifacts("comp-register-dataset", "output") == {"dataset": "system.Dataset"}
    assert artifacts("comp-evaluate-models", "input") == {"dataset": "system.Dataset"}
    assert artifacts("comp-evaluate-models", "output")["candidate"] == "system.Model"
    assert artifacts("comp-package-model", "input") == {"candidate": "system.Model"}
    assert artifacts("comp-package-model", "output")["packaged"] == "system.Model"
    tasks = spec["root"]["dag"]["tasks"]
    source = tasks["evaluate-models"]["inputs"]["artifacts"]["dataset"]["taskOutputArtifact"]
    assert source == {"outputArtifactKey": "dataset", "producerTask": "register-dataset"}


@pytest.mark.slow
def test_package_has_a_verified_onnx_export_and_a_model_card(tiny_model, tmp_path, one_thread):
    dataset = tmp_path / "data"
    prepare(str(MINI), str(dataset), PrepareOptions(shards=1, splits=("test",)), workers=1)
    out = str(tmp_path / "out")
    params = {"release": "cv-corpus-25.0-2026-03-09-es", "release_uri": str(MINI), "config": "tiny_ctc_char",
              "config_overrides": "", "train_source": "train"}  # fmt: skip
    run = registry.start_run(out, "r1", "kfp", params)
    shutil.copytree(tiny_model.parent, run.train.root)
    metrics = evaluate(str(tiny_model), str(dataset / "manifests" / "test.json"), run.eval.root)
    assert metrics["device"] == "cpu" and metrics["rtfx"] > 1 and metrics["wer_ci"][0] <= metrics["wer"]
    # NeMo's own scoring of the predictions manifest (text / pred_text) gives habla's WER.
    from nemo.collections.asr.metrics.wer import word_error_rate

    lines = jsonl.loads(storage.read_text(run.eval.predictions))
    nemo_wer = word_error_rate([line["pred_text"] for line in lines], [line["text"] for line in lines])
    assert nemo_wer == pytest.approx(metrics["wer"], abs=1e-6)

    done = package(run.root, str(dataset), str(tiny_model), out)
    target = OutputLayout(out).package("r1")
    check = json.loads(storage.read_text(target.onnx_check))
    assert check["verified"] and check["identical_transcripts"] == check["utterances"] == metrics["utterances"]
    assert check["max_abs_logprob_difference"] < 1e-3 and done["onnx"] == target.onnx
    import onnx

    onnx.checker.check_model(target.onnx)

    card = storage.read_text(target.card)
    front = yaml.safe_load(card.split("---\n")[1])
    (result,) = front["model-index"][0]["results"]
    assert front["license"] == "cc-by-4.0" and front["language"] == ["es"] and front["library_name"] == "nemo"
    assert result["dataset"]["name"] == "Common Voice 25.0 (es)" and result["dataset"]["split"] == "test"
    assert {m["type"]: m["value"] for m in result["metrics"]} == {"wer": round(100 * metrics["wer"], 2),
                                                                  "cer": round(100 * metrics["cer"], 2)}  # fmt: skip
    for text in ("### By gender", "### By age", "WER 95 % CI", "## Limitations", "## Licence", "## Training data",
                 "labels:", f"{check['identical_transcripts']} of {check['utterances']} test transcripts"):  # fmt: skip
        assert text in card, text
