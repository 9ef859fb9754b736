"""Whether a new model replaces the best one: a paired bootstrap over the test utterances both were scored on
(habla.evaluation.scoring.paired_improvement), and the Markdown that explains the decision."""

from __future__ import annotations

from dataclasses import dataclass, field

from habla.core import render
from habla.core.errors import HablaError
from habla.evaluation.scoring import CONFIDENCE, paired_improvement, speakers_of


def beats(new_wer: float, best_wer: float | None, margin: float) -> bool:
    """True when the new model should replace the best one: better by more than ``margin`` (absolute WER).

    The point comparison only; :func:`verdict` decides promotions with a paired bootstrap.
    """
    if margin < 0:
        raise HablaError(f"the promotion margin must be >= 0, got {margin}")
    return best_wer is None or new_wer < best_wer - margin


@dataclass(frozen=True)
class Verdict:
    """Whether the new model replaces the best one, the Markdown that explains it (for the KFP UI) and the
    numbers behind it (for run.json)."""

    promote: bool
    markdown: str
    record: dict = field(default_factory=dict)


def _paired_counts(new_rows: list[dict], best_rows: list[dict]) -> tuple[list, list]:
    """Both models' per-utterance rows in the same order; HablaError unless they cover the same utterances."""
    best_by_clip = {r["audio_filepath"]: r for r in best_rows}
    new_clips = [r["audio_filepath"] for r in new_rows]
    duplicates = len(best_by_clip) != len(best_rows) or len(set(new_clips)) != len(new_clips)
    if duplicates or set(new_clips) != set(best_by_clip):
        raise HablaError(
            f"the new model ({len(new_rows)} utterances) and the best one ({len(best_rows)}) were not scored on the "
            "same test set: they cannot be compared"
        )
    return new_rows, [best_by_clip[c] for c in new_clips]


def verdict(
    new: dict,
    best_record: dict | None,
    best_metrics: dict | None,
    margin: float,
    new_rows: list[dict] | None = None,
    best_rows: list[dict] | None = None,
) -> Verdict:
    """Decide whether the new model replaces the best one, both scored on the same test set.

    The rule (a paired bootstrap over speakers, habla.evaluation.scoring.paired_improvement):

    * the WER improvement (best WER - new WER) must exceed ``margin`` with 95 % confidence: the lower end of
      its 95 % interval is above ``margin`` (so the interval excludes 0 too);
    * and the CER must not be significantly worse: the upper end of the CER improvement's interval is >= 0.

    A difference the interval cannot tell from noise keeps the best model. ``new_rows``/``best_rows`` are
    the predictions manifests' lines (``word_errors``, ``words``, ``char_errors``, ``chars`` per utterance).
    """
    if margin < 0:
        raise HablaError(f"the promotion margin must be >= 0, got {margin}")
    if best_record is None or best_metrics is None:
        record = {
            "promote": True,
            "rule": "first model",
            "reason": "the first model of this output folder, with nothing to compare it with, becomes the best one",
            "wer": new["wer"],
            "cer": new["cer"],
        }
        text = (
            "## Against the current best model\n\n**Promoted**: this output folder had no promoted model yet, so "
            f"this one becomes the best (WER {new['wer']:.4f}, CER {new['cer']:.4f}); later runs must beat it.\n"
        )
        return Verdict(True, text, record)
    if new_rows is None or best_rows is None:
        raise HablaError("the promotion verdict needs both models' per-utterance scores (predictions manifests)")
    new_rows, best_rows = _paired_counts(list(new_rows), list(best_rows))
    words = [r["words"] for r in new_rows]
    speakers = speakers_of(new_rows)  # errors cluster by speaker: the bootstrap draws speakers
    wer = paired_improvement([r["word_errors"] for r in new_rows], [r["word_errors"] for r in best_rows], words,
                             clusters=speakers)  # fmt: skip
    cer = paired_improvement([r["char_errors"] for r in new_rows], [r["char_errors"] for r in best_rows],
                             [r["chars"] for r in new_rows], clusters=speakers)  # fmt: skip
    wer_clear = wer["interval"][0] > margin
    cer_worse = cer["interval"][1] < 0
    promote = wer_clear and not cer_worse
    pct = f"{round(CONFIDENCE * 100)} %"
    if promote:
        why = f"its WER is lower by more than the margin {margin} with {pct} confidence"
    elif cer_worse:
        why = f"its CER is significantly worse ({pct} interval of the CER improvement below 0)"
    else:
        why = f"its WER improvement is not above the margin {margin} with {pct} confidence (it may be noise)"
    record = {
        "promote": promote,
        "rule": f"paired bootstrap over {wer['unit']}: lower end of the {pct} interval of the WER improvement > "
        "margin, and CER not significantly worse",
        "bootstrap_unit": wer["unit"],
        "speakers": wer["speakers"],
        "margin": margin,
        "best_run": best_record.get("run"),
        "best_model": best_record.get("model"),
        "wer": new["wer"],
        "cer": new["cer"],
        "best_wer": best_metrics["wer"],
        "best_cer": best_metrics["cer"],
        "wer_improvement": wer["improvement"],
        "wer_improvement_ci": wer["interval"],
        "cer_improvement": cer["improvement"],
        "cer_improvement_ci": cer["interval"],
        "utterances": wer["utterances"],
        "reason": why,
    }
    rows = [
        {"model": "this run", "WER": new["wer"], "CER": new["cer"]},
        {"model": f"best ({best_record.get('run', '?')})", "WER": best_metrics["wer"], "CER": best_metrics["cer"]},
    ]
    lo, hi = wer["interval"]
    clo, chi = cer["interval"]
    outcome = "promoted: it replaces the best model" if promote else "kept: the best model stays"
    text = (
        "## Against the current best model\n\n"
        + render.table(rows)
        + f"\n\nOn the same {wer['utterances']} utterances, the new model's WER is lower by "
        f"{wer['improvement']:.4f} ({pct} interval {lo:.4f} to {hi:.4f}) and its CER by {cer['improvement']:.4f} "
        f"({clo:.4f} to {chi:.4f}), paired bootstrap over {wer['unit']} ({wer['speakers']} resampled).\n\n"
        f"Margin {margin}: **{outcome}** — {why}.\n"
    )
    return Verdict(promote, text, record)


def fine_tuning_gain(
    baseline: dict, baseline_rows: list[dict], tuned: dict, tuned_rows: list[dict], checkpoint: str = "the checkpoint"
) -> dict:
    """What fine-tuning bought: the checkpoint scored zero-shot (``baseline``: its metrics.json and predictions
    lines) against the fine-tuned model on the same test utterances, with the paired bootstrap over speakers.

    Returns ``baseline`` and ``fine_tuned`` (WER, CER), ``wer_improvement``/``cer_improvement`` (baseline −
    fine-tuned: positive is better) with their 95 % intervals, the unit and the counts, and ``markdown``.
    """
    tuned_rows, baseline_rows = _paired_counts(list(tuned_rows), list(baseline_rows))
    speakers = speakers_of(tuned_rows)
    wer = paired_improvement([r["word_errors"] for r in tuned_rows], [r["word_errors"] for r in baseline_rows],
                             [r["words"] for r in tuned_rows], clusters=speakers)  # fmt: skip
    cer = paired_improvement([r["char_errors"] for r in tuned_rows], [r["char_errors"] for r in baseline_rows],
                             [r["chars"] for r in tuned_rows], clusters=speakers)  # fmt: skip
    pct = f"{round(CONFIDENCE * 100)} %"
    lo, hi = wer["interval"]
    if lo > 0:
        reading = "fine-tuning lowered the WER (the interval excludes 0)"
    elif hi < 0:
        reading = "fine-tuning raised the WER (the interval lies below 0)"
    else:
        reading = "the change is within noise (the interval includes 0)"
    rows = [
        {"model": f"{checkpoint} (zero-shot)", "WER": baseline["wer"], "CER": baseline["cer"]},
        {"model": "fine-tuned", "WER": tuned["wer"], "CER": tuned["cer"]},
    ]
    markdown = (
        "## What fine-tuning bought\n\n"
        + render.table(rows)
        + f"\n\nOn the same {wer['utterances']} utterances ({wer['speakers']} speakers), the WER is lower by "
        f"{wer['improvement']:.4f} ({pct} interval {lo:.4f} to {hi:.4f}) and the CER by {cer['improvement']:.4f} "
        f"({cer['interval'][0]:.4f} to {cer['interval'][1]:.4f}), paired bootstrap over {wer['unit']}: {reading}.\n"
    )
    return {
        "baseline": {"model": checkpoint, "wer": baseline["wer"], "cer": baseline["cer"]},
        "fine_tuned": {"wer": tuned["wer"], "cer": tuned["cer"]},
        "wer_improvement": wer["improvement"],
        "wer_improvement_ci": wer["interval"],
        "cer_improvement": cer["improvement"],
        "cer_improvement_ci": cer["interval"],
        "utterances": wer["utterances"],
        "speakers": wer["speakers"],
        "bootstrap_unit": wer["unit"],
        "markdown": markdown,
    }
