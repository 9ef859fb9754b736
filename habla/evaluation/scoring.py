"""Scoring transcripts: WER and CER, overall and by speaker group, from manifest entries and hypotheses.

References and hypotheses go through the same normalization as the training text
(``habla.data.text.normalize_text``); text it cannot normalize is only lower-cased, so its odd characters
count as errors instead of vanishing. WER and CER are corpus-level: all edits over all reference words
(characters, spaces included), from jiwer's alignments.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from habla.data.text import TextRejected, normalize_text
from habla.training.manifests import total_hours

#: Breakdowns of metrics.json: (metrics key, manifest field).
GROUPS = (("by_gender", "gender"), ("by_age", "age"), ("by_accent", "accents"))
UNKNOWN = "unknown"


def scoring_text(text: str) -> str:
    """The training normalization; text it rejects is only lower-cased and space-collapsed."""
    try:
        return normalize_text(text)
    except TextRejected as exc:
        return "" if exc.reason == "empty_text" else " ".join(text.lower().split())


@dataclass(frozen=True)
class Scored:
    """Edit counts of one utterance."""

    word_errors: int
    words: int
    char_errors: int
    chars: int

    @property
    def wer(self) -> float:
        return _rate(self.word_errors, self.words)

    @property
    def cer(self) -> float:
        return _rate(self.char_errors, self.chars)


def _rate(errors: int, total: int) -> float:
    """Errors per reference unit; an empty reference scores 0 when the hypothesis is empty too, else 1."""
    if total == 0:
        return 0.0 if errors == 0 else 1.0
    return errors / total


def score(ref: str, hyp: str) -> Scored:
    """Word and character edit counts of one normalized pair (jiwer alignments)."""
    import jiwer

    if not ref and not hyp:
        return Scored(0, 0, 0, 0)
    if not ref:
        return Scored(len(hyp.split()), 0, len(hyp), 0)
    words = jiwer.process_words(ref, hyp)
    chars = jiwer.process_characters(ref, hyp)
    return Scored(
        words.substitutions + words.deletions + words.insertions,
        words.substitutions + words.deletions + words.hits,
        chars.substitutions + chars.deletions + chars.insertions,
        chars.substitutions + chars.deletions + chars.hits,
    )


def _summarize(scores: Sequence[Scored]) -> dict:
    total = Scored(*(sum(getattr(s, f) for s in scores) for f in ("word_errors", "words", "char_errors", "chars")))
    return {"wer": round(total.wer, 6), "cer": round(total.cer, 6), "utterances": len(scores)}


def group_of(entry: dict, key: str) -> str:
    value = entry.get(key)
    if value is None and key == "accents":
        value = entry.get("accent")  # Common Voice before 17.0
    value = str(value).strip() if value is not None else ""
    return value or UNKNOWN


def compute_metrics(entries: Sequence[dict], hypotheses: Sequence[str]) -> tuple[dict, list[dict]]:
    """``metrics.json``'s content and the ``errors.jsonl`` rows, from manifest entries and raw hypotheses."""
    rows, scores = [], []
    for entry, raw_hyp in zip(entries, hypotheses, strict=True):
        ref, hyp = scoring_text(entry["text"]), scoring_text(raw_hyp)
        scored = score(ref, hyp)
        scores.append(scored)
        row = {
            "audio_filepath": entry.get("_source", entry["audio_filepath"]),
            "ref": ref,
            "hyp": hyp,
            "wer": round(scored.wer, 6),
            "cer": round(scored.cer, 6),
            "word_errors": scored.word_errors,
            "words": scored.words,
            "duration": entry["duration"],
        }
        for _, key in GROUPS:
            row[key] = group_of(entry, key)
        if "path" in entry:
            row["path"] = entry["path"]
        rows.append(row)
    metrics = {**_summarize(scores), "hours": round(total_hours(entries), 6)}
    metrics = {k: metrics[k] for k in ("wer", "cer", "utterances", "hours")}
    for name, key in GROUPS:
        members = defaultdict(list)
        for row, scored in zip(rows, scores):
            members[row[key]].append(scored)
        ordered = sorted(members.items(), key=lambda kv: (-len(kv[1]), kv[0]))
        metrics[name] = {group: _summarize(group_scores) for group, group_scores in ordered}
    return metrics, rows
