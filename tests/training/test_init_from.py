"""--init-from a hybrid RNNT/CTC model (its CTC head) or a transducer (its encoder), named through a model store.

The checkpoints are tiny models built and saved here with NeMo's own classes (no download)."""

from __future__ import annotations

import shutil

import pytest

from habla.core import storage
from habla.core.errors import HablaError
from habla.speech import models
from habla.speech.text import ALPHABET
from habla.training.train import train

pytestmark = pytest.mark.slow

LABELS = list(ALPHABET)


def _tiny_transducer(path, hybrid: bool) -> dict:
    """Save a tiny character EncDecHybridRNNTCTCModel (or EncDecRNNTModel); return its encoder/CTC weights."""
    from nemo.collections.asr.models import EncDecHybridRNNTCTCModel, EncDecRNNTModel
    from omegaconf import OmegaConf

    cfg = {
        "sample_rate": 16000,
        "labels": LABELS,
        "preprocessor": {
            "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
            "sample_rate": 16000,
            "normalize": "per_feature",
            "window_size": 0.02,
            "window_stride": 0.01,
            "features": 64,
            "n_fft": 512,
            "dither": 0.0,
        },  # fmt: skip
        "encoder": {
            "_target_": "nemo.collections.asr.modules.ConvASREncoder",
            "feat_in": 64,
            "activation": "relu",
            "conv_mask": True,
            "jasper": [
                {
                    "filters": 48,
                    "repeat": 1,
                    "kernel": [11],
                    "stride": [2],
                    "dilation": [1],
                    "dropout": 0.0,
                    "residual": False,
                    "separable": True,
                }
            ],
        },  # fmt: skip
        "decoder": {
            "_target_": "nemo.collections.asr.modules.RNNTDecoder",
            "vocab_size": len(LABELS),
            "prednet": {"pred_hidden": 16, "pred_rnn_layers": 1},
        },  # fmt: skip
        "joint": {
            "_target_": "nemo.collections.asr.modules.RNNTJoint",
            "num_classes": len(LABELS),
            "vocabulary": LABELS,
            "jointnet": {"joint_hidden": 16, "activation": "relu", "encoder_hidden": 48, "pred_hidden": 16},
        },  # fmt: skip
        "model_defaults": {"enc_hidden": 48, "pred_hidden": 16},
        "decoding": {"strategy": "greedy_batch", "greedy": {"max_symbols": 5}},
        "loss": {"loss_name": "default"},
        "optim": {"name": "adam", "lr": 0.001},
    }
    if hybrid:
        cfg["aux_ctc"] = {"ctc_loss_weight": 0.3,
                          "decoder": {"_target_": "nemo.collections.asr.modules.ConvASRDecoder", "feat_in": 48,
                                      "num_classes": -1, "vocabulary": LABELS}}  # fmt: skip
    model = (EncDecHybridRNNTCTCModel if hybrid else EncDecRNNTModel)(cfg=OmegaConf.create(cfg))
    model.save_to(str(path))
    state = {f"encoder.{k}": v.clone() for k, v in model.encoder.state_dict().items()}
    if hybrid:
        state.update({f"decoder.{k}": v.clone() for k, v in model.ctc_decoder.state_dict().items()})
    return state


def _restored(path):
    from nemo.collections.asr.models import ASRModel

    return ASRModel.restore_from(str(path), map_location="cpu")


def test_init_from_a_hybrid_keeps_its_encoder_and_ctc_head(tmp_path, clips30, cache, monkeypatch, one_thread):
    store = tmp_path / "store"
    store.mkdir()
    weights = _tiny_transducer(store / "stt_es_tiny_hybrid.nemo", hybrid=True)
    monkeypatch.setenv(models.STORE_ENV, str(store))
    summary = train("tiny_ctc_char", str(clips30), str(clips30), str(tmp_path / "model"), ["trainer.max_steps=0"],
                    init_from="stt_es_tiny_hybrid")  # fmt: skip
    assert summary["steps"] == 0 and summary["init_from"] == "stt_es_tiny_hybrid"
    model = _restored(tmp_path / "model" / "model.nemo")
    assert type(model).__name__ == "EncDecCTCModel" and list(model.decoder.vocabulary) == LABELS
    state = {**{f"encoder.{k}": v for k, v in model.encoder.state_dict().items()},
             **{f"decoder.{k}": v for k, v in model.decoder.state_dict().items()}}  # fmt: skip
    assert state.keys() == weights.keys()
    assert all(state[k].equal(weights[k]) for k in weights)  # 0 steps: exactly the hybrid's encoder and CTC head


def test_init_from_a_transducer_in_an_s3_store_gets_a_new_ctc_head(s3_bucket, tmp_path, clips30, cache,
                                                                   monkeypatch, one_thread):  # fmt: skip
    weights = _tiny_transducer(tmp_path / "rnnt.nemo", hybrid=False)
    storage.upload_file(tmp_path / "rnnt.nemo", f"{s3_bucket}/models/stt_es_tiny_rnnt/stt_es_tiny_rnnt.nemo")
    monkeypatch.setenv(models.STORE_ENV, f"{s3_bucket}/models")
    train("tiny_ctc_char", str(clips30), str(clips30), str(tmp_path / "model"), ["trainer.max_steps=2"],
          init_from="stt_es_tiny_rnnt")  # fmt: skip
    model = _restored(tmp_path / "model" / "model.nemo")
    assert type(model).__name__ == "EncDecCTCModel" and model.decoder.num_classes_with_blank == len(LABELS) + 1
    assert set(model.encoder.state_dict()) == {k.removeprefix("encoder.") for k in weights}

    with pytest.raises(HablaError, match="not in the model store .*stt_es_nothing.nemo"):
        models.resolve_model("stt_es_nothing")
    monkeypatch.delenv(models.STORE_ENV)
    with pytest.raises(HablaError, match="HABLA_MODEL_STORE"):
        models.resolve_model("stt_es_tiny_rnnt")
    shutil.rmtree(tmp_path / "model")


def test_init_from_a_bpe_hybrid_keeps_its_head_with_its_tokenizer(tmp_path, clips30, cache, one_thread):
    """NVIDIA's Spanish hybrid is BPE: with its own tokenizer (model.tokenizer.dir) its CTC head is kept."""
    from fixtures.commands import read_jsonl
    from nemo.collections.asr.models import EncDecHybridRNNTCTCBPEModel
    from nemo.collections.common.tokenizers.sentencepiece_tokenizer import create_spt_model
    from omegaconf import OmegaConf

    text = tmp_path / "text.txt"
    text.write_text("".join(e["text"] + "\n" for e in read_jsonl(clips30)) * 3)
    create_spt_model(str(text), vocab_size=40, sample_size=-1, do_lower_case=False, tokenizer_type="bpe",
                     output_dir=str(tmp_path / "tok"), character_coverage=1.0)  # fmt: skip
    cfg = {
        "sample_rate": 16000,
        "tokenizer": {"dir": str(tmp_path / "tok"), "type": "bpe"},
        "preprocessor": {
            "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
            "sample_rate": 16000,
            "features": 80,
            "window_size": 0.025,
            "window_stride": 0.01,
        },  # fmt: skip
        "encoder": {
            "_target_": "nemo.collections.asr.modules.ConvASREncoder",
            "feat_in": 80,
            "activation": "relu",
            "jasper": [
                {
                    "filters": 32,
                    "repeat": 1,
                    "kernel": [11],
                    "stride": [2],
                    "dilation": [1],
                    "dropout": 0.0,
                    "residual": False,
                    "separable": True,
                }
            ],
        },  # fmt: skip
        "decoder": {
            "_target_": "nemo.collections.asr.modules.RNNTDecoder",
            "prednet": {"pred_hidden": 16, "pred_rnn_layers": 1},
        },  # fmt: skip
        "joint": {
            "_target_": "nemo.collections.asr.modules.RNNTJoint",
            "jointnet": {"joint_hidden": 16, "activation": "relu", "encoder_hidden": 32, "pred_hidden": 16},
        },
        "model_defaults": {"enc_hidden": 32, "pred_hidden": 16},
        "decoding": {"strategy": "greedy_batch", "greedy": {"max_symbols": 5}},
        "aux_ctc": {
            "decoder": {
                "_target_": "nemo.collections.asr.modules.ConvASRDecoder",
                "feat_in": 32,
                "num_classes": -1,
                "vocabulary": [],
            }
        },  # fmt: skip
        "optim": {"name": "adam", "lr": 0.001},
    }
    hybrid = EncDecHybridRNNTCTCBPEModel(cfg=OmegaConf.create(cfg))
    hybrid.save_to(str(tmp_path / "hybrid.nemo"))
    head = {k: v.clone() for k, v in hybrid.ctc_decoder.state_dict().items()}
    overrides = ["trainer.max_steps=0", "trainer.precision=32", f"model.tokenizer.dir={tmp_path / 'tok'}"]
    for split in ("train_ds", "validation_ds"):
        overrides += [f"model.{split}.num_workers=0", f"model.{split}.pin_memory=false"]
    train("fastconformer_ctc_bpe", str(clips30), str(clips30), str(tmp_path / "model"), overrides,
          init_from=str(tmp_path / "hybrid.nemo"))  # fmt: skip
    model = _restored(tmp_path / "model" / "model.nemo")
    assert type(model).__name__ == "EncDecCTCModelBPE" and model.tokenizer.vocab_size == hybrid.tokenizer.vocab_size
    assert all(model.decoder.state_dict()[k].equal(v) for k, v in head.items())  # the hybrid's own CTC head
