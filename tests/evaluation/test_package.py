"""A promoted model's package: the ONNX export verified against the .nemo with onnxruntime on the bundled
test split, and the model card with Hugging Face model-index metadata (a real trained model, slow)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import yaml
from fixtures.releases import MINI

from habla.core import jsonl, storage
from habla.core.layout import OutputLayout
from habla.data.options import PrepareOptions
from habla.data.prepare import prepare
from habla.evaluation.evaluate import evaluate
from habla.evaluation.package import package
from habla.runs.parameters import RunParameters
from habla.runs.record import start_run


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
    params = RunParameters(release_uri=str(MINI), output_uri=out, run_name="r1", config="tiny_ctc_char")
    run = start_run(params, "kfp")
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

    # The ONNX file alone, without NeMo or torch: its metadata, habla's numpy front end and greedy CTC give the
    # .nemo's transcripts (eval/predictions.json, in the test manifest's order).
    script = (
        "import json, sys\nimport onnxruntime, soundfile\nfrom habla.speech.frontend import transcribe_onnx\n"
        "session = onnxruntime.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n"
        "texts = [transcribe_onnx(session, soundfile.read(json.loads(line)['audio_filepath'], dtype='float32')[0])\n"
        "         for line in open(sys.argv[2]) if line.strip()]\n"
        "assert not any(m.split('.')[0] in ('nemo', 'torch', 'lightning') for m in sys.modules), 'NeMo imported'\n"
        "print(json.dumps(texts))\n"
    )
    ran = subprocess.run([sys.executable, "-c", script, target.onnx, str(dataset / "manifests" / "test.json")],
                         capture_output=True, text=True, check=False, timeout=300)  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert json.loads(ran.stdout) == [line["pred_text"] for line in lines]

    card = storage.read_text(target.card)
    front = yaml.safe_load(card.split("---\n")[1])
    (result,) = front["model-index"][0]["results"]
    # the bundled clips are CC BY-SA 3.0 (data/README.md): the card says so, and names no hub dataset
    assert front["license"] == "cc-by-sa-3.0" and front["language"] == ["es"] and front["library_name"] == "nemo"
    assert "datasets" not in front and result["dataset"]["split"] == "test"
    assert str(tmp_path) not in card and str(MINI) not in card and "/root/" not in card  # no path of this machine
    assert check["model"]["parameters"] > 100_000 and f"{check['model']['parameters']:,}" in card
    assert 'ASRModel.restore_from("model.nemo"' in card and "16000 Hz" in card
    assert {m["type"]: m["value"] for m in result["metrics"]} == {"wer": round(100 * metrics["wer"], 2),
                                                                  "cer": round(100 * metrics["cer"], 2)}  # fmt: skip
    for text in ("### By gender", "### By age", "WER 95 % CI", "## Limitations", "## Licence", "## Training data",
                 "labels:", f"{check['identical_transcripts']} of {check['utterances']} test transcripts"):  # fmt: skip
        assert text in card, text


def test_the_model_card_shows_data_as_text():
    """Markup from the data and a config with a code fence in it cannot change the card's structure."""
    from habla.evaluation.package import render_card

    metrics = {"wer": 0.5, "cer": 0.2, "utterances": 3, "hours": 0.01, "wer_ci": [0.4, 0.6], "cer_ci": [0.1, 0.3],
               "by_accent": {"<img src=x onerror=alert(1)>": {"wer": 0.5, "cer": 0.2, "utterances": 3}}}  # fmt: skip
    record = {"release": "cv-corpus-25.0-2026-03-09-es", "release_uri": "s3://b/<script>x</script>", "config": "c"}
    card = render_card("r1", record, metrics, {}, {"config": "tiny`ctc"}, "a: 1\n```\n<script>x</script>\n", None)
    outside_code = card.split("```", 1)[0]
    assert "<img" not in card and "&lt;img src=x onerror=alert(1)&gt;" in card
    assert "<script>" not in outside_code.replace("`s3://b/<script>x</script>`", "")
    assert "````yaml\na: 1\n```\n<script>x</script>\n````" in card  # the config cannot close its own fence


def test_the_card_tells_the_truth_about_data_and_machine():
    """The licence comes from the release (the bundled clips: CC BY-SA 3.0), a Common Voice release is CC0 and
    named by its hub id only when the hub has it, and no path of the machine that made the card is in it."""
    from habla.evaluation.package import card_metadata, render_card
    from habla.speech.releases import release_license

    data_license = release_license(str(MINI))
    assert data_license[0] == "cc-by-sa-3.0" and "Digium" in data_license[1]
    assert release_license("/data/cv-corpus-17.0-2024-03-15/es")[0] == "cc0-1.0"
    metrics = {"wer": 0.5, "cer": 0.2, "utterances": 3, "hours": 0.01, "wer_ci": [0.4, 0.6], "cer_ci": [0.1, 0.3]}
    record = {"release": "mini-es-v25/es", "release_uri": str(MINI), "config": "tiny_ctc_char"}
    config = "model:\n  train_ds:\n    manifest_filepath: /root/.cache/habla/x/train.json\n  sample_rate: 16000\n"
    facts = {"class": "EncDecCTCModel", "encoder": "ConvASREncoder", "encoder_layers": 3, "parameters": 254_000,
             "sample_rate": 16000, "features": 64, "window_size": 0.025, "window_stride": 0.01,
             "vocabulary": list(" abc")}  # fmt: skip
    check = {"verified": False, "identical_transcripts": 0, "utterances": 3, "model": facts}
    summary = {"config": "tiny_ctc_char", "init_from": "/home/me/models/base.nemo"}
    card = render_card("r1", record, metrics, {}, summary, config, check, None, data_license)
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["license"] == "cc-by-sa-3.0" and "datasets" not in front
    assert str(MINI) not in card and "/root/" not in card and "/home/me" not in card and "base.nemo" in card
    assert "manifest_filepath: <path>" in card and "254,000" in card and "EncDecCTCModel" in card
    assert "## Usage" in card and "model.transcribe" in card and "64-band log-mel" in card
    hub = card_metadata("r", "cv-corpus-17.0-2024-03-15-es", metrics, "cc-by-4.0")
    assert hub["datasets"] == ["mozilla-foundation/common_voice_17_0"]
    assert "datasets" not in card_metadata("r", "cv-corpus-25.0-2026-03-09-es", metrics, "cc-by-4.0")


def test_the_numpy_front_end_computes_nemos_features():
    """habla.speech.frontend (numpy, librosa) against NeMo's AudioToMelSpectrogramPreprocessor at inference."""
    import numpy as np
    import torch
    from nemo.collections.asr.modules import AudioToMelSpectrogramPreprocessor

    from habla.speech.frontend import FrontEnd, log_mel

    rng = np.random.default_rng(7)
    t = np.arange(16000 * 2 + 77) / 16000
    samples = (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
    nemo = AudioToMelSpectrogramPreprocessor(sample_rate=16000, window_size=0.02, window_stride=0.01, features=64,
                                             n_fft=512, dither=0.0, pad_to=0).eval()  # fmt: skip
    with torch.inference_mode():
        expected, length = nemo(input_signal=torch.from_numpy(samples)[None], length=torch.tensor([samples.size]))
    ours = log_mel(samples, FrontEnd(win_length=320, hop_length=160, n_fft=512, n_mels=64))
    frames = int(length[0])
    assert ours.shape == (1, 64, frames)
    assert np.abs(ours - expected[:, :, :frames].numpy()).max() < 2e-3


def test_the_model_card_of_a_fine_tuned_hybrid_names_its_class_heads_and_overlap():
    from habla.evaluation.package import render_card

    metrics = {"wer": 0.05, "cer": 0.02, "utterances": 3, "hours": 0.01, "wer_ci": [0.04, 0.06],
               "cer_ci": [0.01, 0.03], "decoder": "rnnt",
               "heads": {"rnnt": {"wer": 0.05, "cer": 0.02, "wer_ci": [0.04, 0.06]},
                         "ctc": {"wer": 0.06, "cer": 0.03, "wer_ci": [0.05, 0.07]}},
               "overlap": {"with": "s3://b/cv12/train.tsv", "clips": 0, "speakers": 2, "sentences": 1,
                           "utterances_without": 1, "wer_without": 0.07, "wer_without_ci": [0.0, 0.2]}}  # fmt: skip
    summary = {"config": "init-from:stt_es_fastconformer_hybrid_large_pc",
               "init_from": "stt_es_fastconformer_hybrid_large_pc",
               "fine_tuning": {"checkpoint_class": "EncDecHybridRNNTCTCBPEModel"}}  # fmt: skip
    card = render_card("r1", {"release": "cv-corpus-25.0-2026-03-09-es"}, metrics, {}, summary, "a: 1\n", None)
    assert "(NeMo EncDecHybridRNNTCTCBPEModel)" in card and "fine-tuned as it is" in card
    assert "RNNT head." in card and "Both heads: RNNT WER 0.05" in card and "CTC WER 0.06" in card
    assert "2 test speaker(s)" in card and "WER 0.07" in card
