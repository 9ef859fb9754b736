"""The dataset report of a prepared release: ``report.json``, ``report.md`` and ``report.png``.

Per split: clips, hours, speakers, the distribution by gender and age (the statistics the original recipe's
README lists) and the main accents; rejections counted by reason; the accounting of input rows.
"""

from __future__ import annotations

import io
import json
from array import array
from collections import Counter

from habla.core import jsonl, render, storage
from habla.core.layout import DatasetLayout

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
    lines = [
        f"# Dataset report: {report['release']}",
        "",
        f"Source: `{report['release_uri']}`  ",
        f"Options: {', '.join(f'{k}={v}' for k, v in report['options'].items())}",
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
        f"{acc['rows_read']} rows read ({', '.join(f'{k}: {v}' for k, v in report['rows_read'].items())}) = "
        f"{acc['in_manifests']} in manifests + {acc['rejected']} rejected.",
        "",
        "![dataset](report.png)",
        "",
    ]
    return "\n".join(lines)


def plot(report: dict, stats: dict[str, SplitStats]) -> bytes:
    """A PNG: hours per split, gender and age shares, clip duration histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = list(report["splits"])
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    ax = axes[0][0]
    ax.bar(splits, [report["splits"][s]["hours"] for s in splits], color="#4C72B0")
    ax.set_title("Hours per split")
    ax.set_ylabel("hours")
    for ax, key in ((axes[0][1], "gender"), (axes[1][0], "age")):
        groups = sorted({g for s in splits for g in report["splits"][s][key]})
        width = 0.8 / max(len(splits), 1)
        for i, s in enumerate(splits):
            counts = report["splits"][s][key]
            total = max(sum(counts.values()), 1)
            ax.bar(
                [j + i * width for j in range(len(groups))],
                [100 * counts.get(g, 0) / total for g in groups],
                width=width,
                label=s,
            )
        ax.set_xticks(
            [j + width * (len(splits) - 1) / 2 for j in range(len(groups))], groups, rotation=30, ha="right", fontsize=8
        )
        ax.set_title(f"{key.capitalize()} (% of clips)")
        ax.legend(fontsize=8)
    ax = axes[1][1]
    for s in splits:
        ax.hist(stats[s].durations, bins=30, alpha=0.6, label=s)
    ax.set_title("Clip duration")
    ax.set_xlabel("seconds")
    ax.legend(fontsize=8)
    fig.suptitle(f"{report['release']}: {report['accounting']['in_manifests']} clips")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def write_report(out: str, summary: dict, stats: dict[str, SplitStats], rejected: RejectionStats, tarred: dict) -> dict:
    layout = DatasetLayout(out)
    report = build_report(summary, stats, rejected, tarred, out)
    storage.write_bytes(layout.report_png, plot(report, stats))
    storage.write_text(layout.report_md, markdown(report))
    storage.write_text(layout.report_json, jsonl.dump(report))
    return report


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


def read_report(dataset_uri: str) -> dict:
    """``report.json`` of a prepared dataset (its manifests, tar shards, statistics)."""
    from habla.core.errors import HablaError

    try:
        return json.loads(storage.read_text(DatasetLayout(dataset_uri).report_json))
    except FileNotFoundError:
        raise HablaError(f"{dataset_uri}: not a prepared dataset (no report.json)") from None
