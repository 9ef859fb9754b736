"""What the KFP UI shows of a dataset: the assemble step's Markdown and HTML artifacts carry the plot inside them
(the UI cannot follow report.md's relative link), within what KFP's Markdown viewer renders. The evaluation
step's artifacts are checked the same way by the pipeline run in containers (test_pipeline_containers.py)."""

from __future__ import annotations

import base64
import re

from conftest import MINI
from habla.components.data import assemble_dataset
from kfp.dsl import HTML, Markdown, Metrics

from habla.data import prepare
from habla.data.options import PrepareOptions

# frontend/src/components/viewers/MarkdownViewer.tsx (kubeflow/pipelines 2.17.0): MAX_MARKDOWN_STR_LENGTH
KFP_MARKDOWN_MAX = 50 * 1000 * 8


def test_the_dataset_report_carries_its_plot(tmp_path):
    dataset = tmp_path / "dataset"
    prepare.plan(str(MINI), str(dataset), PrepareOptions(shards=1, splits=("test",)))
    hours = prepare.convert_shard(str(dataset), 0, 1)["audio_seconds"] / 3600
    report, plots, metrics = (tmp_path / "report", tmp_path / "plots", tmp_path / "metrics")
    assemble_dataset.python_func(
        dataset_uri=str(dataset),
        shard_hours=[hours],
        report=Markdown(uri=str(report)),
        plots=HTML(uri=str(plots)),
        hours=Metrics(uri=str(metrics)),
    )
    markdown = report.read_text()
    assert "(report.png)" in (dataset / "report.md").read_text()  # the file on disk keeps its relative link
    (link,) = re.findall(r"!\[[^\]]*\]\(([^)]*)\)", markdown)
    assert link.startswith("data:image/png;base64,")  # markdown-to-jsx renders data:image URLs only
    assert base64.b64decode(link.split(",", 1)[1]) == (dataset / "report.png").read_bytes()
    assert len(markdown) <= KFP_MARKDOWN_MAX
    (source,) = re.findall(r'src="([^"]*)"', plots.read_text())
    assert source == link
