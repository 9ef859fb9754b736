"""``--init-from``: fine-tune from a checkpoint, given as a ``.nemo`` path/URI or as a name in a model store.

What can be started from (habla trains CTC models):

* a CTC model (``EncDecCTCModel``, ``EncDecCTCModelBPE``): everything is reused; its decoder is replaced
  only when the vocabulary changes (NeMo's ``change_vocabulary``);
* a hybrid RNNT/CTC model (``EncDecHybridRNNTCTCModel[BPE]``, e.g. NVIDIA's
  ``stt_es_fastconformer_hybrid_large_pc``): its preprocessor, encoder and **CTC head** become a CTC model;
  the transducer decoder and joint network are dropped;
* a transducer (``EncDecRNNTModel[BPE]``, e.g. ``stt_es_conformer_transducer_large``): its preprocessor and
  encoder are reused, under a **new CTC head** (one linear layer, trained from scratch); the transducer's
  prediction and joint networks have no CTC counterpart and are dropped.

The architecture and weights come from the checkpoint; the habla config gives the vocabulary (character
labels, or the tokenizer built from the train text), the data and the optimizer. A head is kept only when
its vocabulary is exactly the new one; to keep a BPE checkpoint's head, point ``model.tokenizer.dir`` at a
folder holding its ``tokenizer.model`` (see docs/training.md). Attention-decoder models (Canary) are refused.

Where the checkpoint comes from (a path, ``s3://``, or a name in ``HABLA_MODEL_STORE``): habla.speech.models.
"""

from __future__ import annotations

import logging

from habla.core.errors import HablaError

log = logging.getLogger("habla.train")

# Config sections of a transducer or hybrid model that a CTC model does not have.
_TRANSDUCER_KEYS = ("joint", "aux_ctc", "decoding", "loss", "model_defaults", "compute_eval_loss", "fused_batch_size")


def _ctc_head(source):
    """The source's CTC decoder module and config, or (None, None) for a transducer."""
    from nemo.collections.asr.models import EncDecCTCModel

    if isinstance(source, EncDecCTCModel):
        return source.decoder, source.cfg.decoder
    if hasattr(source, "ctc_decoder") and "aux_ctc" in source.cfg:
        return source.ctc_decoder, source.cfg.aux_ctc.decoder
    return None, None


def ctc_from(source, cfg, trainer, bpe: bool, tokenizer_dir):
    """A CTC model (``EncDecCTCModelBPE`` if ``bpe``) with the preprocessor and encoder of ``source`` (a hybrid
    RNNT/CTC model or a transducer) and a CTC head: the source's own when its vocabulary is the new one, else
    a new one. Returns it with the config's vocabulary, data and optimizer."""
    from nemo.collections.asr.models import EncDecCTCModel, EncDecCTCModelBPE, EncDecRNNTModel
    from omegaconf import OmegaConf, open_dict

    if not (isinstance(source, EncDecRNNTModel) or hasattr(source, "ctc_decoder")):
        raise HablaError(
            f"--init-from: a {type(source).__name__}; habla starts from CTC, hybrid RNNT/CTC and transducer models"
        )
    head, head_cfg = _ctc_head(source)
    new = OmegaConf.create(OmegaConf.to_container(source.cfg, resolve=True))
    with open_dict(new):
        for key in _TRANSDUCER_KEYS:
            new.pop(key, None)
        if head_cfg is not None:
            new.decoder = OmegaConf.create(OmegaConf.to_container(head_cfg, resolve=True))
        else:
            new.decoder = {"_target_": "nemo.collections.asr.modules.ConvASRDecoder",
                           "feat_in": int(source.encoder._feat_out), "num_classes": -1, "vocabulary": []}  # fmt: skip
        new.train_ds, new.validation_ds, new.optim = cfg.model.train_ds, cfg.model.validation_ds, cfg.model.optim
        new.pop("test_ds", None)
        if bpe:
            new.pop("labels", None)
            new.tokenizer = {"dir": str(tokenizer_dir), "type": "bpe"}
            new.decoder.vocabulary = None
        else:
            new.pop("tokenizer", None)
            new.labels = list(cfg.model.labels)
            new.decoder.vocabulary = list(cfg.model.labels)
        new.decoder.num_classes = -1
    model_class = EncDecCTCModelBPE if bpe else EncDecCTCModel
    with open_dict(new):
        new.target = f"{model_class.__module__}.{model_class.__name__}"  # what restore_from instantiates
    model = model_class(cfg=new, trainer=trainer)
    model.preprocessor.load_state_dict(source.preprocessor.state_dict())
    model.encoder.load_state_dict(source.encoder.state_dict())
    kept = head is not None and list(head.vocabulary) == list(model.decoder.vocabulary)
    if kept:
        model.decoder.load_state_dict(head.state_dict())
    log.info(
        "init-from: %s -> %s: preprocessor and encoder reused, %s",
        type(source).__name__,
        type(model).__name__,
        "its CTC head kept" if kept else ("a new CTC head (other vocabulary)" if head else "a new CTC head"),
    )
    return model
