"""The whole pipeline with every step in its own image: ``kfp.local.DockerRunner`` against podman's
Docker-compatible API, on the bundled release inside the images, training tiny_ctc_char for a few steps.
Then what the KFP UI shows: its reports carry their plots as data URIs (it cannot follow relative links)."""

from __future__ import annotations

import base64
import builtins
import json
import re
from collections import Counter
from pathlib import Path

import pytest
from fixtures.containers import CONTAINER_UID, kfp_docker_runner, shared_folder
from habla.pipelines.training_pipeline import build_pipeline

from habla.kubeflow.compile import CompileOptions

pytestmark = [pytest.mark.containers, pytest.mark.timeout(3600)]

RELEASE_IN_IMAGE = "/opt/habla/data/mini-es-v25/es"  # the bundled release, as the images carry it
# KFP's Markdown viewer renders at most this many characters (frontend MarkdownViewer.tsx,
# MAX_MARKDOWN_STR_LENGTH) and markdown-to-jsx drops every data: URL but data:image ones.
KFP_MARKDOWN_MAX = 50 * 1000 * 8
IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(([^)]*)\)")


@pytest.fixture(scope="module")
def pipeline_run(prep_image, train_image, tmp_path_factory):
    root = shared_folder(tmp_path_factory.mktemp("kfp-docker"))
    out = shared_folder(root / "out")  # under the pipeline root: the one host folder kfp mounts into steps
    with kfp_docker_runner(root, tmp_path_factory.mktemp("podman")) as seen:
        options = CompileOptions(prep_image=prep_image, train_image=train_image, conversion_parallelism=2)
        build_pipeline(options)(
            release_uri=RELEASE_IN_IMAGE,
            output_uri=str(out),
            run_name="in-containers",
            launcher="local",
            gpus_per_node="0",
            evaluate_gpus="0",  # a CPU run evaluates on CPUs
            train_cpu="1",  # the pipeline's own training pod is sized before it runs ("auto" is for cluster jobs)
            train_memory="4Gi",
            num_shards=2,
            workers_per_shard=1,
            audio_format="wav",
            config="tiny_ctc_char",
            config_overrides="trainer.max_steps=10",
        )
        started = list(seen.started)
    assert builtins.print.__module__ == "builtins"  # nothing of kfp.local's is left in this process
    return root, out, started


def test_every_step_ran_in_its_image(pipeline_run, prep_image, train_image):
    _, _, started = pipeline_run
    # start_run, plan, list_shards, 2 x convert_shard, assemble, register_dataset, promote
    # | train_here, evaluate_models, package_model
    assert Counter(image for image, _ in started) == {prep_image: 8, train_image: 3}


def test_the_pipeline_trained_evaluated_and_promoted(pipeline_run):
    _, out, _ = pipeline_run
    run = out / "runs" / "in-containers"
    record = json.loads((run / "run.json").read_text())
    assert record["run_id"] and record["gpus_per_node"] == 0 and record["launcher"] == "local"
    assert (run / "run.json").stat().st_uid == CONTAINER_UID  # written by the image's non-root user
    assert json.loads((run / "model" / "train_summary.json").read_text())["steps"] == 10
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    (dataset,) = (out / "datasets").iterdir()
    test_clips = len((dataset / "manifests" / "test.json").read_text().splitlines())
    assert metrics["utterances"] == test_clips
    best = json.loads((out / "models" / "best.json").read_text())
    assert best["run"] == "in-containers" and Path(best["model"]).is_file()


def _png(uri: str) -> bytes:
    assert uri.startswith("data:image/png;base64,"), uri[:80]
    data = base64.b64decode(uri.split(",", 1)[1], validate=True)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    return data


def test_ui_reports_carry_their_plots(pipeline_run):
    root, _, _ = pipeline_run
    reports = sorted(p for p in root.rglob("report") if p.is_file())  # the Markdown outputs
    assert {p.parent.name for p in reports} == {"assemble-dataset", "evaluate-models"}, reports
    for path in reports:
        text = path.read_text()
        links = IMAGE_LINK.findall(text)
        assert links, path  # the plot is in the report
        for link in links:
            _png(link)
        assert len(text) <= KFP_MARKDOWN_MAX, (path, len(text))
    pages = sorted(p for p in root.rglob("plots") if p.is_file())  # the HTML outputs
    assert len(pages) == 2
    for path in pages:
        sources = re.findall(r'src="([^"]*)"', path.read_text())
        assert sources and all(_png(s) for s in sources)


def test_a_failing_step_fails(prep_image, tmp_path_factory):
    """Through the harness's adapter a step's exit code reaches kfp: on podman 4.3 without it, a step that
    exits 3 may be reported as a success (tests/fixtures/containers.py)."""
    from kfp import dsl

    @dsl.component(base_image=prep_image, install_kfp_package=False)
    def exits_with_3():
        raise SystemExit(3)

    root = shared_folder(tmp_path_factory.mktemp("kfp-fail"))
    with kfp_docker_runner(root, tmp_path_factory.mktemp("podman")) as seen:
        with pytest.raises(RuntimeError, match="exits-with-3"):
            exits_with_3()
        assert [image for image, _ in seen.started] == [prep_image]
