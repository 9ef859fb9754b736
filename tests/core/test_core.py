"""habla.core's shared contracts: paths, key=value parsing, JSON lines, tables, one-line errors."""

from __future__ import annotations

import json

import pytest

from habla.core import jsonl, render
from habla.core.errors import HablaError, one_line
from habla.core.layout import DatasetLayout, OutputLayout, RunLayout, run_name, slug
from habla.core.settings import parse_pairs, split_pair


@pytest.mark.parametrize(
    "name, expected",
    [("a b", "a-b"), ("../../etc", "etc"), ("..", "run"), ("", "run"), ("x/y\\z", "x-y-z"), ("ok.v1_2", "ok.v1_2")],
)
def test_slug_is_one_safe_path_component(name, expected):
    assert slug(name) == expected


def test_every_path_comes_from_one_layout():
    out = OutputLayout("s3://b/habla")
    run = out.run("first try")
    assert run.root == "s3://b/habla/runs/first-try" and run == RunLayout("s3://b/habla/runs/first-try")
    assert run.record.endswith("runs/first-try/run.json") and run.train.model.endswith("model/model.nemo")
    assert run.eval.metrics.endswith("eval/metrics.json") and run.best_eval.root.endswith("eval/best")
    assert out.best == "s3://b/habla/models/best.json"
    assert out.promoted_model("first try") == "s3://b/habla/models/first-try/model.nemo"
    dataset = out.dataset("cv-corpus-25.0-2026-03-09-es", "abc123")
    assert dataset.root == "s3://b/habla/datasets/cv-corpus-25.0-2026-03-09-es-abc123"
    assert DatasetLayout("/d").tar_patterns("train", 3) == (
        "/d/tarred/train/manifest__OP_0..2_CL_.json",
        "/d/tarred/train/audio__OP_0..2_CL_.tar",
    )
    assert run_name("", "kfp-run") == "kfp-run" and run_name("mine", "kfp-run") == "mine"


def test_key_value_pairs():
    assert split_pair("a.b=1=2") == ("a.b", "1=2")
    assert parse_pairs(["n=2", "x=0.5", "b=true", "s=hola", "n=3"], typed=True) == {"n": 3, "x": 0.5, "b": True,
                                                                                  "s": "hola"}  # fmt: skip
    assert parse_pairs(["n=2"]) == {"n": "2"}
    for bad in ("novalue", "=1", " =1"):
        with pytest.raises(HablaError, match="must look like KEY=VALUE"):
            split_pair(bad, "--env")


def test_json_lines_keep_unicode_line_breaks_inside_values():
    records = [{"text": "uno\u2028dos"}, {"text": "tres\x85\x0c\x1c"}, {"n": 1}]
    text = jsonl.dumps(records)
    assert text.count("\n") == 3 and jsonl.loads(text) == records
    assert jsonl.loads('{"a": 1}\r\n\n  \n{"a": 2}') == [{"a": 1}, {"a": 2}]
    with pytest.raises(ValueError):
        jsonl.dumps([{"x": float("nan")}])


def test_one_table_writer_in_four_formats():
    rows = [{"run": "a|b", "wer": 0.123456, "n": 3}, {"run": "c", "wer": None, "n": 12}]
    markdown = render.table(rows).splitlines()
    assert markdown[0].split("|")[1].strip() == "run" and "a\\|b" in markdown[2] and "0.1235" in markdown[2]
    plain = render.table(rows, ["run", "n"], "table").splitlines()
    assert plain[0].split() == ["run", "n"] and plain[2].split() == ["c", "12"]
    assert render.table(rows, ["run", "wer"], "csv").splitlines() == ["run,wer", "a|b,0.123456", "c,"]
    assert json.loads(render.table(rows, ["wer"], "json")) == [{"wer": 0.123456}, {"wer": None}]
    assert "data:image/png;base64," in render.png_html(
        b"\x89PNG", 'a "plot"'
    ) and "&quot;plot&quot;" in render.png_html(b"", 'a "plot"')


def test_one_line_errors():
    class ClientError(Exception):
        response = {"Error": {"Code": "NoSuchBucket", "Message": "The bucket does not exist"}}

    class ApiException(Exception):
        status, reason, body = 422, "Unprocessable Entity", json.dumps({"message": "spec.x: Invalid value"})

    assert one_line(ClientError("raw")) == "NoSuchBucket: The bucket does not exist"
    assert one_line(ApiException()) == "HTTP 422 Unprocessable Entity: spec.x: Invalid value"
    assert one_line(ValueError("first\n  second")) == "first second"
    assert one_line(ValueError("first\n  second"), first_line=True, with_type=True) == "ValueError: first"
    assert one_line(OSError()) == "OSError" and len(one_line(ValueError("x" * 500), limit=50)) == 50


def test_json_is_never_nan_written_or_read():
    for text in ('{"duration": NaN}', '{"duration": Infinity}', "[-Infinity]"):
        with pytest.raises(ValueError, match="not a JSON number"):
            jsonl.loads(text)
    with pytest.raises(ValueError):
        jsonl.dump({"wer": float("nan")})
    summary = {"val_wer": float("nan"), "loss": [1.5, float("inf")], "steps": 3}
    expected = '{"val_wer": null, "loss": [1.5, null], "steps": 3}'
    assert jsonl.dump(jsonl.finite_or_null(summary), indent=None) == expected


def test_secrets_never_reach_a_line_habla_prints():
    """The Data Collective's presigned URL, signature included, was printed in error lines."""
    from habla.core.errors import one_line, redact

    signed = "https://cdn.example/cv.tar.gz?X-Amz-Signature=abc123&X-Amz-Credential=AKIA"
    assert redact(f"HTTP 500 on GET {signed}") == "HTTP 500 on GET https://cdn.example/cv.tar.gz?…"
    assert redact("http://user:pass@minio:9000/b") == "http://minio:9000/b"
    assert redact("Authorization: Bearer eyJhbGc.x.y") == "Authorization: Bearer …"
    assert redact("MDC_API_KEY=s3cr3t and AWS_SECRET_ACCESS_KEY: k") == "MDC_API_KEY=… and AWS_SECRET_ACCESS_KEY: …"
    kept = "s3://bucket/cv-corpus-25.0/es tokenizer: model.tokenizer.dir the token expired"
    assert redact(kept) == kept
    assert "abc123" not in one_line(RuntimeError(f"fetch failed: {signed}"))
