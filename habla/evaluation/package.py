"""A promoted model, ready to hand on: its model card (``README.md`` with Hugging Face ``model-index``
metadata) and an ONNX export verified against the ``.nemo``, under ``OUT/models/<run>/`` (layout.ModelPackage).

The export is NeMo's own (``model.export``: encoder and CTC decoder, features in, log-probabilities out; the
mel-spectrogram front end stays in NeMo/torch). It is verified by transcribing the test split twice, with
the ``.nemo`` and with the ONNX graph in onnxruntime (features from the model's own preprocessor, log-probs
decoded by the model's own CTC decoding): ``onnx_check.json`` records how many transcripts are identical and
the largest log-probability difference. Only an export whose transcripts all match is published.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import yaml

from habla.core import render, storage
from habla.core.layout import RunLayout
from habla.data.commonvoice import parse_release_name, release_label
from habla.data.report import read_report
from habla.evaluation.report import TITLES, interval, ordered_groups

log = logging.getLogger("habla.package")

#: The licence put on the model card unless told otherwise. Common Voice itself is CC0-1.0; a model
#: fine-tuned from a published checkpoint also carries that checkpoint's terms (NVIDIA's: CC-BY-4.0).
DEFAULT_LICENSE = "cc-by-4.0"
CARD_GROUPS = ("by_gender", "by_age", "by_accent")


# ------------------------------------------------------------------------------------------------- ONNX


def export_and_verify(model_path: str, entries: list[dict], onnx_path: Path) -> dict:
    """Export ``model_path`` (a local .nemo, CTC) to ``onnx_path`` and compare its transcripts of ``entries``
    (manifest lines with local audio) with the .nemo's. Returns the check (``identical`` of ``utterances``)."""
    import onnxruntime
    import torch

    from habla.evaluation.transcribe import CtcRunner, load_model, read_audio

    runner = CtcRunner(load_model(model_path, "cpu"))
    audio = [read_audio(e["audio_filepath"], runner.rate) for e in entries]
    reference = [runner.decode(runner.log_probs([a])[0])[0] for a in audio]

    exporter = load_model(model_path, "cpu")  # export() changes the model (masked convolutions off)
    exporter.export(str(onnx_path))
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    identical, largest = 0, 0.0
    for samples, expected in zip(audio, reference):
        with torch.inference_mode():
            features, length = runner.model.preprocessor(
                input_signal=torch.from_numpy(samples)[None], length=torch.tensor([len(samples)])
            )
        logprobs = session.run(None, {input_name: features[:, :, : int(length[0])].numpy()})[0][0]
        nemo_logprobs = runner.log_probs([samples])[0]
        frames = min(len(logprobs), len(nemo_logprobs))
        largest = max(largest, float(abs(logprobs[:frames] - nemo_logprobs[:frames].numpy()).max()))
        text = runner.decode(torch.from_numpy(logprobs))[0]
        identical += text == expected
    return {
        "utterances": len(entries),
        "identical_transcripts": identical,
        "verified": identical == len(entries),
        "max_abs_logprob_difference": round(largest, 6),
        "onnxruntime": onnxruntime.__version__,
        "inputs": [i.name for i in session.get_inputs()],
        "outputs": [o.name for o in session.get_outputs()],
        "front_end": "mel features from the model's preprocessor (NeMo), not in the ONNX graph",
    }


# ------------------------------------------------------------------------------------------- model card


def _percent(value: float) -> float:
    return round(100 * value, 2)


def card_metadata(run_name: str, release: str, metrics: dict, license_id: str = DEFAULT_LICENSE) -> dict:
    """The YAML front matter of the card: Hugging Face's model-index with test WER/CER (in %)."""
    parsed = parse_release_name(release)
    version = parsed.version_str if parsed else release
    locale = (parsed.locale if parsed and parsed.locale else "es") or "es"
    return {
        "language": [locale],
        "license": license_id,
        "library_name": "nemo",
        "pipeline_tag": "automatic-speech-recognition",
        "tags": ["automatic-speech-recognition", "speech", "audio", "CTC", "NeMo", "common-voice", "habla"],
        "datasets": ["mozilla-foundation/common_voice"],
        "metrics": ["wer", "cer"],
        "model-index": [{
            "name": run_name,
            "results": [{
                "task": {"type": "automatic-speech-recognition", "name": "Automatic Speech Recognition"},
                "dataset": {"name": f"Common Voice {version} ({locale})", "type": "common_voice", "config": locale,
                            "split": "test", "args": {"language": locale}},
                "metrics": [
                    {"type": "wer", "value": _percent(metrics["wer"]), "name": "Test WER (%)"},
                    {"type": "cer", "value": _percent(metrics["cer"]), "name": "Test CER (%)"},
                ],
            }],
        }],
    }  # fmt: skip


def render_card(
    run_name: str,
    record: dict,
    metrics: dict,
    dataset: dict,
    summary: dict,
    config_yaml: str,
    onnx_check: dict | None,
    license_id: str = DEFAULT_LICENSE,
) -> str:
    """``README.md`` of a promoted model: metadata, results with intervals, per-group tables, data, training,
    files, licence and limitations."""
    release = record.get("release") or release_label(record.get("release_uri", ""))
    front = yaml.safe_dump(card_metadata(run_name, release, metrics, license_id), sort_keys=False, allow_unicode=True)
    splits = dataset.get("splits") or {}
    data_rows = [{"split": s, "clips": v.get("clips"), "hours": v.get("hours"), "speakers": v.get("speakers")}
                 for s, v in splits.items()]  # fmt: skip
    overall = [{"utterances": metrics["utterances"], "hours": metrics["hours"], "WER": metrics["wer"],
                "WER 95 % CI": interval(metrics.get("wer_ci")), "CER": metrics["cer"],
                "CER 95 % CI": interval(metrics.get("cer_ci"))}]  # fmt: skip
    sections = [
        f"---\n{front}---",
        f"# {run_name}: Spanish speech recognition (NeMo CTC), trained by habla",
        f"A `{summary.get('config') or record.get('config')}` model trained on Common Voice `{release}` with "
        "habla (Common Voice → NeMo, as a Kubeflow pipeline). It writes lower-case Spanish "
        "without punctuation (`a–z ñ á é í ó ú ü` and spaces).",
        "## Results on the test split",
        render.table(overall),
        f"Word errors: {metrics.get('substitutions', 0)} substitutions, {metrics.get('deletions', 0)} deletions, "
        f"{metrics.get('insertions', 0)} insertions. Intervals: 95 % percentile bootstrap over utterances. "
        f"Transcribed at {metrics.get('rtfx')}x real time on {metrics.get('device')}.",
    ]
    for name in CARD_GROUPS:
        rows = [{TITLES[name]: g, "utterances": m["utterances"], "WER": m["wer"],
                 "WER 95 % CI": interval(m.get("wer_ci")), "CER": m["cer"]}
                for g, m in ordered_groups(name, metrics.get(name) or {})]  # fmt: skip
        if rows:
            sections += [f"### By {TITLES[name]}", render.table(rows)]
    sections += [
        "## Training data",
        f"Common Voice `{release}` (`{record.get('release_uri', '')}`), prepared by habla: MP3 → 16 kHz mono WAV, "
        "text normalized, rows filtered with a reason for each "
        f"(train source: `{record.get('train_source', 'train')}`).",
        render.table(data_rows) if data_rows else "",
        "## Training",
        render.table(
            [
                {
                    "config": summary.get("config") or record.get("config"),
                    "overrides": " ".join(summary.get("overrides") or []) or record.get("config_overrides") or "",
                    "init from": summary.get("init_from") or "",
                    "steps": summary.get("steps"),
                    "epochs": summary.get("epochs"),
                    "audio h seen": summary.get("audio_hours_seen"),
                    "nodes × devices": f"{summary.get('nodes')} × {summary.get('devices')}",
                    "wall h": round((summary.get("wall_seconds") or 0) / 3600, 2),
                }
            ]
        ),  # fmt: skip
        "<details><summary>The resolved training config (config.yaml)</summary>\n\n```yaml\n"
        + config_yaml.strip()
        + "\n```\n</details>",
        "## Files",
        "- `model.nemo`: the NeMo model (`ASRModel.restore_from`, or `habla transcribe --model model.nemo …`).",
    ]
    if onnx_check and onnx_check.get("verified"):
        sections.append(
            f"- `model.onnx`: encoder and CTC decoder (input `{onnx_check['inputs'][0]}`: 64-band log-mel features "
            f"from the model's preprocessor; output `{onnx_check['outputs'][0]}`: log-probabilities). Verified "
            f"with onnxruntime {onnx_check['onnxruntime']}: {onnx_check['identical_transcripts']} of "
            f"{onnx_check['utterances']} test transcripts identical to the .nemo's (largest log-prob difference "
            f"{onnx_check['max_abs_logprob_difference']}); see `onnx_check.json`."
        )
    elif onnx_check:
        sections.append(
            f"- No ONNX export: it gave {onnx_check.get('identical_transcripts')} of {onnx_check.get('utterances')} "
            "test transcripts identical to the .nemo's, so it was not published (`onnx_check.json`)."
        )
    sections += [
        "## Licence",
        f"`{license_id}` for the weights. The training data, Common Voice, is CC0-1.0. A model fine-tuned from a "
        "published checkpoint also carries that checkpoint's terms.",
        "## Limitations",
        "- Read speech from Common Voice volunteers: expect higher error rates on spontaneous, noisy, "
        "far-field or telephone speech, and on vocabulary unlike Common Voice's sentences.",
        "- Output is normalized text: no capitals, punctuation, digits or symbols (numbers come out as words, "
        "if at all).",
        "- Groups with few test utterances have wide intervals; a difference inside them is not evidence of a "
        "difference between groups. Speakers of the test split do not appear in the training split.",
        "- Greedy CTC decoding without a language model.",
    ]
    return "\n\n".join(s for s in sections if s) + "\n"


def package(run_dir: str, dataset_uri: str, model_uri: str, output_uri: str, license_id: str = DEFAULT_LICENSE) -> dict:
    """Write the model card and the verified ONNX export of a run's model to ``OUT/models/<run>/``.

    Returns ``{"card", "onnx", "onnx_check", "verified"}`` (``onnx`` is None when the export did not verify).
    """
    from habla.core.layout import OutputLayout
    from habla.training import manifests

    run = RunLayout(run_dir)
    record = json.loads(storage.read_text(run.record))
    metrics = json.loads(storage.read_text(run.eval.metrics))
    dataset = read_report(dataset_uri)
    summary = json.loads(storage.read_text(run.train.summary))
    try:
        config_yaml = storage.read_text(run.train.config)
    except FileNotFoundError:
        config_yaml = "# not found"
    target = OutputLayout(output_uri).package(record["run_name"])
    entries = manifests.localize(manifests.read_manifest(dataset["manifests"]["test"]), dataset["manifests"]["test"])
    local_model = manifests.fetch_model(model_uri, "model")
    with tempfile.TemporaryDirectory(prefix="habla-onnx-") as tmp:
        onnx_local = Path(tmp) / "model.onnx"
        check = export_and_verify(str(local_model), entries, onnx_local)
        storage.write_text(target.onnx_check, json.dumps(check, indent=2) + "\n")
        if check["verified"]:
            storage.upload_file(onnx_local, target.onnx)
        else:
            log.warning("ONNX export not published: %d of %d transcripts identical", check["identical_transcripts"],
                        check["utterances"])  # fmt: skip
    card = render_card(record["run_name"], record, metrics, dataset, summary, config_yaml, check, license_id)
    storage.write_text(target.card, card)
    return {"card": target.card, "onnx": target.onnx if check["verified"] else None, "onnx_check": target.onnx_check,
            "verified": check["verified"], "model": target.model}  # fmt: skip
