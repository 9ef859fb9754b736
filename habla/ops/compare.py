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

import logging
from typing import Any

from habla.core import layout, render, state, storage
from habla.core.errors import HablaError, one_line
from habla.core.layout import OutputLayout, RunLayout
from habla.runs.parameters import COMPARE_COLUMNS, NOT_COMPARED
from habla.speech.releases import release_label

log = logging.getLogger(__name__)

# The run, then the run parameters that have a column (habla.runs.parameters), then what the run measured.
COLUMNS = ["run", "state", "release", *(column for column, _ in COMPARE_COLUMNS), "train_audio_h", "wall_h", "wer",
           "wer_95", "cer", "cer_95", "utterances", "promoted"]  # fmt: skip
GROUPS = ("gender", "age", "accent")


def _read_json(uri: str) -> dict | None:
    try:
        return state.read(uri)
    except HablaError:
        raise
    except Exception as exc:  # noqa: BLE001 - S3 permission, endpoint down: any of botocore's errors
        raise HablaError(f"cannot read {uri}: {one_line(exc, with_type=True)}") from None


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
        "state": _first(state, run.get("state"), "evaluated" if metrics else ("trained" if summary else "started")),
        "release": release_label(release) if release else None,
        "config": _first(run.get("config"), params.get("config"), summary.get("config")),
        "train_source": _first(run.get("train_source"), params.get("train_source")),
        "nodes": _first(run.get("nodes"), params.get("nodes"), summary.get("nodes")),
        "gpus": _first(run.get("gpus_per_node"), params.get("gpus_per_node")),
        "steps": _first(summary.get("steps"), run.get("max_steps"), params.get("max_steps")),
        "train_audio_h": summary.get("audio_hours_seen"),
        "wall_h": wall / 3600 if isinstance(wall, (int, float)) else None,
        "wer": metrics.get("wer"),
        "wer_95": _interval(metrics.get("wer_ci")),
        "cer": metrics.get("cer"),
        "cer_95": _interval(metrics.get("cer_ci")),
        "wer_ci": metrics.get("wer_ci"),
        "cer_ci": metrics.get("cer_ci"),
        "utterances": metrics.get("utterances"),
        "promoted": _promoted(dst, run),
        "test_set": _test_set(metrics.get("manifest")),
    }
    for group in GROUPS:
        for value, scores in sorted((metrics.get(f"by_{group}") or {}).items()):
            if isinstance(scores, dict):
                row[f"wer[{group}={value}]"] = scores.get("wer")
    row["source"] = _first(source, dst)
    row["_settings"] = settings_of({**params, **run})
    return row


def _interval(ci: Any) -> str | None:
    """A 95 % interval as text, ``0.412–0.488``."""
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(v, (int, float)) for v in ci):
        return f"{ci[0]:.3f}–{ci[1]:.3f}"
    return None


def _promoted(dst: str, run: dict) -> str | None:
    """``best`` for the run whose model is its output folder's current best (models/best.json), ``yes`` for one
    promoted since replaced, ``no`` for one kept out, None before its evaluation decided."""
    promotion = run.get("promotion") or {}
    if dst and "/runs/" in dst.replace("\\", "/"):
        out = dst.replace("\\", "/").rsplit("/runs/", 1)[0]
        try:
            best = state.read(OutputLayout(out).best) or {}
        except Exception:  # noqa: BLE001 - a marker, never a reason to fail the comparison
            best = {}
        if best and best.get("run") in (run.get("run_name"), storage.name(dst)):
            return "best"
    if "promote" in promotion:
        return "yes" if promotion["promote"] else "no"
    return None


def _test_set(manifest: Any) -> str | None:
    """What a run was scored on, short: ``<dataset folder>/manifests/test.json`` -> the dataset folder's name."""
    if not manifest:
        return None
    parts = str(manifest).rstrip("/").split("/")
    return parts[-3] if len(parts) >= 3 and parts[-2] == "manifests" else str(manifest)


def test_sets(rows: list[dict]) -> list[str]:
    """The distinct test sets the scored runs were measured on: WERs of different test sets do not compare."""
    return sorted({r["test_set"] for r in rows if r.get("wer") is not None and r.get("test_set")})


def settings_of(record: dict) -> dict[str, str]:
    """A run's settings as text: its pipeline parameters (not the fixed columns) and its config overrides."""
    from habla.core.settings import split_pair

    settings = {k: str(v) for k, v in record.items() if k not in NOT_COMPARED and not isinstance(v, (dict, list))}
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


def rows_from_kfp(
    host: str | None, experiment: str, namespace: str | None = None, token_file: str | None = None
) -> list[dict]:
    """Rows for the runs of a KFP experiment; metrics from each run's folder under its ``output_uri``, when
    readable (``runs/<run_name>/``, or ``runs/<the KFP run's id>/`` when no run_name was given)."""
    from habla.kubeflow import kfp_api

    client = kfp_api.connect(host, namespace=namespace, token_file=token_file)
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
    """By test set, then by WER, best first (a WER is only ranked against WERs of the same test set); runs
    without a WER last (by name)."""
    return sorted(rows, key=lambda r: (r.get("wer") is None, str(r.get("test_set") or ""), r.get("wer") or 0.0,
                                       str(r.get("run"))))  # fmt: skip


def columns_for(rows: list[dict], groups: list[str], with_source: bool) -> list[str]:
    """The fixed columns, a column per setting that differs between the runs, and the per-group WER columns
    of the requested groups that some run has."""
    group_cols = sorted({k for r in rows for k in r if any(k.startswith(f"wer[{g}=") for g in groups)})
    test_set = ["test_set"] if len(test_sets(rows)) > 1 or with_source else []
    optional = ("wer_95", "cer_95", "promoted")  # shown when some run has them
    fixed = [c for c in COLUMNS[5:] if c not in optional or any(r.get(c) is not None for r in rows)]
    return (COLUMNS[:5] + difference_columns(rows) + fixed + test_set + group_cols
            + (["source"] if with_source else []))  # fmt: skip


def plot(rows: list[dict], groups: list[str], path: str) -> None:
    """WER per run (one bar each, best first), and per group value for each requested group; every bar
    labelled with its value, legends beside the axes (never over the bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with matplotlib.rc_context(render.PLAIN_TEXT):  # a '$' in a group name is text, not mathematics
        scored = [r for r in rows if r.get("wer") is not None]
        if not scored:
            raise HablaError("--plot: no run has a WER yet")
        panels = [g for g in groups if any(k.startswith(f"wer[{g}=") for r in scored for k in r)]
        keys = {g: sorted({k for r in scored for k in r if k.startswith(f"wer[{g}=")}) for g in panels}
        heights = [0.45 * len(scored) + 1.0] * 2 + [0.3 * len(scored) * len(keys[g]) + 1.0 for g in panels]
        fig, axes = plt.subplots(len(heights), 1, figsize=(10, sum(heights) + 0.5), squeeze=False,
                                 gridspec_kw={"height_ratios": heights})  # fmt: skip
        names = [str(r["run"]) for r in scored]
        highest = max([r["wer"] for r in scored] + [r.get(k) or 0.0 for g in panels for k in keys[g] for r in scored])
        names = [f"{n} ★" if r.get("promoted") == "best" else n for n, r in zip(names, scored)]
        for ax, metric, color in ((axes[0][0], "wer", "tab:blue"), (axes[1][0], "cer", "tab:orange")):
            values = [r.get(metric) or 0.0 for r in scored]
            cis = [r.get(f"{metric}_ci") or [v, v] for r, v in zip(scored, values)]
            errors = [
                [max(0.0, v - ci[0]) for v, ci in zip(values, cis)],
                [max(0.0, ci[1] - v) for v, ci in zip(values, cis)],
            ]
            top = max([ci[1] for ci in cis] + [highest])
            bars = ax.barh(names, values, color=color, xerr=errors, ecolor="#555555", capsize=3)
            ax.bar_label(bars, fmt="%.3f", padding=12, fontsize=8)
            ax.invert_yaxis()
            ax.set_xlim(0, top * 1.25 or 1.0)
            ax.set_xlabel(f"{metric.upper()} (bars: 95 % bootstrap interval; ★ the current best model)")
            ax.set_title(f"{metric.upper()} per run", loc="left")
        for panel, group in zip(axes[2:], panels):
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
        storage.write_bytes(path, render.figure_png(fig, 120))
        plt.close(fig)


#: The TensorBoard scalars drawn as learning curves (what NeMo's CTC models log through Lightning).
CURVES = (("train_loss", "training loss"), ("val_wer", "validation WER"))


def learning_curves(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """A run's learning curves from its TensorBoard events (``<run>/model/logs/``, local runs): ``{tag: [(step,
    value), …]}`` for the tags of :data:`CURVES` it has, each by step (a resumed run's later events win)."""
    from pathlib import Path

    logs = Path(RunLayout(run_dir).train.logs)
    if storage.is_s3(run_dir) or not logs.is_dir():
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves: dict[str, dict[int, float]] = {}
    for events in sorted(logs.rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag, _ in CURVES:
            if tag in accumulator.Tags().get("scalars", []):
                curves.setdefault(tag, {}).update({e.step: e.value for e in accumulator.Scalars(tag)})
    return {tag: sorted(points.items()) for tag, points in curves.items()}


def plot_curves(rows: list[dict], path: str) -> int:
    """Draw each run's learning curves (training loss, validation WER by step) into ``path``; returns how many
    runs had any. HablaError when none has TensorBoard events."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = [(str(r["run"]), learning_curves(r["source"])) for r in rows if r.get("source")]
    found = [(name, curves) for name, curves in found if curves]
    if not found:
        raise HablaError("--curves: no run has TensorBoard events (<run>/model/logs/) to draw")
    with matplotlib.rc_context(render.PLAIN_TEXT):
        fig, axes = plt.subplots(1, len(CURVES), figsize=(12, 4.5), squeeze=False)
        for ax, (tag, title) in zip(axes[0], CURVES):
            for name, curves in found:
                if tag in curves:
                    steps, values = zip(*curves[tag])
                    ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3, label=name)
            ax.set_title(title, loc="left")
            ax.set_xlabel("optimizer step")
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        storage.write_bytes(path, render.figure_png(fig, 110))
        plt.close(fig)
    return len(found)
