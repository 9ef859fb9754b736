"""Property tests of the run parameters under hostile input (hypothesis): whatever ``key=value`` settings a user
or a watcher passes, ``habla pipeline submit`` and ``habla watch`` either refuse them in one line before
anything reaches Kubeflow Pipelines (exit 2), or submit exactly what RunParameters accepted."""

from __future__ import annotations

import contextlib
import io
import json
import os
import string
from datetime import timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from standins.kfp_server import KfpStandin

from habla import cli
from habla.core.errors import HablaError
from habla.runs.parameters import RunParameters

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
EXAMPLES = {"ci": 40, "long": 400}[PROFILE]
NAMES = [n for n in RunParameters.names() if n not in ("release_uri", "output_uri", "run_name")]
odd_characters = st.sampled_from(string.printable + "²ñ☃\u2028\x00") | st.characters(blacklist_categories=("Cs",))
hostile_text = st.text(odd_characters, max_size=12)
values = st.one_of(
    st.integers(-5, 70).map(str), st.floats(allow_nan=True, allow_infinity=True).map(str), hostile_text,
    st.sampled_from(["local", "trainjob", "tar", "wav", "train", "validated", "tiny_ctc_char", "x.yaml", "8", "0",
                     "trainer.max_steps=3", "model.optim.lr=1e-3 +trainer.x=1", "'unbalanced", "1e3", "-1", "true"]),
)  # fmt: skip
settings_lists = st.lists(st.tuples(st.sampled_from([*NAMES, "node", "trainer.max_steps"]), values), max_size=5)


def _profile():
    return settings(max_examples=EXAMPLES, deadline=timedelta(seconds=30), derandomize=PROFILE == "ci",
                    database=None, suppress_health_check=[HealthCheck.too_slow])  # fmt: skip


def _cli(*args: str) -> tuple[int, str, str]:
    """``habla <args>`` in this process: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(args))
    return code, out.getvalue(), err.getvalue()


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@_profile()
@given(chosen=settings_lists)
def test_submit_sends_exactly_what_it_accepts(chosen):
    with KfpStandin() as kfp:
        code, _, err = _cli("pipeline", "submit", "--host", kfp.url, "--release", "s3://cv/r", "--out", "s3://cv/o",
                            *(f"{k}={v}" for k, v in chosen))  # fmt: skip
        runs = list(kfp.runs.values())
    if code == 2:
        assert _one_line(err).startswith("habla pipeline: error:")
        assert not runs, "a refused setting reached the API"
        return
    assert code == 0, err
    [run] = runs
    sent = RunParameters.checked(run["runtime_config"]["parameters"])  # what was sent is itself acceptable
    assert (sent.release_uri, sent.output_uri) == ("s3://cv/r", "s3://cv/o")


@_profile()
@given(chosen=settings_lists)
def test_the_watcher_refuses_bad_parameters_before_claiming_anything(chosen, tmp_path_factory):
    where = tmp_path_factory.mktemp("watch")
    inbox = where / "inbox" / "cv-corpus-25.0-2026-03-09" / "es"
    inbox.mkdir(parents=True)
    (inbox / "train.tsv").write_text("client_id\tpath\tsentence\n")
    params = {k: json.loads(v) if _is_json(v) else v for k, v in chosen}
    try:
        RunParameters.checked(params, release_uri="r", output_uri=str(where / "out"), run_name="x")
        valid = True
    except HablaError:
        valid = False
    args = ["watch", "--inbox", str(where / "inbox"), "--state", str(where / "state"), "--dry-run"]
    code, out, err = _cli(*args, *(f"--param={k}={v}" for k, v in chosen))
    if valid:
        assert code == 0 and "would-submit" in out, err
    else:
        assert code == 2 and _one_line(err).startswith("habla watch: error:")
    assert not (where / "state").exists() or not any((where / "state").rglob("claim-*.json"))


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False
