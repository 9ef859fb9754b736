"""``habla evaluate``: transcribe a manifest with a ``.nemo`` model and score it, overall and by speaker group.

    habla evaluate --model DST/model/model.nemo --manifest DST/data/manifests/test.json --out DST/eval

Writes to ``--out`` (local or ``s3://``): ``metrics.json`` (``wer``, ``cer``, ``utterances``, ``hours`` and
``by_gender``/``by_age``/``by_accent`` breakdowns from the manifest's metadata, each group with its WER,
CER and utterance count; an empty value is the group ``unknown``), ``errors.jsonl`` (one line per
utterance: reference, hypothesis, WER, CER), ``report.md`` (the tables and the worst utterances) and
``wer_by_group.png``.

References and hypotheses go through the same normalization as the training text
(``habla.text.normalize_text``); text it cannot normalize is only lower-cased, so its odd characters count
as errors instead of vanishing. WER and CER are corpus-level: all edits over all reference words
(characters, spaces included), from jiwer's alignments.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from habla import nemo_data, storage
from habla.errors import HablaError
from habla.text import TextRejected, normalize_text

log = logging.getLogger("habla.evaluate")

GROUPS = (("by_gender", "gender"), ("by_age", "age"), ("by_accent", "accents"))
UNKNOWN = "unknown"
PLOT_GROUPS_MAX = 15  # the largest groups of a breakdown drawn in the plot (Common Voice has many accents)


# ------------------------------------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help=".nemo model (local or s3://)")
    parser.add_argument("--manifest", required=True, help="NeMo manifest to transcribe (local or s3://)")
    parser.add_argument("--out", required=True, help="output folder (local or s3://)")
    parser.add_argument("--batch-size", type=int, default=16, help="utterances per transcription batch (default 16)")
    parser.add_argument("--worst", type=int, default=20, help="worst utterances listed in report.md (default 20)")


def run(args: argparse.Namespace) -> int:
    metrics = evaluate(args.model, args.manifest, args.out, batch_size=args.batch_size, worst=args.worst)
    print(json.dumps({k: metrics[k] for k in ("wer", "cer", "utterances", "hours")}))
    return 0


# -------------------------------------------------------------------------------------------- scoring


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
    metrics = {**_summarize(scores), "hours": round(nemo_data.total_hours(entries), 6)}
    metrics = {k: metrics[k] for k in ("wer", "cer", "utterances", "hours")}
    for name, key in GROUPS:
        members = defaultdict(list)
        for row, scored in zip(rows, scores):
            members[row[key]].append(scored)
        ordered = sorted(members.items(), key=lambda kv: (-len(kv[1]), kv[0]))
        metrics[name] = {group: _summarize(group_scores) for group, group_scores in ordered}
    return metrics, rows


# -------------------------------------------------------------------------------------------- outputs


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    def cell(value) -> str:
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def render_report(metrics: dict, rows: Sequence[dict], model: str, manifest: str, worst: int) -> str:
    overall = [[metrics["utterances"], metrics["hours"], metrics["wer"], metrics["cer"]]]
    parts = [
        "# Evaluation\n",
        f"Model `{model}` on `{manifest}`.\n",
        _table(["utterances", "hours", "WER", "CER"], overall),
    ]
    for name, _key in GROUPS:
        title = {"by_gender": "gender", "by_age": "age", "by_accent": "accent"}[name]
        groups = metrics[name]
        parts.append(f"\n## WER by {title}\n")
        parts.append(_table([title, "utterances", "WER", "CER"],
                            [[g, m["utterances"], m["wer"], m["cer"]] for g, m in groups.items()]))  # fmt: skip
    parts.append("\n![WER by group](wer_by_group.png)\n")
    wrong = [r for r in rows if r["ref"] != r["hyp"]]
    ranked = sorted(wrong, key=lambda r: (-r["word_errors"], -r["wer"], -r["cer"], r["audio_filepath"]))[:worst]
    parts.append(f"\n## Worst utterances ({len(ranked)} of {len(wrong)} with errors)\n")
    if not ranked:
        parts.append("Every hypothesis equals its reference.\n")
        return "".join(parts)
    worst_rows = [[r["wer"], r["word_errors"], r["ref"], r["hyp"], r.get("path") or storage.name(r["audio_filepath"])]
                  for r in ranked]  # fmt: skip
    parts.append(_table(["WER", "errors", "reference", "hypothesis", "clip"], worst_rows))
    return "".join(parts)


def render_plot(metrics: dict) -> bytes:
    """PNG: one horizontal bar chart of WER per breakdown (the largest groups), with utterance counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    breakdowns = [(name, list(metrics[name].items())[:PLOT_GROUPS_MAX]) for name, _ in GROUPS]
    heights = [max(1.2, 0.35 * len(groups) + 0.8) for _, groups in breakdowns]
    fig, axes = plt.subplots(len(breakdowns), 1, figsize=(8, sum(heights)), gridspec_kw={"height_ratios": heights})
    for ax, (name, groups) in zip(axes, breakdowns):
        labels = [f"{g} (n={m['utterances']})" for g, m in groups]
        values = [m["wer"] for _, m in groups]
        bars = ax.barh(labels, values, color="#4c72b0")
        ax.bar_label(bars, labels=[f"{v:.3f}" for v in values], padding=3, fontsize=8)
        ax.axvline(metrics["wer"], color="#c44e52", linestyle="--", linewidth=1, label=f"overall {metrics['wer']:.3f}")
        ax.invert_yaxis()
        ax.set_title(name.replace("by_", "WER by "))
        ax.set_xlim(0, max([1.0, *values]) * 1.05)
        ax.legend(loc="lower right", fontsize=8)
    axes[-1].set_xlabel("WER")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------- transcription


def transcribe(model_path: str, audio_paths: Sequence[str], batch_size: int) -> list[str]:
    """Batched greedy transcription with NeMo (GPU when there is one)."""
    import torch
    from nemo.collections.asr.models import ASRModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model = ASRModel.restore_from(model_path, map_location=torch.device(device))
    except Exception as exc:
        raise HablaError(f"--model {model_path}: cannot restore a NeMo model ({nemo_data.one_line(exc)})") from None
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
    storage.check_writable_root(out)
    entries = nemo_data.read_manifest(manifest)
    local = nemo_data.localize(entries, manifest)
    for entry, original in zip(local, entries):
        entry["_source"] = original["audio_filepath"]
    model_path = nemo_data.fetch_model(model, "--model")
    log.info("transcribing %d utterances (%.2f h) with %s", len(local), nemo_data.total_hours(local), model)

    hypotheses = transcribe(str(model_path), [e["audio_filepath"] for e in local], batch_size)
    metrics, rows = compute_metrics(local, hypotheses)

    storage.write_text(storage.join(out, "metrics.json"), json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    storage.write_text(
        storage.join(out, "errors.jsonl"), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    )
    storage.write_text(storage.join(out, "report.md"), render_report(metrics, rows, model, manifest, worst))
    storage.write_bytes(storage.join(out, "wer_by_group.png"), render_plot(metrics))
    log.info("WER %.4f CER %.4f on %d utterances (%.1fs) -> %s", metrics["wer"], metrics["cer"],
             metrics["utterances"], time.time() - started, out)  # fmt: skip
    return metrics
