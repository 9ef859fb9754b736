"""habla compare: run folders (docs/layout.md) and KFP runs in one table, sorted by WER; formats and plot."""

import csv
import io
import json
import re
import shutil
from pathlib import Path

import pytest
from standins.kfp_server import KfpStandin, compile_fake_training_pipeline

from habla import cli
from habla.core.errors import HablaError
from habla.kubeflow import kfp_api
from habla.ops import compare


def _run_folder(
    root: Path, name: str, *, release: str, config: str, nodes: int, wer: float | None, steps: int = 400
) -> Path:
    """A run output as `habla pipeline run-local` writes it (the fields compare reads, per docs/layout.md)."""
    dst = root / name
    (dst / "model").mkdir(parents=True)
    (dst / "run.json").write_text(
        json.dumps(
            {
                "run_name": name,
                "release": release,
                "config": config,
                "nodes": nodes,
                "gpus_per_node": 0,
                "max_steps": steps,
                "train_source": "train",
            }
        )
    )
    (dst / "model" / "train_summary.json").write_text(
        json.dumps(
            {
                "world_size": nodes,
                "nodes": nodes,
                "devices": 1,
                "steps": steps,
                "epochs": 3,
                "wall_seconds": 5400,
                "audio_hours_seen": 1.25,
                "final_train_loss": 0.7,
                "val_wer": wer,
                "config": config,
                "init_from": None,
            }
        )
    )
    if wer is not None:
        (dst / "eval").mkdir()
        (dst / "eval" / "metrics.json").write_text(
            json.dumps(
                {
                    "wer": wer,
                    "cer": wer / 3,
                    "utterances": 30,
                    "hours": 0.04,
                    "by_gender": {
                        "female_feminine": {"wer": wer + 0.02, "cer": 0.1, "utterances": 12},
                        "male_masculine": {"wer": wer - 0.01, "cer": 0.1, "utterances": 18},
                    },
                    "by_age": {"twenties": {"wer": wer, "cer": 0.1, "utterances": 30}},
                    "by_accent": {"unknown": {"wer": wer, "cer": 0.1, "utterances": 30}},
                }
            )
        )
    return dst


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    return [
        _run_folder(
            tmp_path, "small-v17", release="/data/cv-corpus-17.0-2024-03-15/es", config="small", nodes=1, wer=0.31
        ),
        _run_folder(
            tmp_path,
            "large-v25",
            release="s3://cv/inbox/cv-corpus-25.0-2026-03-09-es.tar.gz",
            config="large",
            nodes=2,
            wer=0.12,
        ),
        _run_folder(
            tmp_path, "crashed", release="/data/cv-corpus-25.0-2026-03-09/es", config="large", nodes=2, wer=None
        ),
    ]


def test_table_of_local_runs_sorted_by_wer(runs, capsys):
    assert cli.main(["compare", *map(str, runs)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split()
    assert header[:11] == compare.COLUMNS[:11] and "promoted" not in header  # no run was promoted: no column
    assert "wer[gender=female_feminine]" in header and not any(h.startswith("wer[age=") for h in header)
    assert [line.split()[0] for line in lines[1:]] == ["large-v25", "small-v17", "crashed"]
    best = lines[1].split()
    assert best[1:6] == ["evaluated", "cv-corpus-25.0-2026-03-09-es", "large", "train", "2"]
    assert "0.1200" in best and "1.5000" in best  # WER and wall hours, 4 decimals
    assert lines[3].split()[1] == "trained"
    assert lines[2].split()[2] == "cv-corpus-17.0-2024-03-15-es"  # an extracted release: <top>/<locale>


def test_markdown_csv_json_and_plot(runs, tmp_path, capsys):
    dsts = list(map(str, runs))
    assert cli.main(["compare", *dsts, "--format", "markdown", "--groups", "gender,age"]) == 0
    markdown = capsys.readouterr().out.splitlines()
    header = [cell.strip() for cell in markdown[0].strip("|").split("|")]
    assert header[:3] == ["run", "state", "release"] and re.fullmatch(r"(\|:?-+:?)+\|", markdown[1])
    assert "wer[age=twenties]" in markdown[0] and len(markdown) == 5

    assert cli.main(["compare", *dsts, "--format", "csv", "--groups", "none"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["run"] for r in rows] == ["large-v25", "small-v17", "crashed"]
    assert rows[0]["wer"] == "0.12" and rows[0]["source"] == dsts[1] and rows[2]["wer"] == ""

    png = tmp_path / "wer.png"
    assert cli.main(["compare", *dsts, "--format", "json", "--plot", str(png)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data[0]["run"] == "large-v25" and data[0]["train_audio_h"] == 1.25 and data[0]["wall_h"] == 1.5
    assert data[0]["wer[gender=male_masculine]"] == pytest.approx(0.11)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_runs_of_a_kfp_experiment(runs, tmp_path, capsys):
    """Each KFP run's folder is read where the pipeline writes it: OUT/runs/<run_name parameter>, or
    OUT/runs/<the KFP run's id> when the run_name parameter is empty."""
    out = tmp_path / "out"
    package = compile_fake_training_pipeline(str(tmp_path))
    with KfpStandin() as kfp:
        client = kfp_api.connect(kfp.url)
        for run, name, params in (
            (runs[0], "kfp-small-v17", {"config": "small", "run_name": "small-v17"}),
            (runs[1], "kfp-large-v25", {"config": "large"}),
        ):
            params = {"release_uri": "s3://cv/x", "output_uri": str(out), **params}
            ref = kfp_api.submit_run(kfp.url, package, params, "cv-es", name, client=client)
            # where the pipeline would have written it: runs/small-v17, and runs/<run id> for the unnamed run
            shutil.copytree(run, out / "runs" / (params.get("run_name") or ref.run_id))
        kfp_api.submit_run(
            kfp.url,
            package,
            {
                "release_uri": "s3://cv/cv-corpus-9.0-2022-04-27-es.tar.gz",
                "output_uri": str(tmp_path / "never-written"),
            },
            "cv-es",
            "kfp-pending",
            client=client,
        )
        assert cli.main(["compare", "--host", kfp.url, "--experiment", "cv-es", "--format", "json"]) == 0
        data = json.loads(capsys.readouterr().out)
        assert cli.main(["compare", "--host", kfp.url, "--experiment", "nope"]) == 2
        assert "no experiment named 'nope'" in capsys.readouterr().err
    assert [d["run"] for d in data] == ["kfp-large-v25", "kfp-small-v17", "kfp-pending"]
    assert [d["wer"] for d in data] == [0.12, 0.31, None]
    assert data[0]["state"] == "PENDING" and data[0]["source"].startswith(kfp.url)
    # run.json wins over the run's parameters; without a run folder the parameters fill the row.
    assert data[0]["release"] == "cv-corpus-25.0-2026-03-09-es"
    assert data[2]["release"] == "cv-corpus-9.0-2022-04-27-es" and data[2]["steps"] == 1000


def test_bad_input_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["compare", str(tmp_path / "empty")]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith("not a habla run output (no run.json, model/train_summary.json or eval/metrics.json)")
    )
    assert cli.main(["compare"]) == 2
    assert cli.main(["compare", "--host", "http://127.0.0.1:9", "--experiment", "x"]) == 1  # a fault
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "cannot reach Kubeflow Pipelines" in err[1]
    with pytest.raises(HablaError, match="--groups"):
        compare.parse_groups("gender,shoe_size")


def test_a_pipeline_output_folder_and_a_column_per_setting_that_differs(tmp_path, capsys):
    """`habla compare OUT` (what run-local --out writes) lists every run under OUT/runs/, and each setting that
    differs between them (a config override, a pipeline parameter) gets its own column."""
    out = tmp_path / "out"
    for name, overrides, margin in (("base", "", 0.0), ("fast-lr", "model.optim.lr=0.05 trainer.max_steps=60", 0.0),
                                    ("strict", "trainer.max_steps=60", 0.01)):  # fmt: skip
        dst = _run_folder(out / "runs", name, release="/d/cv-corpus-25.0-2026-03-09/es", config="tiny", nodes=1,
                          wer={"base": 0.5, "fast-lr": 0.4, "strict": 0.45}[name])  # fmt: skip
        record = json.loads((dst / "run.json").read_text())
        record.update(config_overrides=overrides, promotion_margin=margin, launcher="local")
        (dst / "run.json").write_text(json.dumps(record))
        metrics = json.loads((dst / "eval" / "metrics.json").read_text())
        metrics.update(wer_ci=[metrics["wer"] - 0.05, metrics["wer"] + 0.05], cer_ci=[0.1, 0.2])
        (dst / "eval" / "metrics.json").write_text(json.dumps(metrics))
        record.update(state={"strict": "failed"}.get(name, "succeeded"), resumed=[{"run_id": "x"}], finished="t",
                      promotion={"promote": name != "strict"})  # fmt: skip
        (dst / "run.json").write_text(json.dumps(record))
    (out / "models").mkdir()
    (out / "models" / "best.json").write_text(json.dumps({"run": "fast-lr", "model": "m"}))
    (out / "datasets" / "x").mkdir(parents=True)
    assert cli.main(["compare", str(out), "--format", "json", "--plot", str(tmp_path / "c.png")]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["run"] for r in rows] == ["fast-lr", "strict", "base"]
    # intervals, the current best model, the recorded state; bookkeeping (finished, resumed) is no column
    assert [(r["wer_95"], r["promoted"], r["state"]) for r in rows] == [
        ("0.350–0.450", "best", "succeeded"), ("0.400–0.500", "no", "failed"), ("0.450–0.550", "yes", "succeeded")
    ]  # fmt: skip
    assert "finished" not in rows[0] and "resumed" not in rows[0]
    assert [(r["model.optim.lr"], r["trainer.max_steps"], r["promotion_margin"]) for r in rows] == [
        ("0.05", "60", "0.0"),
        (None, "60", "0.01"),
        (None, None, "0.0"),
    ]
    assert "launcher" not in rows[0]  # the same in every run: no column
    assert cli.main(["compare", str(out)]) == 0
    header = capsys.readouterr().out.splitlines()[0].split()
    assert header[:8] == ["run", "state", "release", "config", "train_source", "model.optim.lr", "promotion_margin",
                          "trainer.max_steps"]  # fmt: skip
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_wers_of_different_test_sets_are_not_ranked_together(tmp_path, capsys):
    """compare ranked WERs measured on different test sets side by side without a word."""
    folders = []
    for name, wer, dataset in (("a", 0.30, "cv-17-aaa"), ("b", 0.20, "cv-25-bbb"), ("c", 0.25, "cv-17-aaa")):
        folder = _run_folder(tmp_path, name, release="/d/cv-corpus-25.0-2026-03-09/es", config="c", nodes=1, wer=wer)
        metrics = json.loads((folder / "eval" / "metrics.json").read_text())
        metrics["manifest"] = f"s3://b/o/datasets/{dataset}/manifests/test.json"
        (folder / "eval" / "metrics.json").write_text(json.dumps(metrics))
        folders.append(folder)
    assert cli.main(["compare", *map(str, folders)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert "test_set" in lines[0].split()
    assert [(line.split()[0], line.split()[lines[0].split().index("test_set")]) for line in lines[1:]] == [
        ("c", "cv-17-aaa"), ("a", "cv-17-aaa"), ("b", "cv-25-bbb")]  # fmt: skip
    assert "scored on 2 different test sets (cv-17-aaa, cv-25-bbb)" in captured.err
    assert cli.main(["compare", str(folders[0]), str(folders[2])]) == 0  # one test set: no column, no note
    captured = capsys.readouterr()
    assert "test_set" not in captured.out and not captured.err


def test_group_names_from_the_data_are_text_in_tables_and_plots(runs, tmp_path, capsys):
    """A '$' in an accent crashed --plot (matplotlib read it as mathematics); markup reached the Markdown."""
    metrics_file = runs[0] / "eval" / "metrics.json"
    metrics = json.loads(metrics_file.read_text())
    metrics["by_gender"] = {"$x^2$ <script>alert(1)</script>": {"wer": 0.3, "cer": 0.1, "utterances": 30}}
    metrics_file.write_text(json.dumps(metrics))
    assert cli.main(["compare", *map(str, runs), "--format", "markdown", "--plot", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out
    assert "<script>" not in out and "&lt;script&gt;" in out
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_learning_curves_from_tensorboard_events(tmp_path, capsys):
    """`habla compare --curves`: each run's training loss and validation WER by step, read from the TensorBoard
    events training wrote (<run>/model/logs/, as Lightning's TensorBoardLogger writes them)."""
    from torch.utils.tensorboard import SummaryWriter

    out = tmp_path / "out"
    for name, scale in (("a", 1.0), ("b", 2.0)):
        dst = _run_folder(out / "runs", name, release="/d/cv-corpus-25.0-2026-03-09/es", config="tiny", nodes=1,
                          wer=0.4 * scale)  # fmt: skip
        writer = SummaryWriter(str(dst / "model" / "logs" / "version_0"))
        for step in range(0, 100, 10):
            writer.add_scalar("train_loss", scale * 100 / (step + 1), step)
        writer.add_scalar("val_wer", 0.5 * scale, 50)
        writer.add_scalar("val_wer", 0.4 * scale, 99)
        writer.close()
    curves = compare.learning_curves(str(out / "runs" / "b"))
    assert curves["train_loss"][0] == (0, 200.0) and len(curves["train_loss"]) == 10
    assert [round(v, 3) for _, v in curves["val_wer"]] == [1.0, 0.8]
    assert cli.main(["compare", str(out), "--curves", str(tmp_path / "curves.png")]) == 0
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert cli.main(["compare", str(tmp_path / "out" / "runs" / "a"), "--curves", str(tmp_path / "x.png")]) == 0
    empty = tmp_path / "empty"
    _run_folder(empty, "c", release="/d/cv-corpus-25.0-2026-03-09/es", config="tiny", nodes=1, wer=0.3)
    assert cli.main(["compare", str(empty / "c"), "--curves", str(tmp_path / "y.png")]) == 2
    assert "no run has TensorBoard events" in capsys.readouterr().err
