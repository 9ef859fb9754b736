"""The dataset report of a prepared release: ``report.json``, ``report.md`` and ``report.png``.

Per split: clips, hours, speakers, the distribution by gender and age (the statistics the original recipe's
README lists) and the main accents; rejections counted by reason; the accounting of input rows.
"""

from __future__ import annotations

import io
import math
from array import array
from collections import Counter

from habla.core import render, state, storage
from habla.core.layout import DatasetLayout
from habla.speech.dataset import age_key

UNKNOWN = "unknown"


class SplitStats:
    """Statistics of one split, accumulated one manifest entry at a time (millions of entries, little memory)."""

    def __init__(self) -> None:
        self.clips = 0
        self.seconds = 0.0
        self.durations = array("f")
        self.speakers: set[str] = set()
        self.groups = {key: Counter() for key in ("gender", "age", "accents")}

    def add(self, entry: dict) -> None:
        self.clips += 1
        self.seconds += entry["duration"]
        self.durations.append(entry["duration"])
        self.speakers.add(entry["client_id"])
        for key, counter in self.groups.items():
            counter[entry.get(key) or UNKNOWN] += 1

    def summary(self, rejected: Counter) -> dict:
        return {
            "clips": self.clips,
            "hours": round(self.seconds / 3600, 4),
            "speakers": len(self.speakers),
            "mean_seconds": round(self.seconds / self.clips, 3) if self.clips else 0.0,
            "min_seconds": round(min(self.durations, default=0.0), 3),
            "max_seconds": round(max(self.durations, default=0.0), 3),
            "gender": _ordered(self.groups["gender"]),
            "age": _ordered(self.groups["age"]),
            "accents": _ordered(self.groups["accents"], top=8),
            "rejected": dict(sorted(rejected.items())),
        }


class RejectionStats:
    """Rejections counted by split and reason."""

    def __init__(self) -> None:
        self.total = 0
        self.by_split: dict[str, Counter] = {}

    def add(self, record: dict) -> None:
        self.total += 1
        self.by_split.setdefault(record["split"], Counter())[record["reason"]] += 1


def _ordered(counts: Counter, top: int | None = None) -> dict[str, int]:
    items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    if top is not None and len(items) > top:
        items = items[:top] + [("(other)", sum(v for _, v in items[top:]))]
    return dict(items)


def build_report(summary: dict, stats: dict[str, SplitStats], rejected: RejectionStats, tarred: dict, out: str) -> dict:
    splits = {split: s.summary(rejected.by_split.get(split, Counter())) for split, s in stats.items()}
    total_rejected = Counter()
    for counter in rejected.by_split.values():
        total_rejected.update(counter)
    return {
        "release": summary["release_label"],
        "release_uri": summary["release"],
        "options": summary["options"],
        "rows_read": summary["rows_read"],
        "accounting": {
            "rows_read": sum(summary["rows_read"].values()),
            "in_manifests": sum(s["clips"] for s in splits.values()),
            "rejected": rejected.total,
        },
        "splits": splits,
        "rejected": dict(sorted(total_rejected.items())),
        "manifests": {s: storage.absolute(DatasetLayout(out).manifest(s)) for s in stats},
        "tarred": tarred,
    }


def _percent_table(report: dict, key: str) -> str:
    """Shares of the clips of each split by group (rows: groups, columns: splits)."""
    splits = report["splits"]
    groups = list(dict.fromkeys(g for v in splits.values() for g in v[key]))
    totals = {s: sum(v[key].values()) or 1 for s, v in splits.items()}
    rows = [{key: g, **{s: 100 * splits[s][key].get(g, 0) / totals[s] for s in splits}} for g in groups]
    return render.table(rows, [key, *splits], floatfmt=".1f") + "\n\n(% of the clips of each split)"


def markdown(report: dict) -> str:
    splits = report["splits"]
    overview = [
        {
            "split": s,
            "clips": v["clips"],
            "hours": round(v["hours"], 2),
            "speakers": v["speakers"],
            "mean s": v["mean_seconds"],
            "max s": round(v["max_seconds"], 2),
        }
        for s, v in splits.items()
    ]
    reasons = sorted({r for v in splits.values() for r in v["rejected"]})
    rejected = [{"reason": r, **{s: v["rejected"].get(r, 0) for s, v in splits.items()}} for r in reasons]
    acc = report["accounting"]
    per_tsv = render.md(", ".join(f"{k}: {v}" for k, v in report["rows_read"].items()))
    lines = [
        f"# Dataset report: {render.md(report['release'])}",
        "",
        f"Source: {render.md_code(report['release_uri'])}  ",
        f"Options: {render.md(', '.join(f'{k}={v}' for k, v in report['options'].items()))}",
        "",
        "## Splits",
        "",
        render.table(overview, floatfmt=".2f"),
        "",
        "## Gender",
        "",
        _percent_table(report, "gender"),
        "",
        "## Age",
        "",
        _percent_table(report, "age"),
        "",
        "## Accents (most frequent)",
        "",
        _percent_table(report, "accents"),
        "",
        "## Rejected rows by reason",
        "",
        render.table(rejected, ["reason", *splits]) if rejected else "None.",
        "",
        "Every row is listed with its reason in `rejected.jsonl`.",
        "",
        "## Accounting",
        "",
        f"{acc['rows_read']} rows read ({per_tsv}) = {acc['in_manifests']} in manifests + {acc['rejected']} rejected.",
        "",
        "![dataset](report.png)",
        "",
    ]
    return "\n".join(lines)


_COLORS = ((76, 114, 176), (221, 132, 82), (85, 168, 104), (196, 78, 82))
_INK, _GRID = (40, 40, 40), (225, 225, 225)


def _label(text: str, limit: int) -> str:
    """Metadata from the TSVs, made drawable: one line of printable characters, at most ``limit`` long."""
    text = "".join(c if c.isprintable() else " " for c in str(text)).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _nice_step(top: float, ticks: int = 5) -> float:
    """A round tick step (1, 2 or 5 x 10^k) that splits ``[0, top]`` into at most about ``ticks`` parts."""
    raw = max(top, 1e-9) / ticks
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def _panel(draw, font, box: tuple[int, int, int, int], title: str, labels: list[str], series: dict[str, list[float]],
           gap: float = 0.2, value_format: str | None = None) -> None:  # fmt: skip
    """A bar chart in ``box`` (left, top, right, bottom): one group of bars per label, one bar per series,
    each bar labelled with its value (``value_format``); the legend sits right of the axes, hiding no bar."""
    left, top, right, bottom = box
    draw.text(((left + right) / 2, top), title, fill=_INK, font=font, anchor="mt")
    legend = 78 if len(series) > 1 else 0
    x0, x1, y0, y1 = left + 48, right - 8 - legend, top + 22, bottom - 34
    highest = max((v for values in series.values() for v in values), default=0.0) or 1.0
    step = _nice_step(highest * 1.12)  # room above the tallest bar for its label
    ceiling = step * math.ceil(highest * 1.12 / step)
    for k in range(int(round(ceiling / step)) + 1):
        y = y1 - (y1 - y0) * k * step / ceiling
        draw.line([(x0, y), (x1, y)], fill=_GRID)
        draw.text((x0 - 4, y), f"{k * step:g}", fill=_INK, font=font, anchor="rm")
    slot = (x1 - x0) / max(len(labels), 1)
    width = slot * (1 - gap) / max(len(series), 1)
    for j, label in enumerate(labels):
        for i, values in enumerate(series.values()):
            bar_left = x0 + j * slot + slot * gap / 2 + i * width
            height = (y1 - y0) * values[j] / ceiling
            draw.rectangle([bar_left, y1 - height, bar_left + max(width - 1, 1), y1], fill=_COLORS[i % len(_COLORS)])
            if value_format:
                draw.text((bar_left + width / 2, y1 - height - 2), value_format.format(values[j]), fill=_INK,
                          font=font, anchor="mb")  # fmt: skip
        if len(labels) <= 12 or j % (len(labels) // 12 + 1) == 0:
            draw.text((x0 + (j + 0.5) * slot, y1 + 4), _label(label, 14), fill=_INK, font=font, anchor="mt")
    draw.line([(x0, y0), (x0, y1), (x1, y1)], fill=_INK)
    for i, name in enumerate(series if legend else ()):
        y = y0 + 4 + 15 * i
        draw.rectangle([x1 + 10, y, x1 + 20, y + 10], fill=_COLORS[i % len(_COLORS)])
        draw.text((x1 + 24, y + 5), _label(name, 8), fill=_INK, font=font, anchor="lm")


def plot(report: dict, stats: dict[str, SplitStats]) -> bytes:
    """A PNG: hours per split, gender and age shares (ages in age order), clip duration histogram.

    Drawn with Pillow (matplotlib's dependency) rather than matplotlib: importing matplotlib and drawing
    this figure cost about 0.5 CPU-seconds, a fifth of a whole ``habla prepare`` run on a thousand clips
    (bench/RESULTS.md); these four bar charts need none of what that import brings.
    """
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    splits = list(report["splits"])
    image = Image.new("RGB", (990, 630), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=12)
    title = f"{_label(report['release'], 90)}: {report['accounting']['in_manifests']} clips"
    draw.text((495, 8), title, fill=_INK, font=ImageFont.load_default(size=15), anchor="mt")
    boxes = [(10, 35, 495, 330), (505, 35, 985, 330), (10, 335, 495, 625), (505, 335, 985, 625)]
    hours = {"hours": [report["splits"][s]["hours"] for s in splits]}
    _panel(draw, font, boxes[0], "Hours per split", splits, hours, value_format="{:.2f} h")
    for box, key in ((boxes[1], "gender"), (boxes[2], "age")):
        groups = sorted({g for s in splits for g in report["splits"][s][key]}, key=age_key if key == "age" else None)
        shares = {
            s: [
                100 * report["splits"][s][key].get(g, 0) / max(sum(report["splits"][s][key].values()), 1)
                for g in groups
            ]
            for s in splits
        }
        _panel(draw, font, box, f"{key.capitalize()} (% of clips)", groups, shares, value_format="{:.0f}")
    everything = np.concatenate([np.frombuffer(stats[s].durations, dtype=np.float32) for s in splits] or [[]])
    edges = np.histogram_bin_edges(everything, bins=20) if everything.size else np.arange(21, dtype=float)
    counts = {
        s: np.histogram(np.frombuffer(stats[s].durations, dtype=np.float32), bins=edges)[0].tolist() for s in splits
    }
    labels = [f"{edges[i]:.1f}" for i in range(len(edges) - 1)]
    _panel(draw, font, boxes[3], "Clip duration (seconds, clips per bin)", labels, counts, gap=0.05)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # flat colours compress well even so
    return buffer.getvalue()


def write_report(out: str, summary: dict, stats: dict[str, SplitStats], rejected: RejectionStats, tarred: dict) -> dict:
    layout = DatasetLayout(out)
    report = build_report(summary, stats, rejected, tarred, out)
    storage.write_bytes(layout.report_png, plot(report, stats))
    storage.write_text(layout.report_md, markdown(report))
    state.write(layout.report_json, report)
    return report


def split_numbers(report: dict) -> dict[str, float]:
    """Hours and clips per split (``train_hours``, ``train_clips`` ...): what the KFP UI shows of a dataset."""
    out: dict[str, float] = {}
    for split, stats in report["splits"].items():
        out.update({f"{split}_hours": stats["hours"], f"{split}_clips": stats["clips"]})
    return out


def for_ui(dataset_uri: str) -> tuple[str, bytes]:
    """``report.md`` with its plot inlined (the KFP UI cannot follow a relative link), and the plot (PNG)."""
    layout = DatasetLayout(dataset_uri)
    png = storage.read_bytes(layout.report_png)
    markdown = storage.read_text(layout.report_md)
    return render.markdown_for_ui(markdown, storage.name(layout.report_png), png, where=layout.report_md), png


def summary_table(report: dict) -> str:
    """A short terminal summary: one line per split and the rejection counts."""
    lines = [f"{report['release']}:"]
    for split, v in report["splits"].items():
        lines.append(f"  {split:<6} {v['clips']:>8} clips {v['hours']:>9.2f} h {v['speakers']:>7} speakers")
    acc = report["accounting"]
    lines.append(
        f"  rows read {acc['rows_read']} = {acc['in_manifests']} in manifests + {acc['rejected']} rejected"
        + (f" ({', '.join(f'{k}: {v}' for k, v in report['rejected'].items())})" if report["rejected"] else "")
    )
    return "\n".join(lines)
