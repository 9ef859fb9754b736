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
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from habla.core import jsonl, storage
from habla.core.errors import HablaError
from habla.core.layout import EvalLayout
from habla.evaluation.report import render_plot, render_report
from habla.evaluation.scoring import compute_metrics
from habla.evaluation.transcribe import AudioInput, CtcRunner, device_name, load_model, transcribe_inputs
from habla.training import manifests

log = logging.getLogger("habla.evaluate")


def transcribe(model_path: str, audio_paths: Sequence[str], batch_size: int) -> tuple[list[str], dict]:
    """Greedy CTC transcription with NeMo (GPU when there is one), windowed for long recordings.

    Returns the hypotheses and the timing: ``rtfx`` (audio seconds per second of transcription),
    ``transcribe_seconds`` and ``device``.
    """
    runner = CtcRunner(load_model(model_path))
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
    }
    return texts, timing


def evaluate(model: str, manifest: str, out: str, batch_size: int = 16, worst: int = 20) -> dict:
    """Transcribe ``manifest`` with ``model``; write metrics.json, predictions.json, report.md and the plot to ``out``.

    Returns the metrics. Raises HablaError for a missing model, manifest or audio file, before transcribing.
    """
    started = time.time()
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise HablaError(f"--batch-size must be a positive integer (got {batch_size!r})")
    if worst < 0:
        raise HablaError(f"--worst must be >= 0 (got {worst})")
    storage.check_writable_root(out)
    entries = manifests.read_manifest(manifest)
    local = manifests.localize(entries, manifest)
    for entry, original in zip(local, entries):
        entry["_source"] = original["audio_filepath"]
    model_path = manifests.fetch_model(model, "--model")
    log.info("transcribing %d utterances (%.2f h) with %s", len(local), manifests.total_hours(local), model)

    hypotheses, timing = transcribe(str(model_path), [e["audio_filepath"] for e in local], batch_size)
    metrics, rows = compute_metrics(local, hypotheses)
    metrics.update(timing, model=model, manifest=manifest)

    layout = EvalLayout(out)
    storage.write_text(layout.metrics, jsonl.dump(metrics, indent=2) + "\n")  # NaN is refused: not JSON
    storage.write_text(layout.predictions, jsonl.dumps(rows))
    storage.write_text(layout.report, render_report(metrics, rows, model, manifest, worst))
    storage.write_bytes(layout.plot, render_plot(metrics, model, manifest))
    log.info("WER %.4f CER %.4f on %d utterances (%.1fs, %sx real time on %s) -> %s", metrics["wer"], metrics["cer"],
             metrics["utterances"], time.time() - started, metrics["rtfx"], metrics["device"], out)  # fmt: skip
    return metrics
