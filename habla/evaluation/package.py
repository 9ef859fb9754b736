"""A promoted model, ready to hand on: its model card (``README.md`` with Hugging Face ``model-index``
metadata) and an ONNX export verified against the ``.nemo``, under ``OUT/models/<run>/`` (layout.ModelPackage).

The export is NeMo's own (``model.export``: encoder and CTC decoder, features in, log-probabilities out; the
mel-spectrogram front end stays in NeMo/torch). It is verified by transcribing the test split twice, with
the ``.nemo`` and with the ONNX graph in onnxruntime (features from the model's own preprocessor, log-probs
decoded by the model's own CTC decoding): ``onnx_check.json`` records how many transcripts are identical and
the largest log-probability difference. Only an export whose transcripts all match is published.
"""

from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path

import yaml

from habla.core import render, state, storage
from habla.core.layout import RunLayout
from habla.evaluation.report import TITLES, interval, ordered_groups
from habla.speech.dataset import read_report, split_tars
from habla.speech.releases import parse_release_name, release_label, release_license

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

    from habla.evaluation.inputs import read_audio
    from habla.evaluation.runners import CtcRunner, load_model

    runner = CtcRunner(load_model(model_path, "cpu"))
    facts = model_facts(runner.model)
    audio = [read_audio(e["audio_filepath"], runner.rate) for e in entries]
    reference = [runner.decode(runner.log_probs([a])[0])[0] for a in audio]

    exporter = load_model(model_path, "cpu")  # export() changes the model (masked convolutions off)
    exporter.export(str(onnx_path))
    front_end = describe_front_end(runner.model)
    add_metadata(onnx_path, front_end, facts["vocabulary"])
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]  # QuartzNet: audio_signal; FastConformer: + length
    identical, largest = 0, 0.0
    for samples, expected in zip(audio, reference):
        with torch.inference_mode():
            features, length = runner.model.preprocessor(
                input_signal=torch.from_numpy(samples)[None], length=torch.tensor([len(samples)])
            )
        frames = int(length[0])
        feed = {"audio_signal": features[:, :, :frames].numpy(), "length": length.numpy()}
        logprobs = session.run(None, {name: feed[name] for name in names})[0][0]
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
        "front_end": "log-mel features computed outside the graph: habla.speech.frontend (numpy, librosa) from the "
        "file's metadata"
        if front_end
        else "mel features from the model's preprocessor (NeMo), not in the ONNX graph",
        "model": facts,
    }


def describe_front_end(model):
    """The model's preprocessor as habla.speech.frontend.FrontEnd, or None for settings it does not reproduce
    (another window, frame splicing, exact padding, a clamped log)."""
    import math

    from omegaconf import OmegaConf

    from habla.speech.frontend import FrontEnd

    pre = OmegaConf.to_container(model.cfg.preprocessor, resolve=True)
    rate = int(pre.get("sample_rate", 16000))
    win, hop = int(pre.get("window_size", 0.02) * rate), int(pre.get("window_stride", 0.01) * rate)
    plain = (pre.get("window", "hann") == "hann" and pre.get("frame_splicing", 1) == 1 and not pre.get("exact_pad")
             and pre.get("log", True) and pre.get("log_zero_guard_type", "add") == "add"
             and pre.get("normalize", "per_feature") == "per_feature"
             and isinstance(pre.get("log_zero_guard_value", 2**-24), (int, float)))  # fmt: skip
    if not plain:
        return None
    return FrontEnd(sample_rate=rate, n_fft=int(pre.get("n_fft") or 2 ** math.ceil(math.log2(win))), win_length=win,
                    hop_length=hop, n_mels=int(pre.get("features", 64)), fmin=float(pre.get("lowfreq") or 0.0),
                    fmax=pre.get("highfreq"), mel_norm=pre.get("mel_norm", "slaney"),
                    preemph=pre.get("preemph", 0.97), mag_power=float(pre.get("mag_power", 2.0)),
                    log_guard=float(pre.get("log_zero_guard_value", 2**-24)))  # fmt: skip


def add_metadata(onnx_path: Path, front_end, vocabulary: list[str]) -> None:
    """Write the vocabulary and the front end's settings into the ONNX file's metadata (habla.speech.frontend)."""
    import json

    import onnx

    from habla.speech.frontend import FRONT_END_KEY, VOCABULARY_KEY

    graph = onnx.load(str(onnx_path))
    props = {VOCABULARY_KEY: json.dumps(vocabulary, ensure_ascii=False), "habla.blank": str(len(vocabulary)),
             "habla.decoding": "greedy CTC: best label per frame, repeats merged, blank dropped"}  # fmt: skip
    if front_end is not None:
        props[FRONT_END_KEY] = front_end.to_json()
    onnx.helper.set_model_props(graph, {**{p.key: p.value for p in graph.metadata_props}, **props})
    onnx.save(graph, str(onnx_path))


def model_facts(model) -> dict:
    """What a model card says of a restored model: class, encoder, parameters, input and vocabulary."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(model.cfg, resolve=True)
    pre = cfg.get("preprocessor") or {}
    encoder = cfg.get("encoder") or {}
    decoder = cfg.get("decoder") or {}
    vocabulary = list(getattr(model.decoder, "vocabulary", None) or decoder.get("vocabulary") or [])
    return {
        "class": type(model).__name__,
        "encoder": str(encoder.get("_target_", "")).rsplit(".", 1)[-1],
        "encoder_layers": encoder.get("n_layers") or len(encoder.get("jasper") or []) or None,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "sample_rate": int(pre.get("sample_rate") or cfg.get("sample_rate") or 16000),
        "features": pre.get("features") or pre.get("nfilt"),
        "window_size": pre.get("window_size"),
        "window_stride": pre.get("window_stride"),
        "vocabulary": vocabulary,
    }


# ------------------------------------------------------------------------------------------- model card

#: Common Voice versions published on the Hugging Face hub as ``mozilla-foundation/common_voice_<major>_<minor>``.
HUB_COMMON_VOICE = ("11.0", "12.0", "13.0", "15.0", "16.0", "16.1", "17.0")


def weights_license(data_license: str) -> str:
    """The weights' licence: a ShareAlike data licence carries over to the model (an adaptation of the data);
    otherwise habla's default for weights."""
    return data_license if "-sa-" in data_license else DEFAULT_LICENSE


_PATH_VALUE = re.compile(r"""(?m)(:[ \t]+|^[ \t]*-[ \t]+)(['"]?)(?:/|~|file:|s3://|gs://)[^\s'"]*\2""")


def scrub_config(config_yaml: str) -> str:
    """A config without this machine's paths: every value that is an absolute path or a storage URI (a manifest
    in the cache, a checkpoint folder) becomes ``<path>``."""
    return _PATH_VALUE.sub(lambda m: m[1] + "<path>", config_yaml)


def _percent(value: float) -> float:
    return round(100 * value, 2)


def card_metadata(run_name: str, release: str, metrics: dict, license_id: str = DEFAULT_LICENSE) -> dict:
    """The YAML front matter of the card: Hugging Face's model-index with test WER/CER (in %). ``datasets`` names
    a hub dataset only when this release is one the hub has."""
    parsed = parse_release_name(release)
    version = parsed.version_str if parsed else release
    locale = (parsed.locale if parsed and parsed.locale else "es") or "es"
    on_hub = parsed is not None and version in HUB_COMMON_VOICE
    hub = {"datasets": [f"mozilla-foundation/common_voice_{version.replace('.', '_')}"]} if on_hub else {}
    name = f"Common Voice {version} ({locale})" if parsed else f"{release} ({locale})"
    meta = {
        "language": [locale],
        "license": license_id,
        "library_name": "nemo",
        "pipeline_tag": "automatic-speech-recognition",
        "tags": ["automatic-speech-recognition", "speech", "audio", "CTC", "NeMo", "common-voice", "habla"],
        **hub,
        "metrics": ["wer", "cer"],
        "model-index": [{
            "name": run_name,
            "results": [{
                "task": {"type": "automatic-speech-recognition", "name": "Automatic Speech Recognition"},
                "dataset": {"name": name, "type": hub["datasets"][0] if on_hub else "common_voice",
                            "config": locale, "split": "test", "args": {"language": locale}},
                "metrics": [
                    {"type": "wer", "value": _percent(metrics["wer"]), "name": "Test WER (%)"},
                    {"type": "cer", "value": _percent(metrics["cer"]), "name": "Test CER (%)"},
                ],
            }],
        }],
    }  # fmt: skip
    return meta


def render_card(
    run_name: str,
    record: dict,
    metrics: dict,
    dataset: dict,
    summary: dict,
    config_yaml: str,
    onnx_check: dict | None,
    license_id: str | None = None,
    data_license: tuple[str, str] = ("other", ""),
) -> str:
    """``README.md`` of a promoted model: metadata, usage, the model and its input, results with intervals,
    per-group tables, data, training, files, licence and limitations. No path of the machine it was made on."""
    release = record.get("release") or release_label(record.get("release_uri", ""))
    license_id = license_id or weights_license(data_license[0])
    front = yaml.safe_dump(card_metadata(run_name, release, metrics, license_id), sort_keys=False, allow_unicode=True)
    facts = (onnx_check or {}).get("model") or {}
    splits = dataset.get("splits") or {}
    data_rows = [{"split": s, "clips": v.get("clips"), "hours": v.get("hours"), "speakers": v.get("speakers")}
                 for s, v in splits.items()]  # fmt: skip
    overall = [{"utterances": metrics["utterances"], "hours": metrics["hours"], "WER": metrics["wer"],
                "WER 95 % CI": interval(metrics.get("wer_ci")), "CER": metrics["cer"],
                "CER 95 % CI": interval(metrics.get("cer_ci"))}]  # fmt: skip
    config = summary.get("config") or record.get("config")
    ft = summary.get("fine_tuning") or {}
    kind = f"NeMo {ft['checkpoint_class']}" if ft.get("checkpoint_class") else "NeMo CTC"
    what = (
        f"{render.md_code(summary.get('init_from') or '')} ({ft.get('checkpoint_class')}) fine-tuned as it is"
        if ft
        else f"A {render.md_code(config)} model trained"
    )
    sections = [
        f"---\n{front}---",
        f"# {render.md(run_name)}: Spanish speech recognition ({kind}), trained by habla",
        f"{what} on Common Voice {render.md_code(release)} with "
        "habla (Common Voice → NeMo, as a Kubeflow pipeline). It writes lower-case Spanish "
        "without punctuation (`a–z ñ á é í ó ú ü` and spaces).",
        "## Usage",
        render.md_block(
            "# pip install 'nemo_toolkit[asr]'   (or: habla transcribe --model model.nemo --out out/ audio.wav)\n"
            "from nemo.collections.asr.models import ASRModel\n\n"
            'model = ASRModel.restore_from("model.nemo", map_location="cpu")\n'
            'print(model.transcribe(["audio.wav"])[0].text)',
            "python",
        ),
        "## Model and input",
        render.table(
            [
                {
                    "class": facts.get("class") or "",
                    "encoder": facts.get("encoder") or "",
                    "layers": facts.get("encoder_layers") or "",
                    "parameters": f"{facts['parameters']:,}" if facts else "",
                    "vocabulary": f"{len(facts.get('vocabulary') or [])} characters" if facts else "",
                }
            ]
        )
        if facts
        else "",  # fmt: skip
        f"Input: mono audio at {facts.get('sample_rate', 16000)} Hz, any length (other rates and MP3 are "
        "resampled/decoded by `habla transcribe`; `ASRModel.transcribe` wants 16 kHz WAV). Features: "
        f"{facts.get('features', 64)}-band log-mel, {facts.get('window_size', 0.025)} s windows every "
        f"{facts.get('window_stride', 0.01)} s. Output: lower-case text, greedy CTC decoding.",
        "## Results on the test split",
        render.table(overall),
        f"Word errors: {metrics.get('substitutions', 0)} substitutions, {metrics.get('deletions', 0)} deletions, "
        f"{metrics.get('insertions', 0)} insertions. Intervals: 95 % percentile bootstrap over speakers. "
        f"Transcribed at {metrics.get('rtfx')}x real time on {render.md(metrics.get('device'))}"
        + (f", {str(metrics['decoder']).upper()} head." if metrics.get("decoder") else "."),
    ]
    heads = metrics.get("heads") or {}
    if len(heads) > 1:
        sections.append("Both heads: " + "; ".join(
            f"{name.upper()} WER {m['wer']} ({interval(m.get('wer_ci'))}), CER {m['cer']}" for name, m in heads.items()
        ) + ".")  # fmt: skip
    overlap = metrics.get("overlap")
    if overlap:
        without = overlap.get("wer_without")
        sections.append(
            f"Overlap with the checkpoint's training data ({render.md_code(overlap['with'])}): "
            f"{overlap['clips']} test clip(s), {overlap['speakers']} test speaker(s) and the sentences of "
            f"{overlap['sentences']} test utterance(s) are in it; on the {overlap['utterances_without']} "
            f"utterance(s) that share none, WER {without if without is not None else 'n/a'} "
            f"({interval(overlap.get('wer_without_ci'))})."
        )
    for name in CARD_GROUPS:
        rows = [{TITLES[name]: g, "utterances": m["utterances"], "WER": m["wer"],
                 "WER 95 % CI": interval(m.get("wer_ci")), "CER": m["cer"]}
                for g, m in ordered_groups(name, metrics.get(name) or {})]  # fmt: skip
        if rows:
            sections += [f"### By {TITLES[name]}", render.table(rows)]
    sections += [
        "## Training data",
        f"The release {render.md_code(release)}, prepared by habla: MP3 → 16 kHz mono WAV, text normalized, rows "
        f"filtered with a reason for each (train source: {render.md_code(record.get('train_source', 'train'))}). "
        f"Its licence: {render.md_code(data_license[0])}"
        + (f" ({render.md(' '.join(data_license[1].split()))})" if data_license[1] else "")
        + ".",
        render.table(data_rows) if data_rows else "",
        "## Training",
        render.table(
            [
                {
                    "config": config,
                    "overrides": " ".join(summary.get("overrides") or []) or record.get("config_overrides") or "",
                    "init from": storage.name(summary.get("init_from") or "") if summary.get("init_from") else "",
                    "steps": summary.get("steps"),
                    "epochs": summary.get("epochs"),
                    "audio h seen": summary.get("audio_hours_seen"),
                    "nodes × devices": f"{summary.get('nodes')} × {summary.get('devices')}",
                    "wall h": round((summary.get("wall_seconds") or 0) / 3600, 2),
                }
            ]
        ),  # fmt: skip
        "<details><summary>The resolved training config (config.yaml)</summary>\n\n"
        + render.md_block(scrub_config(config_yaml), "yaml")
        + "\n</details>",
        "## Files",
        "- `model.nemo`: the NeMo model (`ASRModel.restore_from`, or `habla transcribe --model model.nemo …`).",
    ]
    if onnx_check and onnx_check.get("verified"):
        sections.append(
            f"- `model.onnx`: encoder and CTC decoder (input `{onnx_check['inputs'][0]}`: 64-band log-mel features "
            f"from the model's preprocessor; output `{onnx_check['outputs'][0]}`: log-probabilities). Verified "
            f"with onnxruntime {onnx_check['onnxruntime']}: {onnx_check['identical_transcripts']} of "
            f"{onnx_check['utterances']} test transcripts identical to the .nemo's (largest log-prob difference "
            f"{onnx_check['max_abs_logprob_difference']}); see `onnx_check.json`. Its metadata holds the vocabulary "
            "(`habla.vocabulary`, the CTC blank after it) and the feature settings (`habla.front_end`): "
            "`habla.speech.frontend.transcribe_onnx(onnxruntime.InferenceSession('model.onnx'), samples)` "
            "transcribes with numpy, librosa and onnxruntime only, no NeMo or torch."
        )
    elif onnx_check:
        sections.append(
            f"- No ONNX export: it gave {onnx_check.get('identical_transcripts')} of {onnx_check.get('utterances')} "
            "test transcripts identical to the .nemo's, so it was not published (`onnx_check.json`)."
        )
    sections += [
        "## Licence",
        f"{render.md_code(license_id)} for the weights. The training data: {render.md_code(data_license[0])}"
        + (
            " (ShareAlike: the weights, an adaptation of it, carry the same licence)"
            if "-sa-" in data_license[0]
            else ""
        )  # fmt: skip
        + ". A model fine-tuned from a published checkpoint also carries that checkpoint's terms.",
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


def package(run_dir: str, dataset_uri: str, model_uri: str, output_uri: str, license_id: str | None = None) -> dict:
    """Write the model card and the verified ONNX export of a run's model to ``OUT/models/<run>/``.

    Returns ``{"card", "onnx", "onnx_check", "verified"}`` (``onnx`` is None when the export did not verify).
    """
    from habla.core.layout import OutputLayout
    from habla.speech import manifests, models

    run = RunLayout(run_dir)
    record = state.load(run.record, ("run_name",), what="run record")
    metrics = state.load(run.eval.metrics, ("wer", "cer"), what="evaluation")
    dataset = read_report(dataset_uri)
    summary = state.load(run.train.summary, what="training summary")
    try:
        config_yaml = storage.read_text(run.train.config)
    except FileNotFoundError:
        config_yaml = "# not found"
    target = OutputLayout(output_uri).package(record["run_name"])
    test = dataset["manifests"]["test"]
    entries = manifests.localize(manifests.read_manifest(test), test, tars=split_tars(dataset, "test"))
    local_model = models.fetch_model(model_uri, "model")
    with tempfile.TemporaryDirectory(prefix="habla-onnx-") as tmp:
        onnx_local = Path(tmp) / "model.onnx"
        check = export_and_verify(str(local_model), entries, onnx_local)
        state.write(target.onnx_check, check, indent=2)
        if check["verified"]:
            storage.upload_file(onnx_local, target.onnx)
        else:
            log.warning("ONNX export not published: %d of %d transcripts identical", check["identical_transcripts"],
                        check["utterances"])  # fmt: skip
    data_license = release_license(record.get("release_uri", ""))
    card = render_card(record["run_name"], record, metrics, dataset, summary, config_yaml, check, license_id,
                       data_license)  # fmt: skip
    storage.write_text(target.card, card)
    return {"card": target.card, "onnx": target.onnx if check["verified"] else None, "onnx_check": target.onnx_check,
            "verified": check["verified"], "model": target.model}  # fmt: skip
