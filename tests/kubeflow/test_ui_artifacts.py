"""What the KFP UI shows of a dataset: the assemble step's Markdown and HTML artifacts carry the plot inside them
(the UI cannot follow report.md's relative link), within what KFP's Markdown viewer renders. The evaluation
step's artifacts are checked the same way by the pipeline run in containers (test_pipeline_containers.py)."""

from __future__ import annotations

import base64
import re

from fixtures.releases import MINI
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


def test_a_full_release_report_fits_the_ui_with_its_plot_and_decision():
    """At full size (a Common Voice release has thousands of free-text accents and speakers, long sentences), the
    evaluation report the UI shows stays within what KFP's Markdown viewer renders, and what it would cut is text,
    never the plot or the promotion decision; the accent table is bounded."""
    from habla.core import render
    from habla.evaluation import report

    def group(n: int) -> dict:
        return {"utterances": n, "wer": 0.1, "cer": 0.05, "wer_ci": [0.08, 0.12], "cer_ci": [0.04, 0.06]}

    metrics = {
        "wer": 0.1, "cer": 0.05, "utterances": 15_900, "hours": 26.0, "wer_ci": [0.09, 0.11], "cer_ci": [0.04, 0.06],
        "by_gender": {g: group(5000) for g in ("male_masculine", "female_feminine", "unknown")},
        "by_age": {a: group(2000) for a in ("teens", "twenties", "thirties", "fourties")},
        "by_accent": {f"acento de la región {k} con una descripción larga": group(k + 1) for k in range(4000)},
        "by_speaker": {f"{k:0128x}": group(k + 1) for k in range(3000)},
        "confusions": {"words": [{"ref": f"palabra{k}", "hyp": f"palabro{k}", "count": 3} for k in range(50)]},
    }  # fmt: skip
    sentence = "una frase bastante larga de common voice en español " * 6
    rows = [{"audio_filepath": f"s3://b/test/{k}.wav", "text": sentence, "pred_text": sentence[::-1], "wer": 1.0,
             "cer": 0.5, "word_errors": 48, "path": f"common_voice_es_{k}.mp3"} for k in range(5000)]  # fmt: skip
    markdown = report.render_report(metrics, rows, "s3://b/model.nemo", "s3://b/test.json", worst=5000)
    assert "(40 of 4000 accents, most utterances first)" in markdown
    png = b"\x89PNG\r\n\x1a\n" + bytes(200_000)  # a plot of the size the report's figure has at full size
    decision = "## Promotion\n\npromoted: WER 0.1000 beats 0.1200 by more than the margin"
    shown = render.markdown_for_ui(
        markdown, "wer_by_group.png", png, tail=decision, where="s3://b/runs/r/eval/report.md"
    )
    assert len(markdown) + len(render.png_data_uri(png)) > KFP_MARKDOWN_MAX  # it would not fit whole
    assert len(shown) <= KFP_MARKDOWN_MAX == render.KFP_MARKDOWN_MAX
    assert render.png_data_uri(png) in shown and decision in shown and "s3://b/runs/r/eval/report.md" in shown
    assert shown.startswith("# Evaluation")


def test_the_docs_say_how_the_kfp_217_ui_reads_aws_reports():
    """KFP 2.17's UI drops a provider Secret for a user namespace (kubeflow/pipelines #12860) and reads s3://
    artifacts with its own environment: the operators' guide names exactly the variables it reads (facts from
    frontend/server/configs.ts and handlers/artifacts.ts at 2.17.0, vendored with their hashes)."""
    import json

    from crd_schemas import UPSTREAM
    from fixtures.releases import ROOT

    facts = json.loads((UPSTREAM / "kfp-2.17.0" / "ui-artifact-credentials.json").read_text())
    assert facts["secret_provider_only_for_server_namespace"] is True
    guide = (ROOT / "docs" / "operators.md").read_text()
    section = guide[guide.index("Reports in the UI with `aws-s3`") :][:2500]
    for name in facts["aws_environment"]:
        assert f"`{name}`" in section, name
    assert "#12860" in section and "ARTIFACTS_SERVICE_PROXY_ENABLED" in section
