"""habla train refuses bad input in one line, before training (most of it before the NeMo import), and the
shipped configs are what they claim to be."""

from __future__ import annotations

import json

import pytest
from fixtures.commands import read_jsonl, run_habla, write_manifest
from omegaconf import OmegaConf

from habla.core.errors import HablaError
from habla.speech import manifests as nemo_data
from habla.speech.text import ALPHABET
from habla.training import config as train_config
from habla.training import configs


def test_shipped_configs_load_and_char_labels_are_the_alphabet():
    assert {"tiny_ctc_char", "quartznet15x5_char", "fastconformer_ctc_bpe"} <= set(configs.available())
    for name in ("tiny_ctc_char", "quartznet15x5_char"):
        cfg = train_config.load(name)
        assert train_config.model_kind(cfg) == "char"
        assert tuple(cfg.model.labels) == ALPHABET
        assert tuple(cfg.model.decoder.vocabulary) == ALPHABET  # interpolations resolved before NeMo sees them
        # NeMo's default "en" parser would unidecode á -> a and ñ -> n
        assert cfg.model.train_ds.parser == cfg.model.validation_ds.parser == "base"
    assert train_config.model_kind(train_config.load("fastconformer_ctc_bpe")) == "bpe"


def test_overrides_are_typed_and_checked():
    cfg = train_config.load("tiny_ctc_char", ["trainer.max_steps=7", "model.optim.lr=3e-3", "+model.train_ds.seed=5",
                                              "model.encoder.jasper.0.filters=64"])  # fmt: skip
    assert cfg.trainer.max_steps == 7 and cfg.model.optim.lr == pytest.approx(0.003)
    assert cfg.model.train_ds.seed == 5 and cfg.model.encoder.jasper[0].filters == 64
    with pytest.raises(HablaError, match=r"no key trainer.max_step \(did you mean trainer.max_steps\?\)"):
        train_config.load("tiny_ctc_char", ["trainer.max_step=7"])
    with pytest.raises(HablaError, match="must look like KEY=VALUE"):
        train_config.load("tiny_ctc_char", ["trainer.max_steps"])


def test_shard_patterns_expand_like_nemo():
    assert nemo_data.expand_shards("s3://b/t/audio__OP_0..2_CL_.tar") == [f"s3://b/t/audio_{k}.tar" for k in range(3)]
    assert nemo_data.expand_shards("/d/manifest_{3..4}.json") == ["/d/manifest_3.json", "/d/manifest_4.json"]
    assert nemo_data.expand_shards("/d/train.json") == ["/d/train.json"]


def _train_args(manifest, out, *extra):
    return ("train", "--config", "tiny_ctc_char", "--train-manifest", str(manifest), "--val-manifest", str(manifest),
            "--out", str(out), *extra)  # fmt: skip


def _assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("habla train: error:")]
    assert len(error_lines) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in error_lines[0]


def test_bad_config_is_one_clear_line(tmp_path, clips30):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: [unclosed\n")
    extra_section = tmp_path / "extra.yaml"
    cfg = OmegaConf.to_container(train_config.load("tiny_ctc_char"))
    cfg["optimizer"] = {"lr": 1}
    extra_section.write_text(json.dumps(cfg))  # JSON is YAML
    cases = [
        (("--config", "no_such_config"), ["no config 'no_such_config'", "tiny_ctc_char"]),
        (("--config", str(bad_yaml)), ["not valid YAML"]),
        (("--config", str(extra_section)), ["unknown section(s) optimizer"]),
        (("trainer.max_step=5",), ["did you mean trainer.max_steps?"]),
        (("trainer.max_steps=-1", "trainer.max_epochs=-1"), ["never end"]),
        (("+trainer.logger=true",), ["trainer.logger is set by habla train"]),
    ]
    for extra, fragments in cases:
        args = list(_train_args(clips30, tmp_path / "out", *extra))
        if extra[0] == "--config":  # replace the default config
            args[2] = extra[1]
            args = args[: len(args) - 2]
        result = run_habla(*args, timeout=120)
        _assert_one_line_error(result, *fragments)
        assert not (tmp_path / "out" / "model.nemo").exists()


def test_manifest_with_a_missing_file_is_one_clear_line(tmp_path, train_clips):
    entries = [dict(e) for e in train_clips[:5]]
    entries[3]["audio_filepath"] = str(tmp_path / "gone" / "common_voice_es_0.wav")
    manifest = write_manifest(entries, tmp_path / "train.json")
    result = run_habla(*_train_args(manifest, tmp_path / "out"), timeout=120)
    _assert_one_line_error(result, "line 4", "common_voice_es_0.wav", "no such file")


@pytest.mark.parametrize(
    "content, fragment",
    [("", "manifest is empty"), ('{"audio_filepath": "a.wav", "duration": 1.0}\n', "line 1 lacks text"),
     ("not json\n", "line 1 is not JSON")],
)  # fmt: skip
def test_unreadable_manifests_are_one_clear_line(tmp_path, content, fragment):
    manifest = tmp_path / "train.json"
    manifest.write_text(content)
    _assert_one_line_error(run_habla(*_train_args(manifest, tmp_path / "out"), timeout=120), fragment)


def test_missing_manifest_and_undecodable_audio(tmp_path, train_clips):
    _assert_one_line_error(run_habla(*_train_args(tmp_path / "nope.json", tmp_path / "out")), "manifest not found")
    fake = tmp_path / "fake.wav"
    fake.write_bytes(b"this is not audio")
    manifest = write_manifest([{**train_clips[0], "audio_filepath": str(fake)}], tmp_path / "train.json")
    _assert_one_line_error(run_habla(*_train_args(manifest, tmp_path / "out")), "not readable audio")


def test_characters_outside_the_vocabulary_are_refused(tmp_path, train_clips):
    """The ⁇ failure: a character the model cannot emit must stop training before it starts."""
    entries = [dict(e) for e in train_clips[:4]]
    entries[1]["text"] = "año 2024 ça"
    manifest = write_manifest(entries, tmp_path / "train.json")
    result = run_habla(*_train_args(manifest, tmp_path / "out"))
    _assert_one_line_error(result, "character(s) the vocabulary (model.labels) lacks", "'0'", "'2'", "'4'", "'ç'")


def test_a_second_run_into_the_same_dst_needs_resume(tmp_path, clips30):
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "last.ckpt").write_bytes(b"x")
    _assert_one_line_error(run_habla(*_train_args(clips30, out)), "already holds a training run", "--resume")
    assert read_jsonl(clips30)  # the fixture itself is sound


def test_a_dst_trains_one_model_and_never_trains_over_a_model(tmp_path):
    """--resume into a folder with a finished model.nemo but no checkpoint started from step 0 and replaced it,
    even with another architecture."""
    from habla.core.layout import TrainLayout
    from habla.training import output

    dst = TrainLayout(str(tmp_path / "out"))
    tiny = output.identity("tiny_ctc_char", ["trainer.max_steps=5", "model.optim.lr=0.01"], None)
    output.bind(dst, tiny, resume=False)
    output.bind(dst, output.identity("tiny_ctc_char", ["trainer.max_steps=50", "model.optim.lr=0.01"], None), True)
    with pytest.raises(HablaError, match=r"trains another model \(config tiny_ctc_char, .*not config quartznet"):
        output.bind(dst, output.identity("quartznet15x5_char", [], None), resume=True)
    with pytest.raises(HablaError, match="trains another model"):
        output.bind(dst, output.identity("tiny_ctc_char", ["model.optim.lr=0.5"], None), resume=True)
    (tmp_path / "out" / "model.nemo").write_bytes(b"a finished model")
    with pytest.raises(HablaError, match="holds a model.nemo but no checkpoint to continue it from"):
        output.bind(dst, tiny, resume=True)


def test_two_runs_into_one_dst_at_once_one_is_refused(tmp_path, clips30):
    """Two habla train runs into one --out both "succeeded" and mixed checkpoints of two architectures."""
    from habla.core import claims

    out = tmp_path / "out"
    with claims.Lease(str(out / ".lease.json"), str(out), ttl=2.0):  # another run, alive: renewing its lease
        result = run_habla(*_train_args(clips30, out, "--resume"), env={"HABLA_TRAIN_LEASE_SECONDS": "2"})
    _assert_one_line_error(result, f"{out} is being written by", "wait for it to finish")
    assert not (out / "model.nemo").exists() and not (out / "checkpoints").exists()


def test_the_pipelines_training_step_names_every_split_s_tars(tmp_path):
    """A dataset prepared with --format tar: the training step streams the train tars and validates on the dev
    tars (read out once); a WAV dataset passes neither."""
    from fixtures.releases import MINI_V8

    from habla.data.options import PrepareOptions
    from habla.data.prepare import prepare
    from habla.training.command import TrainInputs

    for fmt in ("tar", "wav"):
        report = prepare(str(MINI_V8), str(tmp_path / fmt), PrepareOptions(shards=2, format=fmt), workers=2)
        args = TrainInputs.for_dataset(str(tmp_path / fmt), "tiny_ctc_char").arguments(str(tmp_path / "model"))
        if fmt == "tar":
            assert args[args.index("--train-tars") + 1] == report["tarred"]["train"]["tarred_audio_filepaths"]
            assert args[args.index("--val-tars") + 1] == report["tarred"]["dev"]["tarred_audio_filepaths"]
            assert args[args.index("--val-manifest") + 1] == report["manifests"]["dev"]
        else:
            assert "--train-tars" not in args and "--val-tars" not in args
