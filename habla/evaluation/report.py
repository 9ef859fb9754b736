"""What people read after an evaluation: ``report.md`` (tables and the worst utterances), ``wer_by_group.png``,
and the terminal summary."""

from __future__ import annotations

import io
from collections.abc import Sequence

from habla.core import render, storage
from habla.evaluation.scoring import GROUPS

PLOT_GROUPS_MAX = 15  # the largest groups of a breakdown drawn in the plot (Common Voice has many accents)
TITLES = {"by_gender": "gender", "by_age": "age", "by_accent": "accent"}
HEADERS = {"wer": "WER", "cer": "CER", "word_errors": "errors", "ref": "reference", "hyp": "hypothesis"}


def render_report(metrics: dict, rows: Sequence[dict], model: str, manifest: str, worst: int) -> str:
    """``report.md``: overall scores, a table per breakdown, the plot, and the worst utterances."""
    sections = [
        "# Evaluation",
        f"Model `{model}` on `{manifest}`.",
        render.table([metrics], ["utterances", "hours", "wer", "cer"], headers=HEADERS),
    ]
    for name, _key in GROUPS:
        title = TITLES[name]
        groups = [{title: g, **m} for g, m in metrics[name].items()]
        sections += [f"## WER by {title}", render.table(groups, [title, "utterances", "wer", "cer"], headers=HEADERS)]
    sections.append("![WER by group](wer_by_group.png)")
    wrong = [r for r in rows if r["ref"] != r["hyp"]]
    ranked = sorted(wrong, key=lambda r: (-r["word_errors"], -r["wer"], -r["cer"], r["audio_filepath"]))[:worst]
    sections.append(f"## Worst utterances ({len(ranked)} of {len(wrong)} with errors)")
    if ranked:
        worst_rows = [{**r, "clip": r.get("path") or storage.name(r["audio_filepath"])} for r in ranked]
        sections.append(render.table(worst_rows, ["wer", "word_errors", "ref", "hyp", "clip"], headers=HEADERS))
    else:
        sections.append("Every hypothesis equals its reference.")
    return "\n\n".join(sections) + "\n"


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


def format_metrics(metrics: dict) -> str:
    """A terminal summary: overall WER/CER, then a table per breakdown (gender, age, accent)."""
    lines = [
        f"WER {metrics['wer']:.4f}  CER {metrics['cer']:.4f}  on {metrics['utterances']} utterances "
        f"({metrics['hours']:.3f} h)"
    ]
    for name, _ in GROUPS:
        groups = sorted((metrics.get(name) or {}).items(), key=lambda kv: -kv[1]["utterances"])
        if groups:
            rows = [{TITLES[name]: g[:32], **m} for g, m in groups]
            lines += ["", render.table(rows, [TITLES[name], "utterances", "wer", "cer"], "table", headers=HEADERS)]
    return "\n".join(lines)
