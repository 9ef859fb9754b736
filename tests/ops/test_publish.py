"""`habla publish`: a promoted model's package (model.nemo, card, ONNX) uploaded to a Hugging Face-style hub, a
stand-in on loopback (tests/standins/hf_hub.py) read back with huggingface_hub's own client."""

from __future__ import annotations

import json

from fixtures.commands import run_habla
from huggingface_hub import HfApi, hf_hub_download
from standins.hf_hub import TOKEN, HubStandin


def _promoted(out):
    """OUT as the pipeline leaves it after a promotion: models/<run>/ and models/best.json."""
    package = out / "models" / "run-1"
    package.mkdir(parents=True)
    (package / "model.nemo").write_bytes(b"\x00nemo weights\xff" * 1000)
    (package / "README.md").write_text("---\nlicense: cc-by-sa-3.0\nlibrary_name: nemo\n---\n# run-1\n")
    (package / "model.onnx").write_bytes(b"onnx graph" * 100)
    (package / "onnx_check.json").write_text(json.dumps({"verified": True}))
    (out / "models" / "best.json").write_text(json.dumps({"run": "run-1", "model": str(package / "model.nemo")}))
    return package


def test_publish_uploads_model_card_and_onnx_in_one_commit(tmp_path):
    package = _promoted(tmp_path / "out")
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    with HubStandin() as hub:
        result = run_habla("publish", str(tmp_path / "out"), "--repo", "habla-org/es-ctc", "--endpoint", hub.url,
                           "--token-file", str(token))  # fmt: skip
        assert result.returncode == 0, result.stderr
        done = json.loads(result.stdout.splitlines()[-1])
        assert done["repo"] == "habla-org/es-ctc" and done["url"] == f"{hub.url}/habla-org/es-ctc"
        assert [c["files"] for c in hub.commits] == [["README.md", "model.nemo", "model.onnx", "onnx_check.json"]]
        # read back with the hub's own client
        api = HfApi(endpoint=hub.url, token=TOKEN)
        assert sorted(api.list_repo_files("habla-org/es-ctc")) == sorted(done["files"])
        for name in ("model.nemo", "README.md", "model.onnx"):
            got = hf_hub_download("habla-org/es-ctc", name, endpoint=hub.url, cache_dir=tmp_path / "cache", token=TOKEN)
            assert open(got, "rb").read() == (package / name).read_bytes(), name
        # published again (the folder of the model itself): the repository exists, a second commit
        again = run_habla("publish", str(package), "--repo", "habla-org/es-ctc", "--endpoint", hub.url,
                          "--token-file", str(token), "--message", "again")  # fmt: skip
        assert again.returncode == 0, again.stderr
        assert len(hub.commits) == 2 and hub.commits[1]["summary"] == "again"


def test_publish_refuses_in_one_line(tmp_path):
    _promoted(tmp_path / "out")
    (tmp_path / "bad-token").write_text("wrong")
    (tmp_path / "empty").mkdir()
    with HubStandin() as hub:
        cases = [
            ([str(tmp_path / "out"), "--repo", "habla-org/es-ctc", "--token-file", str(tmp_path / "bad-token")], "401"),
            ([str(tmp_path / "empty"), "--repo", "habla-org/es-ctc"], "not a promoted model's folder"),
            ([str(tmp_path / "out"), "--repo", "no//such id"], "not a hub repository id"),
            ([str(tmp_path / "nowhere"), "--repo", "a/b"], "no such folder"),
        ]
        for args, message in cases:
            result = run_habla("publish", *args, "--endpoint", hub.url)
            lines = result.stderr.strip().splitlines()
            assert result.returncode == 2 and len(lines) == 1 and message in lines[0], (args, result.stderr)
        assert hub.commits == []
    gone = run_habla("publish", str(tmp_path / "out"), "--repo", "a/b", "--endpoint", "http://127.0.0.1:9",
                     "--token-file", str(tmp_path / "bad-token"))  # fmt: skip
    assert gone.returncode == 1 and len(gone.stderr.strip().splitlines()) == 1, gone.stderr
