"""Property test of ``habla compare`` under hostile run folders (hypothesis): records that are missing, damaged,
of the wrong shape or full of markup, in every output format, with and without a plot. Whatever the folders
hold, compare exits 0 or 2, says why in one line, never shows a traceback, and what it prints parses."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from datetime import timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from habla import cli

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
EXAMPLES = {"ci": 30, "long": 300}[PROFILE]
markup = st.sampled_from(["$x$", "<script>alert(1)</script>", "a|b", "ñandú"])
scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(allow_nan=False),
                    st.text(max_size=10), markup)  # fmt: skip
groups = st.dictionaries(st.text(max_size=12), st.one_of(scalars, st.fixed_dictionaries(
    {"wer": scalars, "cer": scalars, "utterances": scalars})), max_size=3)  # fmt: skip
documents = st.one_of(
    st.none(),  # absent
    st.binary(max_size=20),  # not JSON
    st.lists(scalars, max_size=2).map(json.dumps),  # JSON, not an object
    st.fixed_dictionaries(
        {},
        optional={"run_name": scalars, "release": scalars, "config": scalars, "nodes": scalars, "wer": scalars,
                  "cer": scalars, "utterances": scalars, "steps": scalars, "wall_seconds": scalars,
                  "audio_hours_seen": scalars, "manifest": scalars, "config_overrides": scalars,
                  "by_gender": groups, "by_accent": groups, "promotion": scalars},
    ).map(json.dumps),
)  # fmt: skip
folders = st.lists(st.tuples(documents, documents, documents), min_size=1, max_size=4)


@settings(max_examples=EXAMPLES, deadline=timedelta(seconds=30), derandomize=PROFILE == "ci", database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip
@given(runs=folders, fmt=st.sampled_from(["table", "markdown", "csv", "json"]), plot=st.booleans())
def test_compare_never_crashes_and_prints_what_parses(runs, fmt, plot, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for k, (record, summary, metrics) in enumerate(runs):
        for rel, content in (("run.json", record), ("model/train_summary.json", summary),
                             ("eval/metrics.json", metrics)):  # fmt: skip
            if content is not None:
                path = root / f"r{k}" / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(content if isinstance(content, bytes) else content.encode())
        (root / f"r{k}").mkdir(exist_ok=True)
    args = ["compare", *(str(root / f"r{k}") for k in range(len(runs))), "--format", fmt, "--groups", "gender,accent"]
    if plot:
        args += ["--plot", str(root / "p.png")]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(args)
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    assert "Traceback" not in err.getvalue()
    if code == 2:
        assert len(lines) == 1 and lines[0].startswith("habla compare: error:"), err.getvalue()
        return
    assert code == 0, err.getvalue()
    assert all(line.startswith("habla compare: note:") for line in lines), err.getvalue()
    if fmt == "json":
        assert isinstance(json.loads(out.getvalue()), list)
    elif fmt == "csv":
        rows = list(csv.reader(io.StringIO(out.getvalue())))
        assert rows and all(len(row) == len(rows[0]) for row in rows)
    elif fmt == "markdown":
        assert "<script>" not in out.getvalue()
    if plot and (root / "p.png").exists():
        assert (root / "p.png").read_bytes()[:4] == b"\x89PNG"
