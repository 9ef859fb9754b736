"""``habla train --init-from MODEL`` without ``--config``: the checkpoint fine-tuned as it is.

Real NeMo checkpoints of the published classes (tests/fixtures/checkpoints.py: a hybrid RNNT/CTC with a cased,
punctuated unigram tokenizer, a CTC BPE model, a transducer), real training runs and real ``habla``
processes."""

from __future__ import annotations

import io
import json
import re
import tarfile

import pytest
from fixtures.commands import read_jsonl, run_habla, write_manifest

from habla.core.errors import HablaError
from habla.training import finetune
from habla.training.train import train

SMALL = ["global_batch=4", "model.train_ds.batch_size=4", "model.validation_ds.batch_size=4", "trainer.precision=32"]
SMALL += [f"model.{ds}.{k}" for ds in ("train_ds", "validation_ds") for k in ("num_workers=0", "pin_memory=false")]


def _error_lines(result) -> list[str]:
    """stderr without habla's log lines (``HH:MM:SS LEVEL logger: …``): what the user is told."""
    return [line for line in result.stderr.strip().splitlines() if not re.match(r"\d\d:\d\d:\d\d [A-Z]+ ", line)]


def _restored(path):
    from nemo.collections.asr.models import ASRModel

    return ASRModel.restore_from(str(path), map_location="cpu")


def _features(model, clips, n=6):
    """The preprocessed features of the first ``n`` clips (one batch), as NeMo's forward computes them."""
    import soundfile
    import torch

    audio = [torch.tensor(soundfile.read(e["audio_filepath"], dtype="float32")[0]) for e in clips[:n]]
    lengths = torch.tensor([len(a) for a in audio])
    signal = torch.nn.utils.rnn.pad_sequence(audio, batch_first=True)
    return signal, lengths


def _ctc_log_probs(model, signal, lengths):
    import torch

    model.eval()
    with torch.no_grad():
        feats, feat_len = model.preprocessor(input_signal=signal, length=lengths)
        encoded, enc_len = model.encoder(audio_signal=feats, length=feat_len)
        head = model.ctc_decoder if hasattr(model, "ctc_decoder") else model.decoder
        return head(encoder_output=encoded), enc_len


def _joint_logits(model, signal, lengths):
    """The RNNT joint's output for the blank-only prediction state (what greedy decoding starts from)."""
    import torch

    model.eval()
    with torch.no_grad():
        feats, feat_len = model.preprocessor(input_signal=signal, length=lengths)
        encoded, _ = model.encoder(audio_signal=feats, length=feat_len)
        targets = torch.zeros(signal.shape[0], 1, dtype=torch.long)
        pred, _, _ = model.decoder(targets=targets, target_length=torch.ones(signal.shape[0], dtype=torch.long))
        return model.joint.joint(encoded.transpose(1, 2), pred.transpose(1, 2))


# ----------------------------------------------------------------------------------------------- plain checks


def test_the_fine_tuning_config_is_the_checkpoints_own_model_with_nemos_fine_tuning_optimiser(hybrid_checkpoint):
    ck = finetune.read_checkpoint(hybrid_checkpoint)
    assert (ck.class_name, ck.family, ck.is_bpe) == ("EncDecHybridRNNTCTCBPEModel", "hybrid", True)
    raw = finetune.config_dict(ck)
    for part in ("preprocessor", "encoder", "decoder", "joint", "aux_ctc", "tokenizer", "decoding"):
        assert raw["model"][part] == ck.model[part]
    assert raw["model"]["optim"]["name"] == "adamw" and raw["model"]["optim"]["lr"] == 1e-4
    assert raw["model"]["optim"]["sched"]["min_lr"] == 1e-6 and raw["trainer"]["max_epochs"] == 10
    assert raw["trainer"]["max_steps"] == -1 and raw["fine_tune"]["max_warmup_fraction"] == 0.1


def test_dry_run_shows_the_fine_tuning_plan(hybrid_checkpoint, clips30):
    result = run_habla("train", "--init-from", str(hybrid_checkpoint), "--train-manifest", str(clips30),
                       "--dry-run", "--freeze-encoder-steps", "5", "global_batch=4")  # fmt: skip
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    ft = plan["fine_tuning"]
    assert ft["checkpoint_class"] == "EncDecHybridRNNTCTCBPEModel" and ft["freeze_encoder_steps"] == 5
    assert ft["optimizer"]["lr"] == 1e-4 and ft["optimizer"]["min_lr"] == 1e-6 and ft["optimizer"]["name"] == "adamw"
    schedule = plan["schedule"]
    assert schedule["budget_from"] == "max_epochs" and schedule["epochs"] == 10
    # a warmup of 1,000 steps is capped at a tenth of the run
    assert plan["learning_rate"]["warmup_steps"] == schedule["max_steps"] // 10 == ft["optimizer"]["warmup_steps"]


def _fake_nemo(path, target: str, truncate: bool = False):
    config = f"target: {target}\nsample_rate: 16000\n".encode()
    with tarfile.open(path, "w") as tar:
        for name, data in (("./model_config.yaml", config), ("./model_weights.ckpt", b"\0" * 4096)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    if truncate:
        path.write_bytes(path.read_bytes()[:3000])
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: _fake_nemo(p, "nemo.collections.asr.models.EncDecMultiTaskModel"),
         "a EncDecMultiTaskModel, which habla cannot fine-tune; supported: CTC (EncDecCTCModel"),
        (lambda p: _fake_nemo(p, "nemo.collections.asr.models.EncDecCTCModelBPE", truncate=True), "truncated"),
        (lambda p: p.write_bytes(b"not a tar file at all" * 100) and p, "not a readable .nemo, corrupt or truncated"),
    ],
    ids=["canary", "truncated", "not-a-tar"],
)  # fmt: skip
def test_a_checkpoint_habla_cannot_fine_tune_is_one_line(tmp_path, clips30, make, message):
    model = make(tmp_path / "model.nemo") or tmp_path / "model.nemo"
    result = run_habla("train", "--init-from", str(model), "--train-manifest", str(clips30), "--val-manifest",
                       str(clips30), "--out", str(tmp_path / "out"))  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(_error_lines(result)) == 1 and message in _error_lines(result)[0], result.stderr


def test_text_the_tokenizer_cannot_encode_is_one_line_naming_the_characters(tmp_path, hybrid_checkpoint, clips30):
    entries = read_jsonl(clips30)
    entries[0]["text"] += " ж€"
    manifest = write_manifest(entries, tmp_path / "odd.json")
    result = run_habla("train", "--init-from", str(hybrid_checkpoint), "--train-manifest", str(manifest),
                       "--val-manifest", str(clips30), "--out", str(tmp_path / "out"))  # fmt: skip
    assert result.returncode == 2 and len(_error_lines(result)) == 1, result.stderr
    assert "2 character(s)" in result.stderr and "'ж'" in result.stderr and "'€'" in result.stderr
    assert "--config fastconformer_ctc_bpe --init-from" in result.stderr  # the option that re-tokenises


def test_no_config_and_no_checkpoint_is_one_line(tmp_path, clips30):
    result = run_habla("train", "--train-manifest", str(clips30), "--val-manifest", str(clips30), "--out",
                       str(tmp_path / "out"))  # fmt: skip
    assert result.returncode == 2 and "needs --config" in result.stderr and "--init-from" in result.stderr


# ----------------------------------------------------------------------------------------------- training runs


@pytest.mark.slow
@pytest.mark.parametrize("which", ["hybrid_checkpoint", "ctc_bpe_checkpoint", "transducer_checkpoint"])
def test_zero_steps_keep_every_head_exactly(which, request, tmp_path, clips30, cache, one_thread):
    """Before any training the fine-tuned model is the checkpoint: same class, identical log-probs of the kept
    CTC head and identical joint outputs of the kept transducer head."""
    checkpoint = request.getfixturevalue(which)
    summary = train(None, str(clips30), str(clips30), str(tmp_path / "model"), [*SMALL, "trainer.max_steps=0"],
                    init_from=str(checkpoint))  # fmt: skip
    assert summary["steps"] == 0 and summary["fine_tuning"]["checkpoint_class"] == finetune.read_checkpoint(
        checkpoint).class_name  # fmt: skip
    before, after = _restored(checkpoint), _restored(tmp_path / "model" / "model.nemo")
    assert type(after) is type(before)
    assert after.tokenizer.vocab == before.tokenizer.vocab
    signal, lengths = _features(before, read_jsonl(clips30))
    if hasattr(before, "joint"):
        assert _joint_logits(after, signal, lengths).equal(_joint_logits(before, signal, lengths))
    if not hasattr(before, "joint") or hasattr(before, "ctc_decoder"):
        (a, _), (b, _) = _ctc_log_probs(after, signal, lengths), _ctc_log_probs(before, signal, lengths)
        assert (a - b).abs().max().item() == 0.0


@pytest.mark.slow
def test_a_hybrid_fine_tunes_as_a_hybrid_with_both_losses(tmp_path, hybrid_checkpoint, clips30, cache, one_thread):
    """A few steps at the fine-tuning learning rate: still a hybrid (RNNT and CTC heads, its tokenizer), both
    heads trained, the encoder frozen while the heads warm up, most predictions of the checkpoint unchanged."""
    import torch

    summary = train(None, str(clips30), str(clips30), str(tmp_path / "model"), [*SMALL, "trainer.max_epochs=1"],
                    init_from=str(hybrid_checkpoint), freeze_encoder_steps=100)  # fmt: skip
    steps = summary["steps"]
    assert steps == 8  # 30 clips, 4 per step
    ft = summary["fine_tuning"]
    assert ft["freeze_encoder_steps"] == 100 and ft["optimizer"]["lr"] == 1e-4
    assert summary["learning_rate"]["warmup_steps"] == 0  # 1,000 capped at a tenth of 8 steps
    assert summary["final_lr"] == pytest.approx(1e-6, rel=1e-3)  # cosine to min_lr at the last step
    before, after = _restored(hybrid_checkpoint), _restored(tmp_path / "model" / "model.nemo")
    assert type(after).__name__ == "EncDecHybridRNNTCTCBPEModel"
    assert after.cfg.aux_ctc.ctc_loss_weight == before.cfg.aux_ctc.ctc_loss_weight
    assert after.tokenizer.vocab == before.tokenizer.vocab
    # the encoder was frozen for the whole run; both heads trained
    enc_a, enc_b = after.encoder.state_dict(), before.encoder.state_dict()
    assert all(enc_a[k].equal(enc_b[k]) for k in enc_b)
    changed = lambda a, b: any(not a[k].equal(b[k]) for k in b)  # noqa: E731
    assert changed(after.ctc_decoder.state_dict(), before.ctc_decoder.state_dict())
    assert changed(after.joint.state_dict(), before.joint.state_dict())
    signal, lengths = _features(before, read_jsonl(clips30))
    (a, length), (b, _) = _ctc_log_probs(after, signal, lengths), _ctc_log_probs(before, signal, lengths)
    mask = torch.arange(a.shape[1])[None, :] < length[:, None]
    same = (a.argmax(-1) == b.argmax(-1))[mask].float().mean().item()
    assert same > 0.9, same


@pytest.mark.slow
def test_the_cli_fine_tunes_a_ctc_model_from_the_model_store(tmp_path, ctc_bpe_checkpoint, clips30):
    store = tmp_path / "store"
    store.mkdir()
    (store / "stt_es_tiny_ctc.nemo").write_bytes(ctc_bpe_checkpoint.read_bytes())
    result = run_habla("train", "--init-from", "stt_es_tiny_ctc", "--train-manifest", str(clips30),
                       "--val-manifest", str(clips30), "--out", str(tmp_path / "out"), *SMALL, "trainer.max_steps=2",
                       env={"HABLA_MODEL_STORE": str(store), "HABLA_CACHE": str(tmp_path / "cache")})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert summary["steps"] == 2 and summary["init_from"] == "stt_es_tiny_ctc"
    assert summary["fine_tuning"]["checkpoint_class"] == "EncDecCTCModelBPE"
    assert type(_restored(tmp_path / "out" / "model.nemo")).__name__ == "EncDecCTCModelBPE"


def test_load_config_refuses_a_negative_freeze(hybrid_checkpoint):
    from habla.training.train import load_config

    with pytest.raises(HablaError, match="--freeze-encoder-steps must be a whole number"):
        load_config(None, [], str(hybrid_checkpoint), -1)


@pytest.mark.slow
def test_another_config_keeps_the_ctc_head_with_the_checkpoints_tokenizer(tmp_path, hybrid_checkpoint, clips30,
                                                                          cache, one_thread):  # fmt: skip
    """``--config fastconformer_ctc_bpe --init-from HYBRID model.tokenizer.dir=checkpoint``: no hand extraction;
    the hybrid's CTC head is kept with its tokenizer (identical log-probs before training)."""
    overrides = [*SMALL, "trainer.max_steps=0", "model.tokenizer.dir=checkpoint"]
    train("fastconformer_ctc_bpe", str(clips30), str(clips30), str(tmp_path / "model"), overrides,
          init_from=str(hybrid_checkpoint))  # fmt: skip
    before, after = _restored(hybrid_checkpoint), _restored(tmp_path / "model" / "model.nemo")
    assert type(after).__name__ == "EncDecCTCModelBPE" and after.tokenizer.vocab == before.tokenizer.vocab
    signal, lengths = _features(before, read_jsonl(clips30))
    (a, _), (b, _) = _ctc_log_probs(after, signal, lengths), _ctc_log_probs(before, signal, lengths)
    assert (a - b).abs().max().item() == 0.0


def test_the_pipeline_fine_tunes_as_it_is_with_an_empty_config(hybrid_checkpoint, clips30):
    from habla.runs.parameters import RunParameters, _problem
    from habla.training.command import TrainInputs

    inputs = TrainInputs(config="", train_manifest=str(clips30), val_manifest=str(clips30), train_tars=None,
                         val_tars=None, init_from=str(hybrid_checkpoint), overrides=("global_batch=4",))  # fmt: skip
    args = inputs.arguments("/tmp/model")
    assert "--config" not in args and args[args.index("--init-from") + 1] == str(hybrid_checkpoint)
    assert inputs.plan(1, 0)["fine_tuning"]["checkpoint_class"] == "EncDecHybridRNNTCTCBPEModel"
    base = {"release_uri": "s3://b/r.tar.gz", "output_uri": "s3://b/out"}
    assert _problem(RunParameters(**base, config="", init_from="stt_es_fastconformer_hybrid_large_pc")) is None
    with pytest.raises(HablaError, match="config=''"):
        RunParameters(**base, config="")
