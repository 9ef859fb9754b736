"""Compare runs: one table of runs — parameters and metrics — sorted by WER.

Runs come from run output folders (``habla compare DST …``, local or ``s3://``; a pipeline's ``OUT``, such as
``habla pipeline run-local --out OUT``, stands for every run under ``OUT/runs/``) and/or from a KFP
experiment (``--host URL --experiment NAME``). Settings that differ between the runs compared get a column
each (:func:`difference_columns`): a config override (``model.optim.lr``) or a pipeline parameter
(``promotion_margin``) that is not already a column. What is read from a run folder (docs/layout.md):

* ``run.json``: ``run_name``, ``release``, ``config``, ``nodes``, ``gpus_per_node``, ``max_steps``,
  ``train_source``, ``config_overrides`` and the other pipeline parameters (for the difference columns);
* ``model/train_summary.json``: ``steps``, ``audio_hours_seen``, ``wall_seconds``, ``nodes``;
* ``eval/metrics.json``: ``wer``, ``cer``, ``utterances``, and ``by_gender`` / ``by_age`` / ``by_accent``.

KFP runs: the v2beta1 run object holds the runtime parameters but not the metrics (those live in ML
Metadata, which the REST API does not serve), so each run's folder is read under its ``output_uri``
parameter; parameters missing from ``run.json`` are taken from the run's parameters.
"""

from __future__ import annotations

import io
import json
import logging
from typing import Any

from habla.core import layout, storage
from habla.core.errors import HablaError, one_line
from habla.core.layout import OutputLayout, RunLayout
from habla.data.commonvoice import release_label

log = logging.getLogger(__name__)

COLUMNS = [
    "run",
    "state",
    "release",
    "config",
    "train_source",
    "nodes",
    "gpus",
    "steps",
    "train_audio_h",
    "wall_h",
    "wer",
    "cer",
    "utterances",
]
GROUPS = ("gender", "age", "accent")
# run.json keys that are not settings (or are columns already): never a difference column.
NOT_SETTINGS = {"run_name", "run_dir", "started", "release", "release_uri", "config", "nodes", "gpus_per_node",
                "max_steps", "train_source", "config_overrides", "promotion"}  # fmt: skip


def _read_json(uri: str) -> dict | None:
    try:
        value = json.loads(storage.read_text(uri))
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise HablaError(f"{uri}: not valid JSON ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - S3 permission, endpoint down: any of botocore's errors
        raise HablaError(f"cannot read {uri}: {one_line(exc, with_type=True)}") from None
    return value if isinstance(value, dict) else None


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None and v != ""), None)


def make_row(
    dst: str,
    *,
    name: str | None = None,
    state: str | None = None,
    params: dict | None = None,
    source: str | None = None,
    strict: bool = True,
) -> dict[str, Any]:
    """One table row from a run folder (and, for KFP runs, the run's name, state and parameters)."""
    folder = RunLayout(dst)
    run = _read_json(folder.record) if dst else None
    summary = _read_json(folder.train.summary) if dst else None
    metrics = _read_json(folder.eval.metrics) if dst else None
    if strict and run is None and summary is None and metrics is None:
        raise HablaError(f"{dst}: not a habla run output (no run.json, model/train_summary.json or eval/metrics.json)")
    run, summary, metrics, params = run or {}, summary or {}, metrics or {}, params or {}
    release = _first(run.get("release"), params.get("release_uri"), params.get("release"))
    wall = summary.get("wall_seconds")
    row: dict[str, Any] = {
        "run": _first(name, run.get("run_name"), storage.name(dst) if dst else None),
        "state": _first(state, "evaluated" if metrics else ("trained" if summary else "started")),
        "release": release_label(release) if release else None,
        "config": _first(run.get("config"), params.get("config"), summary.get("config")),
        "train_source": _first(run.get("train_source"), params.get("train_source")),
        "nodes": _first(run.get("nodes"), params.get("nodes"), summary.get("nodes")),
        "gpus": _first(run.get("gpus_per_node"), params.get("gpus_per_node")),
        "steps": _first(summary.get("steps"), run.get("max_steps"), params.get("max_steps")),
        "train_audio_h": summary.get("audio_hours_seen"),
        "wall_h": wall / 3600 if isinstance(wall, (int, float)) else None,
        "wer": metrics.get("wer"),
        "cer": metrics.get("cer"),
        "utterances": metrics.get("utterances"),
    }
    for group in GROUPS:
        for value, scores in sorted((metrics.get(f"by_{group}") or {}).items()):
            if isinstance(scores, dict):
                row[f"wer[{group}={value}]"] = scores.get("wer")
    row["source"] = _first(source, dst)
    row["_settings"] = settings_of({**params, **run})
    return row


def settings_of(record: dict) -> dict[str, str]:
    """A run's settings as text: its pipeline parameters (not the fixed columns) and its config overrides."""
    from habla.core.settings import split_pair

    settings = {k: str(v) for k, v in record.items() if k not in NOT_SETTINGS and not isinstance(v, (dict, list))}
    for item in str(record.get("config_overrides") or "").split():
        if "=" in item:
            key, value = split_pair(item, "a config override")
            settings[key] = value
    return settings


def difference_columns(rows: list[dict]) -> list[str]:
    """Settings whose value is not the same in every run (missing counts as a value): one column each, set in
    the rows; an override a run does not have shows as an empty cell (the config's own value)."""
    keys = sorted({k for r in rows for k in r.get("_settings", {})})
    differing = [k for k in keys if len({r.get("_settings", {}).get(k) for r in rows}) > 1]
    for row in rows:
        for key in differing:
            row[key] = row.get("_settings", {}).get(key)
    return differing


def parse_groups(text: str) -> list[str]:
    """``--groups``: a comma-separated subset of GROUPS, or ``none``."""
    groups = [] if text.strip() == "none" else [g.strip() for g in text.split(",") if g.strip()]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise HablaError(f"--groups {', '.join(unknown)}: choose among {', '.join(GROUPS)} (or none)")
    return groups


def run_folders(dst: str) -> list[str]:
    """``dst`` itself when it is a run folder; every run under ``dst/runs/`` when it is a pipeline's ``OUT``."""
    if any(storage.exists(uri) for uri in (RunLayout(dst).record, RunLayout(dst).eval.metrics)):
        return [dst]
    runs = OutputLayout(dst).runs
    found = set()
    for info in storage.list_files(runs):
        parts = info.uri[len(runs) :].strip("/").split("/")
        if parts[1:] == ["run.json"]:
            found.add(parts[0])
    return [storage.join(runs, name) for name in sorted(found)] or [dst]


def rows_from_folders(dsts: list[str]) -> list[dict]:
    return [make_row(run) for dst in dsts for run in run_folders(dst)]


def rows_from_kfp(host: str | None, experiment: str, namespace: str | None = None) -> list[dict]:
    """Rows for the runs of a KFP experiment; metrics from each run's folder under its ``output_uri``, when
    readable (``runs/<run_name>/``, or ``runs/<the KFP run's id>/`` when no run_name was given)."""
    from habla.kubeflow import kfp_api

    client = kfp_api.connect(host, namespace=namespace)
    rows = []
    for run in kfp_api.list_runs(client, experiment):
        output_uri = run.params.get("output_uri") or ""
        name = layout.run_name(run.params.get("run_name") or "", run.run_id)
        dst = OutputLayout(output_uri).run(name).root if output_uri else ""
        try:
            row = make_row(dst, name=run.name, state=run.state, params=run.params, source=run.url, strict=False)
        except HablaError as exc:  # one unreadable folder must not hide the other runs
            log.warning("%s: %s", run.name, exc)
            row = make_row("", name=run.name, state=run.state, params=run.params, source=run.url, strict=False)
        rows.append(row)
    return rows


def sort_rows(rows: list[dict]) -> list[dict]:
    """By WER, best first; runs without a WER last (by name)."""
    return sorted(rows, key=lambda r: (r.get("wer") is None, r.get("wer") or 0.0, str(r.get("run"))))


def columns_for(rows: list[dict], groups: list[str], with_source: bool) -> list[str]:
    """The fixed columns, a column per setting that differs between the runs, and the per-group WER columns
    of the requested groups that some run has."""
    group_cols = sorted({k for r in rows for k in r if any(k.startswith(f"wer[{g}=") for g in groups)})
    return COLUMNS[:5] + difference_columns(rows) + COLUMNS[5:] + group_cols + (["source"] if with_source else [])


def plot(rows: list[dict], groups: list[str], path: str) -> None:
    """WER per run (one bar each, best first), and per group value for each requested group; every bar
    labelled with its value, legends beside the axes (never over the bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in rows if r.get("wer") is not None]
    if not scored:
        raise HablaError("--plot: no run has a WER yet")
    panels = [g for g in groups if any(k.startswith(f"wer[{g}=") for r in scored for k in r)]
    keys = {g: sorted({k for r in scored for k in r if k.startswith(f"wer[{g}=")}) for g in panels}
    heights = [0.45 * len(scored) + 1.0] + [0.3 * len(scored) * len(keys[g]) + 1.0 for g in panels]
    fig, axes = plt.subplots(len(heights), 1, figsize=(10, sum(heights) + 0.5), squeeze=False,
                             gridspec_kw={"height_ratios": heights})  # fmt: skip
    names = [str(r["run"]) for r in scored]
    highest = max([r["wer"] for r in scored] + [r.get(k) or 0.0 for g in panels for k in keys[g] for r in scored])
    ax = axes[0][0]
    bars = ax.barh(names, [r["wer"] for r in scored], color="tab:blue")
    ax.bar_label(bars, fmt="%.3f", padding=3, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, highest * 1.2 or 1.0)
    ax.set_xlabel("WER")
    ax.set_title("WER per run", loc="left")
    for panel, group in zip(axes[1:], panels):
        ax = panel[0]
        height = 0.8 / max(len(keys[group]), 1)
        for i, key in enumerate(keys[group]):
            values = [r.get(key) or 0.0 for r in scored]
            bars = ax.barh([j + i * height for j in range(len(scored))], values, height=height,
                           label=key[len(f"wer[{group}=") : -1])  # fmt: skip
            ax.bar_label(bars, fmt="%.3f", padding=2, fontsize=7)
        ax.set_yticks([j + 0.4 - height / 2 for j in range(len(scored))], names)
        ax.invert_yaxis()
        ax.set_xlim(0, highest * 1.2 or 1.0)
        ax.set_xlabel("WER")
        ax.set_title(f"WER per run and {group}", loc="left")
        ax.legend(fontsize="small", title=group, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    if storage.is_s3(path):
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=120)
        storage.write_bytes(path, buffer.getvalue())
    else:
        fig.savefig(path, dpi=120)
    plt.close(fig)
