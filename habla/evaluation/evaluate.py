"""``habla evaluate``: transcribe a manifest with a ``.nemo`` model; score it overall, by speaker group and speaker.

    habla evaluate --model DST/model/model.nemo --manifest DST/data/manifests/test.json --out DST/eval

Writes to ``--out`` (local or ``s3://``, habla.core.layout.EvalLayout): ``metrics.json`` (``wer``, ``cer``,
``utterances``, ``hours``, their bootstrap 95 % intervals ``wer_ci``/``cer_ci``, word ``substitutions``,
``deletions`` and ``insertions``, the real-time factor ``rtfx`` and the ``device``; ``by_gender``/``by_age``/
``by_accent``/``by_speaker`` (``client_id``) breakdowns, each group with its WER, CER, intervals and
utterance count (an empty value is the group ``unknown``); the most frequent word and character
``confusions``), ``predictions.json`` (a NeMo manifest: ``text`` and ``pred_text``, normalized, plus each
utterance's edit counts), ``report.md`` (the tables, the confusions and the worst utterances) and
``wer_by_group.png``. Scoring: habla.evaluation.scoring; transcription: habla.evaluation.transcribe.

Heads: ``--decoder rnnt|ctc`` (default: the model's own, RNNT for hybrids and transducers, as NVIDIA's cards
report). The chosen head gives the figures and ``predictions.json``; a hybrid's other head is scored too, and
``heads`` holds both (WER, CER and their intervals), ``decoder`` names the one reported.

``--overlap-with`` a ``train.tsv`` or manifest (the checkpoint's own training data): ``overlap`` counts the test
clips, speakers and sentences it holds and scores the utterances that share none (habla.evaluation.overlap).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from habla.core import jsonl, state, storage
from habla.core.errors import HablaError
from habla.core.layout import EvalLayout
from habla.evaluation.inputs import AudioInput
from habla.evaluation.report import render_plot, render_report
from habla.evaluation.runners import decoders_of, default_decoder, device_name, load_model, make_runner, nemo_output_to
from habla.evaluation.scoring import compute_metrics
from habla.evaluation.transcribe import transcribe_inputs
from habla.speech import manifests, models

log = logging.getLogger("habla.evaluate")


def transcribe(
    model_path: str, audio_paths: Sequence[str], batch_size: int, decoder: str | None = None, log: str = ""
) -> tuple[list[str], dict]:
    """Greedy transcription with NeMo (GPU when there is one), windowed for long recordings, with the head
    ``decoder`` (None: the model's default); NeMo's restore messages go to the file ``log`` when given.

    Returns the hypotheses and the timing: ``rtfx`` (audio seconds per second of transcription),
    ``transcribe_seconds`` and ``device``.
    """
    return transcribe_with(make_runner(_restored(model_path, log), decoder), audio_paths, batch_size)


def _restored(model_path: str, log: str = ""):
    """The model, its restore messages in the file ``log`` (when given) rather than on the console."""
    if not log:
        return load_model(model_path)
    with nemo_output_to(log):
        return load_model(model_path)


def transcribe_with(runner, audio_paths: Sequence[str], batch_size: int) -> tuple[list[str], dict]:
    """:func:`transcribe` with a runner (habla.evaluation.runners.make_runner)."""
    started = time.monotonic()
    texts, audio_seconds = [], 0.0
    for _, result in transcribe_inputs(runner, [AudioInput(p) for p in audio_paths], batch_size,
                                       total=len(audio_paths)):  # fmt: skip
        texts.append(result.text)
        audio_seconds += result.duration
    seconds = time.monotonic() - started
    timing = {
        "rtfx": round(audio_seconds / seconds, 2) if seconds > 0 else None,
        "transcribe_seconds": round(seconds, 3),
        "device": device_name(runner.model),
        "decoder": runner.decoder,
    }
    return texts, timing


HEAD_KEYS = ("wer", "cer", "wer_ci", "cer_ci")


def evaluate(
    model: str,
    manifest: str,
    out: str,
    batch_size: int = 16,
    worst: int = 20,
    decoder: str | None = None,
    overlap_with: str | None = None,
    tars: str | None = None,
) -> dict:
    """Transcribe ``manifest`` with ``model``; write metrics.json, predictions.json, report.md and the plot to ``out``.
    ``tars``: the tar shards of a manifest in NeMo's tarred form.

    Returns the metrics. Raises HablaError for a missing model, manifest or audio file, before transcribing.
    """
    started = time.time()
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise HablaError(f"--batch-size must be a positive integer (got {batch_size!r})")
    if worst < 0:
        raise HablaError(f"--worst must be >= 0 (got {worst})")
    storage.check_writable_root(out)
    entries = manifests.read_manifest(manifest)
    local = manifests.localize(entries, manifest, tars=tars)
    for entry, original in zip(local, entries):
        entry["_source"] = original["audio_filepath"]
    model = models.model_in_folder(model)  # an output, run or training folder: the model it holds
    model_path = models.fetch_model(model, "--model")
    log.info("transcribing %d utterances (%.2f h) with %s", len(local), manifests.total_hours(local), model)

    layout = EvalLayout(out)
    if overlap_with:
        from habla.evaluation.overlap import read_training_data

        read_training_data(overlap_with)  # a bad file is one line before any transcription
    loaded = _restored(str(model_path), layout.log)
    chosen = decoder or default_decoder(loaded)
    paths = [e["audio_filepath"] for e in local]
    hypotheses, timing = transcribe_with(make_runner(loaded, chosen), paths, batch_size)
    metrics, rows = compute_metrics(local, hypotheses)
    metrics.update(timing, model=model, manifest=manifest, default_decoder=default_decoder(loaded))
    heads = {chosen: {k: metrics[k] for k in HEAD_KEYS}}
    for other in decoders_of(loaded):
        if other != chosen:  # a hybrid: its other head on the same utterances
            other_hyps, _ = transcribe_with(make_runner(loaded, other), paths, batch_size)
            other_metrics, _ = compute_metrics(local, other_hyps)
            heads[other] = {k: other_metrics[k] for k in HEAD_KEYS}
            log.info("%s head: WER %.4f CER %.4f", other.upper(), other_metrics["wer"], other_metrics["cer"])
    metrics["heads"] = heads
    if overlap_with:
        from habla.evaluation.overlap import overlap

        metrics["overlap"] = overlap(overlap_with, local, rows)

    state.write(layout.metrics, metrics, indent=2)  # NaN is refused: not JSON
    storage.write_text(layout.predictions, jsonl.dumps(rows))
    storage.write_text(layout.report, render_report(metrics, rows, model, manifest, worst))
    storage.write_bytes(layout.plot, render_plot(metrics, model, manifest))
    log.info("WER %.4f CER %.4f on %d utterances (%.1fs, %sx real time on %s) -> %s", metrics["wer"], metrics["cer"],
             metrics["utterances"], time.time() - started, metrics["rtfx"], metrics["device"], out)  # fmt: skip
    return metrics


def _read_predictions(uri: str) -> list[dict]:
    """A predictions manifest's lines: JSON objects with ``audio_filepath`` and ``pred_text`` (``duration`` and
    ``text`` optional: the references may come from another manifest)."""
    entries = []
    for number, line in jsonl.lines(manifests.read_manifest_text(uri)):
        try:
            entry = jsonl.loads_line(line)
        except ValueError as exc:
            raise HablaError(f"{uri} line {number}: not JSON ({getattr(exc, 'msg', exc)})") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("audio_filepath"), str):
            raise HablaError(f"{uri} line {number}: not a JSON object with an audio_filepath")
        if not isinstance(entry.get("pred_text"), str):
            raise HablaError(f"{uri} line {number}: no pred_text (the hypothesis) to score")
        entries.append({**entry, "_line": number})
    if not entries:
        raise HablaError(f"{uri}: no prediction in it")
    return entries


def score_predictions(predictions: str, out: str, manifest: str | None = None, worst: int = 20) -> dict:
    """``habla evaluate --predictions``: score transcripts made elsewhere (Whisper, a Hugging Face model, another
    toolkit) as habla scores its own: the same normalisation of reference and hypothesis, WER/CER with bootstrap
    intervals, the breakdowns by gender, age, accent and speaker, the confusions; the same files in ``out``.

    ``predictions`` is a NeMo manifest with ``pred_text`` per line, and ``text`` (the reference) unless
    ``manifest`` gives the references (and the speakers' metadata), joined by ``audio_filepath``. Returns the
    metrics; HablaError in one line for a line without a hypothesis or reference, or an utterance of the
    reference manifest without a prediction.
    """
    if worst < 0:
        raise HablaError(f"--worst must be >= 0 (got {worst})")
    storage.check_writable_root(out)
    predicted = _read_predictions(predictions)
    if manifest:
        entries = manifests.read_manifest(manifest)
        by_audio: dict[str, dict] = {}
        for entry in predicted:
            if entry["audio_filepath"] in by_audio:
                raise HablaError(f"{predictions} line {entry.get('_line')}: {entry['audio_filepath']} predicted twice")
            by_audio[entry["audio_filepath"]] = entry
        missing = [e["audio_filepath"] for e in entries if e["audio_filepath"] not in by_audio]
        if missing:
            raise HablaError(f"{predictions}: no prediction for {len(missing)} of the {len(entries)} utterances of "
                             f"{manifest} (the first: {missing[0]}); score every one, or give a manifest of those "
                             "predicted")  # fmt: skip
        hypotheses = [by_audio[e["audio_filepath"]]["pred_text"] for e in entries]
    else:
        entries = predicted
        for entry in entries:
            if not isinstance(entry.get("text"), str):
                raise HablaError(f"{predictions} line {entry.get('_line')}: no text (the reference); give the "
                                 "references with --manifest")  # fmt: skip
        hypotheses = [e["pred_text"] for e in entries]
    entries = [{**e, "duration": e.get("duration") if isinstance(e.get("duration"), (int, float)) else 0.0}
               for e in entries]  # fmt: skip
    metrics, rows = compute_metrics(entries, hypotheses)
    source = f"predictions {predictions}"
    metrics.update(model=source, manifest=manifest or predictions, predictions=predictions)
    layout = EvalLayout(out)
    state.write(layout.metrics, metrics, indent=2)
    storage.write_text(layout.predictions, jsonl.dumps(rows))
    storage.write_text(layout.report, render_report(metrics, rows, source, manifest or predictions, worst))
    storage.write_bytes(layout.plot, render_plot(metrics, source, manifest or predictions))
    log.info("WER %.4f CER %.4f on %d utterances -> %s", metrics["wer"], metrics["cer"], metrics["utterances"], out)
    return metrics
