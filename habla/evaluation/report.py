"""What people read after an evaluation: ``report.md`` (tables, confusions, the worst utterances),
``wer_by_group.png``, and the terminal summary."""

from __future__ import annotations

from collections.abc import Sequence

from habla.core import render, storage
from habla.evaluation.scoring import GROUPS
from habla.speech.dataset import age_key

PLOT_GROUPS_MAX = 15  # the largest groups of a breakdown drawn in the plot (Common Voice has many accents)
TABLE_SPEAKERS_MAX = 20  # speakers listed in report.md (all of them are in metrics.json)
# accents listed in report.md: Common Voice's accents are free text, thousands of them in a full release (all are
# in metrics.json)
TABLE_ACCENTS_MAX = 40
TABLE_LIMITS = {"by_speaker": (TABLE_SPEAKERS_MAX, "speakers"), "by_accent": (TABLE_ACCENTS_MAX, "accents")}
TITLES = {"by_gender": "gender", "by_age": "age", "by_accent": "accent", "by_speaker": "speaker"}
PLOTTED = ("by_gender", "by_age", "by_accent")
HEADERS = {"wer": "WER", "cer": "CER", "word_errors": "errors", "text": "reference", "pred_text": "hypothesis",
           "wer_95": "WER 95 % CI", "cer_95": "CER 95 % CI"}  # fmt: skip


def interval(ci: Sequence[float] | None) -> str:
    """``[0.1234, 0.2345]`` -> ``0.123–0.235``."""
    return f"{ci[0]:.3f}–{ci[1]:.3f}" if ci else ""


def ordered_groups(name: str, groups: dict) -> list[tuple[str, dict]]:
    """A breakdown's groups in reading order: ages by age, every other breakdown largest first."""
    items = list(groups.items())
    if name == "by_age":
        return sorted(items, key=lambda kv: age_key(kv[0]))
    return sorted(items, key=lambda kv: (-kv[1]["utterances"], kv[0]))


def _group_rows(name: str, metrics: dict, limit: int | None = None) -> list[dict]:
    title = TITLES[name]
    rows = []
    for group, m in ordered_groups(name, metrics.get(name) or {})[:limit]:
        label = group[:12] if name == "by_speaker" and group != "unknown" else group
        rows.append({title: label, **m, "wer_95": interval(m.get("wer_ci")), "cer_95": interval(m.get("cer_ci"))})
    return rows


def _heads_and_overlap(metrics: dict) -> list[str]:
    """A hybrid's two heads, and what the checkpoint's training data shares with the test set."""
    out = []
    heads = metrics.get("heads") or {}
    if len(heads) > 1:
        reported = metrics.get("decoder")
        rows = [{"head": f"{name.upper()}{' (reported)' if name == reported else ''}", **m,
                 "wer_95": interval(m.get("wer_ci")), "cer_95": interval(m.get("cer_ci"))}
                for name, m in heads.items()]  # fmt: skip
        out += ["## Heads", render.table(rows, ["head", "wer", "wer_95", "cer", "cer_95"], headers=HEADERS)]
    o = metrics.get("overlap")
    if o:
        without = "n/a" if o.get("wer_without") is None else f"{o['wer_without']:.4f} ({interval(o['wer_without_ci'])})"
        out += [
            "## Overlap with the checkpoint's training data",
            f"{render.md_code(o['with'])} ({o['training_clips']} clips) holds {o['clips']} test clip(s), "
            f"{o['speakers']} test speaker(s) ({o['utterances_of_seen_speakers']} utterances) and the sentences of "
            f"{o['sentences']} test utterance(s): {o['overlapping_utterances']} utterance(s) overlap. On the "
            f"{o['utterances_without']} that share nothing with it: WER {without}.",
        ]
    return out


def render_report(metrics: dict, rows: Sequence[dict], model: str, manifest: str, worst: int) -> str:
    """``report.md``: overall scores with intervals, a table per breakdown, confusions, the worst utterances."""
    overall = {**metrics, "wer_95": interval(metrics.get("wer_ci")), "cer_95": interval(metrics.get("cer_ci"))}
    sections = [
        "# Evaluation",
        f"Model {render.md_code(model)} on {render.md_code(manifest)}"
        + (
            f", transcribed at {metrics['rtfx']}x real time on {render.md(metrics['device'])}."
            if metrics.get("rtfx")
            else "."
        ),  # fmt: skip
        render.table([overall], ["utterances", "hours", "wer", "wer_95", "cer", "cer_95"], headers=HEADERS),
        f"Word errors: {metrics.get('substitutions', 0)} substitutions, {metrics.get('deletions', 0)} deletions, "
        f"{metrics.get('insertions', 0)} insertions over {metrics.get('words', 0)} reference words. Intervals: "
        "95 % percentile bootstrap over speakers (client_id; utterances within one speaker); a group of a few "
        "speakers has a wide one.",
    ]
    sections += _heads_and_overlap(metrics)
    for name, _key in GROUPS:
        title = TITLES[name]
        limit, what = TABLE_LIMITS.get(name, (None, ""))
        groups = _group_rows(name, metrics, limit)
        heading = f"## WER by {title}"
        if limit is not None and (name == "by_speaker" or len(metrics.get(name) or {}) > limit):
            heading += f" ({len(groups)} of {len(metrics.get(name) or {})} {what}, most utterances first)"
        sections += [heading, render.table(groups, [title, "utterances", "wer", "wer_95", "cer"], headers=HEADERS)]
    sections.append("![WER by group](wer_by_group.png)")
    confusions = metrics.get("confusions") or {}
    for kind, title in (("words", "Most frequent word substitutions"), ("characters", "Most frequent character edits")):
        pairs = confusions.get(kind) or []
        if pairs:
            shown = [{"reference": p["ref"], "hypothesis": p["hyp"], "count": p["count"]} for p in pairs]
            sections += [f"## {title}", render.table(shown)]
    wrong = [r for r in rows if r["text"] != r["pred_text"]]
    ranked = sorted(wrong, key=lambda r: (-r["word_errors"], -r["wer"], -r["cer"], r["audio_filepath"]))[:worst]
    sections.append(f"## Worst utterances ({len(ranked)} of {len(wrong)} with errors)")
    if ranked:
        worst_rows = [{**r, "clip": r.get("path") or storage.name(r["audio_filepath"])} for r in ranked]
        sections.append(render.table(worst_rows, ["wer", "word_errors", "text", "pred_text", "clip"], headers=HEADERS))
    else:
        sections.append("Every hypothesis equals its reference.")
    return "\n\n".join(sections) + "\n"


def render_plot(metrics: dict, model: str = "", test_set: str = "") -> bytes:
    """PNG: a horizontal bar chart of WER per breakdown (the largest groups) with 95 % intervals.

    Ages in age order; the overall WER is a dashed line named in each panel's title (no legend over the
    bars); value labels sit right of the interval bars, inside the axes; the model and the test set head
    the figure.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with matplotlib.rc_context(render.PLAIN_TEXT):  # a '$' in a group name is text, not mathematics
        breakdowns = [(name, ordered_groups(name, metrics.get(name) or {})[:PLOT_GROUPS_MAX]) for name in PLOTTED]
        breakdowns = [(name, groups) for name, groups in breakdowns if groups]
        heights = [max(1.4, 0.38 * len(groups) + 0.9) for _, groups in breakdowns]
        fig, axes = plt.subplots(len(breakdowns), 1, figsize=(9, sum(heights) + 0.9), squeeze=False,
                                 gridspec_kw={"height_ratios": heights})  # fmt: skip
        highest = max([1.0] + [m.get("wer_ci", [0, m["wer"]])[1] for _, groups in breakdowns for _, m in groups])
        for (ax,), (name, groups) in zip(axes, breakdowns):
            labels = [f"{g} (n={m['utterances']})" for g, m in groups]
            values = [m["wer"] for _, m in groups]
            lows = [max(0.0, m["wer"] - m.get("wer_ci", [m["wer"]] * 2)[0]) for _, m in groups]
            highs = [max(0.0, m.get("wer_ci", [m["wer"]] * 2)[1] - m["wer"]) for _, m in groups]
            ax.barh(labels, values, xerr=[lows, highs], color="#4c72b0", ecolor="#555555", capsize=3)
            for y, (value, high) in enumerate(zip(values, highs)):
                ax.text(value + high + 0.01 * highest, y, f"{value:.3f}", va="center", fontsize=8)
            ax.axvline(metrics["wer"], color="#c44e52", linestyle="--", linewidth=1)
            ax.invert_yaxis()
            ax.set_title(f"WER by {TITLES[name]}  (dashed: overall {metrics['wer']:.3f})", fontsize=10, loc="left")
            ax.set_xlim(0, highest * 1.18)  # room for the value labels
            ax.tick_params(axis="y", labelsize=8)
        axes[-1][0].set_xlabel("WER (bars: 95 % bootstrap interval)")
        heading = "WER by speaker group"
        if model or test_set:
            heading += f"\nmodel {_short(model)} · test set {_short(test_set)} ({metrics['utterances']} utterances)"
        fig.suptitle(heading, fontsize=10)
        fig.tight_layout()
        png = render.figure_png(fig, 100)
        plt.close(fig)
        return png


def _short(uri: str, keep: int = 3) -> str:
    """The last ``keep`` components of a path or URI: enough to tell runs apart in a title."""
    parts = str(uri).rstrip("/").split("/")
    return "/".join(parts[-keep:]) if len(parts) > keep else str(uri)


def format_metrics(metrics: dict, breakdowns: Sequence[str] = PLOTTED) -> str:
    """A terminal summary: overall WER/CER with intervals, then a table per breakdown (gender, age, accent)."""
    lines = [
        f"WER {metrics['wer']:.4f} ({interval(metrics.get('wer_ci'))})  CER {metrics['cer']:.4f} "
        f"({interval(metrics.get('cer_ci'))})  on {metrics['utterances']} utterances ({metrics['hours']:.3f} h)"
    ]
    for name in breakdowns:
        rows = [{**r, TITLES[name]: r[TITLES[name]][:32]} for r in _group_rows(name, metrics)]
        if rows:
            lines += ["", render.table(rows, [TITLES[name], "utterances", "wer", "wer_95", "cer"], "table",
                                       headers=HEADERS)]  # fmt: skip
    return "\n".join(lines)
