"""Scoring transcripts: WER and CER, overall, by speaker group and by speaker, with bootstrap intervals.

References and hypotheses go through the same normalization as the training text
(``habla.speech.text.normalize_text``); text it cannot normalize is only lower-cased, so its odd characters
count as errors instead of vanishing. WER and CER are corpus-level: all edits over all reference words
(characters, spaces included), from jiwer's alignments.

Confidence intervals are percentile bootstrap intervals over **speakers** (:func:`bootstrap_interval`): the
test set's speakers (``client_id``) are resampled with replacement ``BOOTSTRAP_REPLICATES`` times with a fixed
seed, each drawn speaker bringing all of their utterances, and each replicate's corpus-level rate is computed.
Errors are not independent word by word, nor utterance by utterance: they cluster by speaker (a voice, an
accent, a microphone), so resampling utterances understates the uncertainty of a test set of a few hundred
speakers (Bisani & Ney, 2004, for the utterance level; a cluster bootstrap for the speaker level). An utterance
without a ``client_id`` is a speaker of its own; within one speaker (``by_speaker``) utterances are the unit.
``metrics.json`` records the unit. A group of a handful of speakers gets a wide interval: read it as "unknown",
not as a ranking. :func:`paired_improvement` is the same resampling applied to two models' errors on the same
utterances (the promotion rule in habla.evaluation.verdict).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from habla.core.errors import HablaError
from habla.speech.manifests import total_hours
from habla.speech.text import TextRejected, normalize_text

#: Breakdowns of metrics.json: (metrics key, manifest field).
GROUPS = (("by_gender", "gender"), ("by_age", "age"), ("by_accent", "accents"), ("by_speaker", "client_id"))
UNKNOWN = "unknown"
BOOTSTRAP_REPLICATES = 1000
BOOTSTRAP_SEED = 20240611
CONFIDENCE = 0.95
CONFUSIONS_KEPT = 20
CONFUSION_SPAN_MAX = 3  # characters on either side of a character confusion (longer spans are whole-word noise)
EMPTY = "∅"  # the missing side of an insertion or deletion in a confusion


def scoring_text(text: str) -> str:
    """The training normalization; text it rejects is only lower-cased and space-collapsed."""
    try:
        return normalize_text(text)
    except TextRejected as exc:
        return "" if exc.reason == "empty_text" else " ".join(text.lower().split())


@dataclass(frozen=True)
class Scored:
    """Edit counts of one utterance: word substitutions, deletions, insertions; character edits."""

    substitutions: int
    deletions: int
    insertions: int
    words: int  # reference words
    char_errors: int
    chars: int  # reference characters, spaces included

    @property
    def word_errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

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


def _align(ref: str, hyp: str):
    """jiwer's word and character alignments of one normalized pair (None for an empty reference)."""
    import jiwer

    if not ref:
        return None, None
    return jiwer.process_words(ref, hyp), jiwer.process_characters(ref, hyp)


def score(ref: str, hyp: str) -> Scored:
    """Word and character edit counts of one normalized pair (jiwer alignments)."""
    return _score(*_align(ref, hyp), ref, hyp)


def _score(words, chars, ref: str, hyp: str) -> Scored:
    if words is None:  # empty reference: every hypothesis word is an insertion
        return Scored(0, 0, len(hyp.split()), 0, len(hyp), 0)
    return Scored(
        words.substitutions,
        words.deletions,
        words.insertions,
        words.substitutions + words.deletions + words.hits,
        chars.substitutions + chars.deletions + chars.insertions,
        chars.substitutions + chars.deletions + chars.hits,
    )


def _confusions(words, chars, word_counts: Counter, char_counts: Counter) -> None:
    """Count word substitutions (``calle→caye``) and character edit spans (``ll→y``, ``á→a``, ``s→∅``).

    A character span is a maximal run of non-matching alignment chunks, so ``calle→caye`` counts as
    ``ll→y`` rather than as ``l→y`` plus a deleted ``l``.
    """
    if words is None:
        return
    ref_words, hyp_words = words.references[0], words.hypotheses[0]
    for chunk in words.alignments[0]:
        if chunk.type == "substitute":
            for r, h in zip(ref_words[chunk.ref_start_idx : chunk.ref_end_idx],
                            hyp_words[chunk.hyp_start_idx : chunk.hyp_end_idx]):  # fmt: skip
                word_counts[(r, h)] += 1
    ref_chars, hyp_chars = chars.references[0], chars.hypotheses[0]
    span = None
    for chunk in [*chars.alignments[0], None]:
        if chunk is not None and chunk.type != "equal":
            start = span or (chunk.ref_start_idx, chunk.hyp_start_idx)
            span = start
            end = (chunk.ref_end_idx, chunk.hyp_end_idx)
            continue
        if span is not None:
            r = "".join(ref_chars[span[0] : end[0]]).strip()
            h = "".join(hyp_chars[span[1] : end[1]]).strip()
            if (r or h) and len(r) <= CONFUSION_SPAN_MAX and len(h) <= CONFUSION_SPAN_MAX:
                char_counts[(r or EMPTY, h or EMPTY)] += 1
            span = None


def _top(counts: Counter) -> list[dict]:
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:CONFUSIONS_KEPT]
    return [{"ref": r, "hyp": h, "count": n} for (r, h), n in ranked]


# ---------------------------------------------------------------------------------------------- bootstrap


def _rates(errors: np.ndarray, totals: np.ndarray) -> np.ndarray:
    """Vectorized :func:`_rate`."""
    safe = np.where(totals > 0, totals, 1)
    return np.where(totals > 0, errors / safe, (errors > 0).astype(float))


def speakers_of(entries: Sequence[dict]) -> list[str]:
    """The bootstrap's cluster of each utterance: its ``client_id``, or a speaker of its own without one."""
    out = []
    for i, entry in enumerate(entries):
        speaker = str(entry.get("client_id") or "").strip()
        out.append(speaker if speaker and speaker != UNKNOWN else f"\0utterance {i}")
    return out


def unit_of(clusters: Sequence[str] | None) -> str:
    """What a bootstrap over ``clusters`` resamples (recorded with the figures)."""
    if clusters is None or all(c.startswith("\0") for c in clusters):
        return "utterance"
    return "speaker (client_id)"


def _clustered(values: np.ndarray, clusters: Sequence[str] | None) -> np.ndarray:
    """Rows summed per cluster (one row per speaker), in order of first appearance; ``values`` without clusters."""
    if clusters is None:
        return values
    if len(clusters) != values.shape[0]:
        raise ValueError("one cluster per utterance")
    ids: dict[str, int] = {}
    index = np.array([ids.setdefault(c, len(ids)) for c in clusters], dtype=int)
    out = np.zeros((len(ids), values.shape[1]))
    np.add.at(out, index, values)
    return out


def _resampled_sums(
    values: np.ndarray, replicates: int, seed: int, block: int = 200, clusters: Sequence[str] | None = None
) -> np.ndarray:
    """Column sums of ``values`` (utterances x k) over ``replicates`` resamplings of its rows with replacement
    (of its clusters' summed rows, with ``clusters``: one id per utterance, e.g. its speaker).

    Returns an array (replicates x k). The same seed draws the same utterances, whatever the columns: this
    is what makes a comparison of two models "paired".
    """
    values = _clustered(values, clusters)
    rng = np.random.default_rng(seed)
    n = values.shape[0]
    out = np.empty((replicates, values.shape[1]))
    for first in range(0, replicates, block):
        count = min(block, replicates - first)
        picks = rng.integers(0, n, size=(count, n))
        out[first : first + count] = values[picks].sum(axis=1)
    return out


def _interval(samples: np.ndarray, confidence: float) -> list[float]:
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return [round(float(low), 6), round(float(high), 6)]


def bootstrap_interval(
    errors: Sequence[int],
    totals: Sequence[int],
    replicates: int = BOOTSTRAP_REPLICATES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
    clusters: Sequence[str] | None = None,
) -> list[float]:
    """Percentile bootstrap interval of the corpus-level rate sum(errors) / sum(totals), utterances resampled
    (or, with ``clusters``, one id per utterance, the clusters: speakers)."""
    if len(errors) == 0:
        return [0.0, 0.0]
    sums = _resampled_sums(np.column_stack([errors, totals]).astype(float), replicates, seed, clusters=clusters)
    return _interval(_rates(sums[:, 0], sums[:, 1]), confidence)


def paired_improvement(
    new_errors: Sequence[int],
    best_errors: Sequence[int],
    totals: Sequence[int],
    replicates: int = BOOTSTRAP_REPLICATES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
    clusters: Sequence[str] | None = None,
) -> dict:
    """How much lower the new model's error rate is than the best one's, on the same utterances.

    ``improvement`` = rate(best) - rate(new) (positive: the new model is better) and its paired bootstrap
    interval: each replicate draws one set of utterances (of speakers, with ``clusters``: one id per
    utterance) and scores both models on it.
    """
    new, best, tot = (np.asarray(v, dtype=float) for v in (new_errors, best_errors, totals))
    if not (len(new) == len(best) == len(tot)) or len(tot) == 0:
        raise ValueError("a paired comparison needs the same, non-empty, list of utterances for both models")
    sums = _resampled_sums(np.column_stack([new, best, tot]), replicates, seed, clusters=clusters)
    deltas = _rates(sums[:, 1], sums[:, 2]) - _rates(sums[:, 0], sums[:, 2])
    point = float(_rates(best.sum(), tot.sum()) - _rates(new.sum(), tot.sum()))
    speakers = len(set(clusters)) if clusters is not None else len(tot)
    return {"improvement": round(point, 6), "interval": _interval(deltas, confidence), "utterances": len(tot),
            "speakers": speakers, "unit": unit_of(clusters)}  # fmt: skip


# ------------------------------------------------------------------------------------------------ metrics


def _summarize(scores: Sequence[Scored], with_counts: bool = False, clusters: Sequence[str] | None = None) -> dict:
    counts = np.array([(s.word_errors, s.words, s.char_errors, s.chars) for s in scores], dtype=float)
    sums = _resampled_sums(counts, BOOTSTRAP_REPLICATES, BOOTSTRAP_SEED, clusters=clusters)  # both rates, one draw
    word_errors, words, char_errors, chars = (int(v) for v in counts.sum(axis=0))
    out = {
        "wer": round(_rate(word_errors, words), 6),
        "cer": round(_rate(char_errors, chars), 6),
        "utterances": len(scores),
        "wer_ci": _interval(_rates(sums[:, 0], sums[:, 1]), CONFIDENCE),
        "cer_ci": _interval(_rates(sums[:, 2], sums[:, 3]), CONFIDENCE),
    }
    if with_counts:
        out.update(
            words=words,
            substitutions=sum(s.substitutions for s in scores),
            deletions=sum(s.deletions for s in scores),
            insertions=sum(s.insertions for s in scores),
            chars=chars,
            char_errors=char_errors,
        )
    return out


def group_of(entry: dict, key: str) -> str:
    value = entry.get(key)
    if value is None and key == "accents":
        value = entry.get("accent")  # Common Voice before 17.0
    value = str(value).strip() if value is not None else ""
    return value or UNKNOWN


def compute_metrics(entries: Sequence[dict], hypotheses: Sequence[str]) -> tuple[dict, list[dict]]:
    """``metrics.json``'s content and the predictions manifest's lines, from manifest entries and raw hypotheses.

    The predictions are a NeMo manifest (``audio_filepath``, ``duration``, ``text`` = the normalized
    reference, ``pred_text`` = the normalized hypothesis) plus each utterance's edit counts and groups, so
    NeMo's own tools (``speech_to_text_eval.py``) score it as habla does.
    """
    rows, scores = [], []
    word_confusions: Counter = Counter()
    char_confusions: Counter = Counter()
    for entry, raw_hyp in zip(entries, hypotheses, strict=True):
        ref, hyp = scoring_text(entry["text"]), scoring_text(raw_hyp)
        words, chars = _align(ref, hyp)
        scored = _score(words, chars, ref, hyp)
        _confusions(words, chars, word_confusions, char_confusions)
        scores.append(scored)
        row = {
            "audio_filepath": entry.get("_source", entry["audio_filepath"]),
            "duration": entry["duration"],
            "text": ref,
            "pred_text": hyp,
            "wer": round(scored.wer, 6),
            "cer": round(scored.cer, 6),
            "word_errors": scored.word_errors,
            "words": scored.words,
            "char_errors": scored.char_errors,
            "chars": scored.chars,
        }
        for _, key in GROUPS:
            row[key] = group_of(entry, key)
        if "path" in entry:
            row["path"] = entry["path"]
        if "shard_id" in entry:  # a tarred manifest's line: audio_filepath is the member of tar shard_id
            row["shard_id"] = entry["shard_id"]
        rows.append(row)
    speakers = speakers_of(entries)
    overall = _summarize(scores, with_counts=True, clusters=speakers)
    if overall["words"] == 0:  # no reference word at all: every rate would be 0/0, reported as a perfect 0.0
        raise HablaError(
            f"none of the {len(scores)} references holds a word once normalized: WER and CER are undefined "
            "(is this the right manifest, with its text in 'text'?)"
        )
    metrics = {k: overall.pop(k) for k in ("wer", "cer", "utterances")}
    metrics["hours"] = round(total_hours(entries), 6)
    metrics.update(overall)
    metrics["bootstrap"] = {"replicates": BOOTSTRAP_REPLICATES, "confidence": CONFIDENCE, "seed": BOOTSTRAP_SEED,
                            "unit": unit_of(speakers), "speakers": len(set(speakers)), "by_speaker_unit": "utterance",
                            "method": "percentile"}  # fmt: skip
    for name, key in GROUPS:
        members, member_speakers = defaultdict(list), defaultdict(list)
        for row, scored, speaker in zip(rows, scores, speakers):
            members[row[key]].append(scored)
            member_speakers[row[key]].append(speaker)
        ordered = sorted(members.items(), key=lambda kv: (-len(kv[1]), kv[0]))
        within = key == "client_id"  # one speaker per group: its utterances are the unit
        metrics[name] = {group: _summarize(group_scores, clusters=None if within else member_speakers[group])
                         for group, group_scores in ordered}  # fmt: skip
    metrics["confusions"] = {"words": _top(word_confusions), "characters": _top(char_confusions)}
    filtered = [i for i, e in enumerate(entries) if e.get("training_filter")]
    if filtered:  # habla prepare keeps every decodable test clip and notes the training filter it fails
        kept = [i for i in range(len(entries)) if not entries[i].get("training_filter")]
        subset = _summarize([scores[i] for i in kept], clusters=[speakers[i] for i in kept]) if kept else None
        reasons = Counter(str(entries[i]["training_filter"]) for i in filtered)
        metrics["filtered_subset"] = {
            "what": "the utterances the training filters would have kept (the figures above score every one)",
            "utterances": len(kept),
            "excluded": len(filtered),
            "excluded_by_filter": dict(sorted(reasons.items())),
            **({k: subset[k] for k in ("wer", "cer", "wer_ci", "cer_ci")} if subset else {"wer": None, "cer": None}),
        }
    return metrics, rows
