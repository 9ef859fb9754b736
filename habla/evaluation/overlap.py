"""``--overlap-with``: which test utterances a checkpoint may have seen in training, and the WER without them.

A published checkpoint was trained on some release's train split (NVIDIA's Spanish models: Common Voice 12's
``train.tsv`` among others). Its WER on a newer release's test split can flatter it when test clips, speakers
or sentences were in that training data. Given that data (a Common Voice ``train.tsv``, or a NeMo manifest with
``path``/``audio_filepath``, ``client_id`` and ``text``/``sentence``), :func:`overlap` counts the test
utterances whose clip, speaker or sentence (normalized as the references are) it holds, and scores the
utterances that share none of the three.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
from collections.abc import Sequence

from habla.core import storage
from habla.core.errors import HablaError, one_line
from habla.evaluation.scoring import bootstrap_interval, speakers_of, unit_of
from habla.speech.text import TextRejected, normalize_text


def _stem(path: str) -> str:
    """A clip's name without folder or extension: ``clips/common_voice_es_1.mp3`` and ``…/common_voice_es_1.wav``
    are the same clip."""
    base = posixpath.basename(str(path).replace("\\", "/"))
    return base.rsplit(".", 1)[0] if "." in base else base


def _sentence(text: str) -> str | None:
    try:
        return normalize_text(text)
    except TextRejected:
        return None


def read_training_data(uri: str) -> tuple[set[str], set[str], set[str]]:
    """The clips (stems), speakers and normalized sentences of a ``train.tsv`` or a manifest."""
    try:
        text = storage.read_text(uri)
    except FileNotFoundError:
        raise HablaError(f"--overlap-with {uri}: no such file") from None
    except (UnicodeDecodeError, IsADirectoryError, PermissionError) as exc:
        raise HablaError(f"--overlap-with {uri}: cannot read it ({one_line(exc)})") from None
    clips, speakers, sentences = set(), set(), set()
    first = text.lstrip()[:1]
    if first == "{":  # a NeMo manifest
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise HablaError(f"--overlap-with {uri}: line {number} is not JSON") from None
            if not isinstance(row, dict):
                raise HablaError(f"--overlap-with {uri}: line {number} is not a JSON object")
            _add(row.get("path") or row.get("audio_filepath"), row.get("client_id"),
                 row.get("sentence") or row.get("text"), clips, speakers, sentences)  # fmt: skip
    else:  # a Common Voice TSV
        reader = csv.DictReader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE)
        if not reader.fieldnames or "path" not in reader.fieldnames:
            raise HablaError(f"--overlap-with {uri}: neither a NeMo manifest nor a TSV with a 'path' column")
        for row in reader:
            _add(row.get("path"), row.get("client_id"), row.get("sentence"), clips, speakers, sentences)
    if not clips and not speakers and not sentences:
        raise HablaError(f"--overlap-with {uri}: holds no clip")
    return clips, speakers, sentences


def _add(path, speaker, sentence, clips: set, speakers: set, sentences: set) -> None:
    if path:
        clips.add(_stem(path))
    if speaker and str(speaker).strip():
        speakers.add(str(speaker).strip())
    if sentence:
        normalized = _sentence(str(sentence))
        if normalized:
            sentences.add(normalized)


def overlap(uri: str, entries: Sequence[dict], rows: Sequence[dict]) -> dict:
    """``metrics.json``'s ``overlap``: the test utterances (``entries``, scored in ``rows``) whose clip, speaker
    or sentence the training data at ``uri`` holds, and WER/CER on those that share none."""
    clips, speakers, sentences = read_training_data(uri)
    flags = []
    for entry, row in zip(entries, rows, strict=True):
        clip = _stem(entry.get("path") or entry.get("audio_filepath") or "")
        speaker = str(entry.get("client_id") or "").strip()
        sentence = _sentence(str(entry.get("sentence") or entry.get("text") or "")) or row.get("text")
        flags.append((clip in clips, bool(speaker) and speaker in speakers, bool(sentence) and sentence in sentences))
    clean = [row for row, f in zip(rows, flags) if not any(f)]
    seen_speakers = {str(e.get("client_id")).strip() for e, f in zip(entries, flags) if f[1]}
    out = {
        "with": uri,
        "training_clips": len(clips),
        "clips": sum(f[0] for f in flags),
        "utterances_of_seen_speakers": sum(f[1] for f in flags),
        "speakers": len(seen_speakers),
        "sentences": sum(f[2] for f in flags),
        "overlapping_utterances": len(rows) - len(clean),
        "utterances_without": len(clean),
    }
    if clean:
        words = sum(r["words"] for r in clean)
        chars = sum(r["chars"] for r in clean)
        clusters = speakers_of(clean)
        out.update(
            wer_without=round(sum(r["word_errors"] for r in clean) / words, 6) if words else None,
            cer_without=round(sum(r["char_errors"] for r in clean) / chars, 6) if chars else None,
            wer_without_ci=bootstrap_interval(
                [r["word_errors"] for r in clean], [r["words"] for r in clean], clusters=clusters
            ),  # fmt: skip
            bootstrap_unit=unit_of(clusters),
        )
    else:
        out.update(wer_without=None, cer_without=None, wer_without_ci=None)
    return out
