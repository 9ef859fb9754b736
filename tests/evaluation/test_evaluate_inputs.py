"""habla evaluate's options and outputs under hostile input (data-integrity issue #9)."""

from __future__ import annotations

import pytest
from fixtures.commands import run_habla, write_manifest

from habla.core.errors import HablaError
from habla.evaluation.evaluate import evaluate


@pytest.mark.parametrize(("batch_size", "worst"), [(0, 20), (-3, 20), (16, -1)])
def test_batch_size_and_worst_are_checked_before_anything_runs(tmp_path, batch_size, worst):
    with pytest.raises(HablaError, match="--batch-size must be a positive integer|--worst must be"):
        evaluate("m.nemo", "m.json", str(tmp_path / "e"), batch_size=batch_size, worst=worst)
    assert not (tmp_path / "e").exists()


def test_batch_size_0_is_one_line(tmp_path):
    manifest = write_manifest([{"audio_filepath": "a.wav", "duration": 1.0, "text": "a"}], tmp_path / "m.json")
    result = run_habla("evaluate", "--model", "m.nemo", "--manifest", str(manifest), "--out", str(tmp_path / "e"),
                       "--batch-size", "0")  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "habla evaluate: error: --batch-size must be a positive integer (got 0)"


def test_a_nan_duration_never_reaches_metrics_json(tmp_path):
    manifest = tmp_path / "m.json"
    manifest.write_text('{"audio_filepath": "a.wav", "duration": NaN, "text": "a"}\n')
    result = run_habla("evaluate", "--model", "m.nemo", "--manifest", str(manifest), "--out", str(tmp_path / "e"))
    assert result.returncode == 2 and "line 1 is not JSON (NaN is not a JSON number)" in result.stderr
    assert not (tmp_path / "e" / "metrics.json").exists()
