"""The images themselves, built from infra/ by podman and run here as their non-root user: every command's
--help and ``habla prepare`` in habla-prep (the slim image: no torch, no NeMo, no omegaconf), ``habla train``
and ``habla evaluate`` in habla-train. See tests/fixtures/containers.py for how they are built."""

from __future__ import annotations

import json

import pytest
from fixtures.containers import CONTAINER_UID, run_in, shared_folder
from fixtures.releases import MINI

from habla import cli

pytestmark = [pytest.mark.containers, pytest.mark.timeout(3600)]

# Run inside an image: every command line its own CLI has, each with --help; prints what failed, as JSON.
EVERY_HELP = """
import json, subprocess
from habla import cli
parser = cli.build_parser()
lines = []
for name, sub in parser._subparsers._group_actions[0].choices.items():
    lines.append([name])
    for action in sub._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            lines += [[name, child] for child in action.choices]
failed = {}
for line in lines:
    r = subprocess.run(["habla", *line, "--help"], capture_output=True, text=True)
    if r.returncode != 0 or "usage: habla" not in r.stdout:
        failed[" ".join(line)] = (r.stderr or r.stdout)[-1500:]
print(json.dumps({"lines": [" ".join(x) for x in lines], "failed": failed}))
"""


@pytest.fixture(scope="module")
def prepared(prep_image, tmp_path_factory):
    """``habla prepare`` of the bundled release, run in habla-prep as uid 1000 into a host folder."""
    out = shared_folder(tmp_path_factory.mktemp("prepared"))
    result = run_in(prep_image, "habla", "prepare", "--out", "/work/dataset", "--workers", "2", volumes={out: "/work"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out / "dataset", result


def test_prep_image_is_slim_non_root_and_every_command_has_help(prep_image):
    result = run_in(prep_image, "python", "-c", EVERY_HELP)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert not report["failed"], report["failed"]
    assert {line.split()[0] for line in report["lines"]} == set(cli.COMMANDS)  # the image's CLI is this one's
    assert run_in(prep_image, "id", "-u").stdout.strip() == str(CONTAINER_UID)
    for absent in ("torch", "nemo", "omegaconf", "lightning"):  # what the slim image must not carry
        probe = run_in(prep_image, "python", "-c", f"import {absent}")
        assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr, absent


def test_prepare_in_the_prep_image_accounts_for_every_row(prepared):
    dataset, _ = prepared
    report = json.loads((dataset / "report.json").read_text())
    rejected = [json.loads(line) for line in (dataset / "rejected.jsonl").read_text().splitlines() if line]
    for split in ("train", "dev", "test"):
        rows = len((MINI / f"{split}.tsv").read_text().splitlines()) - 1
        kept = [json.loads(line) for line in (dataset / "manifests" / f"{split}.json").read_text().splitlines()]
        assert len(kept) + sum(r["split"] == split for r in rejected) == rows, split
        assert kept and all(e["audio_filepath"].startswith("/work/dataset/audio/") for e in kept)
        assert all((dataset / e["audio_filepath"].removeprefix("/work/dataset/")).stat().st_size > 44 for e in kept)
    assert report["splits"]["train"]["clips"] > 0
    assert (dataset / "report.png").read_bytes().startswith(b"\x89PNG")
    # Written by the image's user: uid 1000, not root.
    assert (dataset / "report.json").stat().st_uid == CONTAINER_UID


def test_train_and_evaluate_in_the_train_image(train_image, prepared):
    dataset, _ = prepared
    work = dataset.parent
    manifests = "/work/dataset/manifests"
    train = run_in(
        train_image,
        *("habla", "train", "--config", "tiny_ctc_char", "--out", "/work/model"),
        *("--train-manifest", f"{manifests}/train.json", "--val-manifest", f"{manifests}/dev.json"),
        "trainer.max_steps=5",
        volumes={work: "/work"},
    )
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    summary = json.loads((work / "model" / "train_summary.json").read_text())
    assert summary["steps"] == 5
    assert (work / "model" / "model.nemo").stat().st_size > 100_000
    evaluate = run_in(
        train_image,
        *("habla", "evaluate", "--model", "/work/model/model.nemo", "--manifest", f"{manifests}/test.json"),
        *("--out", "/work/eval"),
        volumes={work: "/work"},
    )
    assert evaluate.returncode == 0, evaluate.stdout[-3000:] + evaluate.stderr[-3000:]
    metrics = json.loads((work / "eval" / "metrics.json").read_text())
    test_clips = len((dataset / "manifests" / "test.json").read_text().splitlines())
    assert metrics["utterances"] == test_clips and 0.0 <= metrics["cer"]
    torch = run_in(train_image, "python", "-c", "import torch; print(torch.__version__, torch.version.cuda)")
    assert torch.stdout.split() == ["2.13.0+cpu", "None"], torch.stdout  # the CPU wheel, never a CUDA download
