"""habla train on real speech: it learns, it resumes, it fine-tunes across vocabularies, it builds every config.

These run NeMo on CPU in the test process (one NeMo import for the whole file) except where a real process
must die (resume) or the CLI itself is the subject.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from fixtures.commands import HABLA, cli_env, read_jsonl, write_manifest

from habla.core.errors import HablaError
from habla.evaluation.evaluate import evaluate
from habla.speech.text import ALPHABET
from habla.training.train import train

pytestmark = pytest.mark.slow

ENGLISH = [" ", *"abcdefghijklmnopqrstuvwxyz", "'"]


def test_tiny_ctc_char_learns_30_real_clips(tmp_path, clips30, cache, one_thread):
    """Untrained, the model gets (nearly) every word wrong; after the config's 400 steps, WER <= 0.30."""
    untrained = train("tiny_ctc_char", str(clips30), str(clips30), str(tmp_path / "untrained"), ["trainer.max_steps=0"])
    assert untrained["steps"] == 0 and untrained["val_wer"] >= 0.9

    started = time.monotonic()
    out = tmp_path / "model"
    summary = train("tiny_ctc_char", str(clips30), str(clips30), str(out))
    seconds = time.monotonic() - started

    assert summary["steps"] == 400 and summary["world_size"] == 1 and summary["nodes"] == 1
    assert summary["val_wer"] <= 0.30
    assert json.loads((out / "train_summary.json").read_text()) == {
        k: v for k, v in summary.items() if k != "written_by_this_rank"
    }
    # 400 steps of batch 8 over 30 clips of ~0.78 s
    assert 0.5 < summary["audio_hours_seen"] < 0.9 and summary["epochs"] >= 99
    assert summary["final_train_loss"] < 5
    assert (out / "model.nemo").stat().st_size > 100_000
    assert (out / "checkpoints" / "last.ckpt").is_file() and list((out / "logs").rglob("events.out.tfevents.*"))
    assert "labels" in (out / "config.yaml").read_text()

    metrics = evaluate(str(out / "model.nemo"), str(clips30), str(tmp_path / "eval"))
    assert metrics["utterances"] == 30 and metrics["wer"] <= 0.30
    assert metrics["wer"] == pytest.approx(summary["val_wer"], abs=0.05)  # NeMo's val WER agrees with ours
    assert set(metrics["by_gender"]) >= {"female_feminine", "male_masculine"}
    assert sum(g["utterances"] for g in metrics["by_accent"].values()) == 30
    predictions = read_jsonl(tmp_path / "eval" / "predictions.json")
    assert len(predictions) == 30 and {"text", "pred_text", "wer"} <= set(predictions[0])
    assert (tmp_path / "eval" / "wer_by_group.png").read_bytes()[:4] == b"\x89PNG"
    assert "## WER by accent" in (tmp_path / "eval" / "report.md").read_text()
    print(f"learning run: {seconds:.0f}s, val WER {summary['val_wer']:.3f}, evaluate WER {metrics['wer']:.3f}")


def _checkpoint_step(path: Path) -> int:
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


def test_a_killed_run_resumes_from_its_last_checkpoint(tmp_path, clips30, cache, one_thread):
    out = tmp_path / "model"
    args = [HABLA, "train", "--config", "tiny_ctc_char", "--train-manifest", str(clips30),
            "--val-manifest", str(clips30), "--out", str(out), "trainer.max_steps=300",
            "checkpoint.every_n_train_steps=20"]  # fmt: skip
    last = out / "checkpoints" / "last.ckpt"
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=cli_env(HABLA_CACHE=str(cache)))
    deadline = time.monotonic() + 240
    while not last.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)  # no clean shutdown: what a preempted node or OOM kill does
    first.wait()
    assert last.exists(), (tmp_path / "first.log").read_text()[-3000:]
    killed_at = _checkpoint_step(last)
    assert 0 < killed_at < 300 and not (out / "model.nemo").exists()

    # Started again with the same DST: continues at the checkpoint's step, not at 0.
    summary = train("tiny_ctc_char", str(clips30), str(clips30), str(out),
                    ["trainer.max_steps=300", "checkpoint.every_n_train_steps=20"], resume=True)  # fmt: skip
    assert summary["resumed_from_step"] >= killed_at
    assert summary["steps"] == 300 and (out / "model.nemo").is_file()
    # the audio counter was carried over in the checkpoint: 300 steps of 8 clips in all, not 300 - killed_at
    mean_clip = sum(e["duration"] for e in read_jsonl(clips30)) / 30
    assert summary["audio_hours_seen"] * 3600 == pytest.approx(300 * 8 * mean_clip, rel=0.15)
    print(f"killed at step {killed_at}; resumed at step {summary['resumed_from_step']}, ended at {summary['steps']}")


def test_init_from_a_local_model_with_another_vocabulary(tmp_path, train_clips, cache, one_thread):
    """Fine-tune an English-alphabet model into the Spanish one: encoder kept, decoder rebuilt for the new labels."""
    import torch
    from nemo.collections.asr.models import ASRModel

    ascii_only = [e for e in train_clips if set(e["text"]) <= set(ENGLISH)][:16]
    english = write_manifest(ascii_only, tmp_path / "english.json")
    first = train("tiny_ctc_char", str(english), str(english), str(tmp_path / "english"),
                  [f"model.labels={json.dumps(ENGLISH)}", "trainer.max_steps=10"])  # fmt: skip
    assert first["steps"] == 10

    spanish = write_manifest(train_clips[:16], tmp_path / "spanish.json")
    # A tiny learning rate: after 2 steps the encoder must still be the one of the English model.
    summary = train("tiny_ctc_char", str(spanish), str(spanish), str(tmp_path / "spanish"),
                    ["trainer.max_steps=2", "model.optim.lr=1e-9", "model.optim.sched.min_lr=0"],
                    init_from=str(tmp_path / "english" / "model.nemo"))  # fmt: skip
    assert summary["init_from"].endswith("model.nemo") and summary["steps"] == 2

    before = ASRModel.restore_from(str(tmp_path / "english" / "model.nemo"), map_location="cpu")
    after = ASRModel.restore_from(str(tmp_path / "spanish" / "model.nemo"), map_location="cpu")
    assert list(before.decoder.vocabulary) == ENGLISH and list(after.decoder.vocabulary) == list(ALPHABET)
    assert after.decoder.num_classes_with_blank == len(ALPHABET) + 1
    encoder_before = dict(before.encoder.named_parameters())
    for name, value in after.encoder.named_parameters():
        assert torch.allclose(value, encoder_before[name], atol=1e-5), name
    assert after.cfg.train_ds.labels == list(ALPHABET)


def test_fastconformer_bpe_builds_its_tokenizer_and_trains(tmp_path, train_clips, cache, one_thread):
    """The BPE config at toy size: the tokenizer is built from the train text into DST/tokenizer."""
    from nemo.collections.asr.models import ASRModel, EncDecCTCModelBPE

    manifest = write_manifest(train_clips[:12], tmp_path / "train.json")
    small = ["model.encoder.n_layers=1", "model.encoder.d_model=32", "model.encoder.n_heads=2",
             "model.encoder.subsampling_conv_channels=16", "model.tokenizer.vocab_size=40",
             "model.train_ds.batch_size=4", "global_batch=4", "model.train_ds.num_workers=0",
             "model.validation_ds.num_workers=0", "model.optim.sched.warmup_steps=1",
             "trainer.max_steps=3"]  # fmt: skip
    summary = train("fastconformer_ctc_bpe", str(manifest), str(manifest), str(tmp_path / "out"), small)
    assert summary["steps"] == 3 and summary["val_wer"] is not None
    assert (tmp_path / "out" / "tokenizer" / "tokenizer.model").is_file()
    model = ASRModel.restore_from(str(tmp_path / "out" / "model.nemo"), map_location="cpu")
    assert isinstance(model, EncDecCTCModelBPE) and model.tokenizer.vocab_size <= 40
    texts = " ".join(e["text"] for e in train_clips[:12])
    assert model.tokenizer.ids_to_text(model.tokenizer.text_to_ids(texts)) == texts  # no ⁇

    # Resuming rebuilds the same tokenizer from the same text; other text would silently remap the decoder.
    resumed = train("fastconformer_ctc_bpe", str(manifest), str(manifest), str(tmp_path / "out"),
                    [*small, "trainer.max_steps=4"], resume=True)  # fmt: skip
    assert (resumed["resumed_from_step"], resumed["steps"]) == (3, 4)
    other = write_manifest(train_clips[12:24], tmp_path / "other.json")
    with pytest.raises(HablaError, match="tokenizer built now differs"):
        train("fastconformer_ctc_bpe", str(other), str(other), str(tmp_path / "out"), [*small, "trainer.max_steps=5"],
              resume=True)  # fmt: skip


def test_quartznet15x5_char_builds_at_the_published_size(tmp_path, clips30):
    """The original recipe's model: ~19 M parameters (NeMo's QuartzNet 15x5) with a 35-way decoder."""
    from nemo.collections.asr.models import EncDecCTCModel

    from habla.training import config as train_config

    cfg = train_config.load("quartznet15x5_char", ["model.train_ds.num_workers=0", "model.validation_ds.num_workers=0"])
    cfg.model.train_ds.manifest_filepath = cfg.model.validation_ds.manifest_filepath = str(clips30)
    model = EncDecCTCModel(cfg=cfg.model)
    parameters = sum(p.numel() for p in model.parameters())
    assert 18e6 < parameters < 20e6 and model.decoder.num_classes_with_blank == len(ALPHABET) + 1


def test_a_config_nemo_cannot_build_is_one_line(tmp_path, clips30, cache):
    """Checked by NeMo itself (after the import, before any training): one line that names the cause."""
    with pytest.raises(HablaError, match=r"cannot build the model from tiny_ctc_char: .*ConvASREncoder.*nope"):
        train("tiny_ctc_char", str(clips30), str(clips30), str(tmp_path / "out"), ["model.encoder.activation=nope"])
    assert not (tmp_path / "out" / "model.nemo").exists()
