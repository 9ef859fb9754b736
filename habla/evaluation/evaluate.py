"""``habla evaluate``: transcribe a manifest with a ``.nemo`` model and score it, overall and by speaker group.

    habla evaluate --model DST/model/model.nemo --manifest DST/data/manifests/test.json --out DST/eval

Writes to ``--out`` (local or ``s3://``, habla.core.layout.EvalLayout): ``metrics.json`` (``wer``, ``cer``,
``utterances``, ``hours`` and ``by_gender``/``by_age``/``by_accent`` breakdowns from the manifest's metadata,
each group with its WER, CER and utterance count; an empty value is the group ``unknown``), ``errors.jsonl``
(one line per utterance: reference, hypothesis, WER, CER), ``report.md`` (the tables and the worst
utterances) and ``wer_by_group.png``. Scoring: habla.evaluation.scoring.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from habla.core import jsonl, storage
from habla.core.errors import HablaError, one_line
from habla.core.layout import EvalLayout
from habla.evaluation.report import render_plot, render_report
from habla.evaluation.scoring import compute_metrics
from habla.training import manifests

log = logging.getLogger("habla.evaluate")


def transcribe(model_path: str, audio_paths: Sequence[str], batch_size: int) -> list[str]:
    """Batched greedy transcription with NeMo (GPU when there is one)."""
    import torch
    from nemo.collections.asr.models import ASRModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model = ASRModel.restore_from(model_path, map_location=torch.device(device))
    except Exception as exc:
        raise HablaError(f"--model {model_path}: cannot restore a NeMo model ({one_line(exc)})") from None
    model.eval()
    with torch.inference_mode():
        outputs = model.transcribe(list(audio_paths), batch_size=batch_size, verbose=False)
    if isinstance(outputs, tuple):  # some models return (best, all) hypotheses
        outputs = outputs[0]
    return [o.text if hasattr(o, "text") else str(o) for o in outputs]


def evaluate(model: str, manifest: str, out: str, batch_size: int = 16, worst: int = 20) -> dict:
    """Transcribe ``manifest`` with ``model`` and write metrics.json, errors.jsonl, report.md and the plot to ``out``.

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

    hypotheses = transcribe(str(model_path), [e["audio_filepath"] for e in local], batch_size)
    metrics, rows = compute_metrics(local, hypotheses)

    layout = EvalLayout(out)
    storage.write_text(layout.metrics, jsonl.dump(metrics, indent=2) + "\n")  # NaN is refused: not JSON
    storage.write_text(layout.errors, jsonl.dumps(rows))
    storage.write_text(layout.report, render_report(metrics, rows, model, manifest, worst))
    storage.write_bytes(layout.plot, render_plot(metrics))
    log.info("WER %.4f CER %.4f on %d utterances (%.1fs) -> %s", metrics["wer"], metrics["cer"],
             metrics["utterances"], time.time() - started, out)  # fmt: skip
    return metrics
