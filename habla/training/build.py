"""NeMo's Lightning trainer and ASR model, built from a run's resolved config (the slow imports live here).

A model is built from the config, from a checkpoint as it is (``--init-from`` without ``--config``:
habla.training.finetune), or from the config with a checkpoint's weights where they fit (``--config NAME
--init-from MODEL``: a new decoder when the vocabulary differs; another class's encoder under a CTC head,
habla.training.init_from).
"""

from __future__ import annotations

import logging
from pathlib import Path

from habla.core.errors import HablaError, one_line
from habla.training import config as train_config
from habla.training import finetune, output, tokenizer, topology

log = logging.getLogger("habla.train")

FULL_PRECISION = ("32", "32-true", "64", "64-true")


def build_trainer(cfg, where: topology.Topology, paths: output.RunPaths, progress, freeze_encoder_steps: int = 0):
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger
    from omegaconf import OmegaConf

    from habla.training.callbacks import FreezeEncoder, LogSync, MirroredCheckpointIO

    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    on_gpu = torch.cuda.is_available() and str(kwargs.get("accelerator") or "auto") in ("auto", "gpu", "cuda")
    if not on_gpu and str(kwargs.get("precision", "32")) not in FULL_PRECISION:
        # The GPU configs train in bf16-mixed; on a CPU that is slow and changes nothing worth having.
        log.info("no GPU: trainer.precision %s -> 32 (fp32 on CPU)", kwargs["precision"])
        kwargs["precision"] = cfg.trainer.precision = 32
    plugins = []
    if where.is_distributed:
        kwargs["num_nodes"], kwargs["devices"] = where.nodes, where.devices
        if kwargs.get("strategy") in (None, "auto"):
            # a frozen encoder gets no gradients: DDP must not wait for them
            kwargs["strategy"] = "ddp_find_unused_parameters_true" if freeze_encoder_steps else "ddp"
        if kwargs.get("accelerator") in (None, "auto"):
            kwargs["accelerator"] = "gpu" if torch.cuda.is_available() else "cpu"
        if where.one_process_per_node:
            from lightning.pytorch.plugins.environments import KubeflowEnvironment

            plugins.append(KubeflowEnvironment())
    log_sync = LogSync(paths.work / "logs", paths.dst.logs) if paths.remote else None
    mirror = MirroredCheckpointIO(paths.dst.checkpoints, after_upload=log_sync) if paths.remote else None
    if mirror is not None:
        plugins.append(mirror)
    checkpoint = ModelCheckpoint(
        dirpath=str(paths.work / "checkpoints"),
        filename="step={step}-val_wer={val_wer:.4f}",
        auto_insert_metric_name=False,
        **OmegaConf.to_container(cfg.get("checkpoint") or OmegaConf.create({}), resolve=True),
    )
    logger = TensorBoardLogger(save_dir=str(paths.work), name="logs")
    callbacks = [progress, checkpoint] + ([FreezeEncoder(freeze_encoder_steps)] if freeze_encoder_steps else [])
    trainer = pl.Trainer(
        **kwargs, logger=logger, callbacks=callbacks, enable_checkpointing=True, plugins=plugins or None
    )
    return trainer, log_sync, mirror


def _restore_as_it_is(cfg, trainer, checkpoint: finetune.Checkpoint):
    """The checkpoint as its own class (preprocessor, encoder, heads, tokenizer, losses), with habla's data
    and the fine-tuning optimiser (habla.training.finetune)."""
    model = _restore(checkpoint.path, trainer)
    if type(model).__name__ != checkpoint.class_name:
        raise HablaError(f"--init-from {checkpoint.path}: restored as {type(model).__name__}, not "
                         f"{checkpoint.class_name} as its config says")  # fmt: skip
    _use_run_data(model, cfg)
    ctc_weight = (cfg.model.get("aux_ctc") or {}).get("ctc_loss_weight")
    losses = "" if ctc_weight is None else f"; RNNT and CTC losses, CTC weight {ctc_weight}"
    log.info("init-from: fine-tuning %s as it is (preprocessor, encoder, tokenizer and heads kept%s)",
             checkpoint.class_name, losses)  # fmt: skip
    return model


def _restore(path: Path, trainer):
    """The .nemo at ``path``, restored on the CPU; one line if it is not one."""
    from nemo.collections.asr.models import ASRModel

    try:
        return ASRModel.restore_from(str(path), trainer=trainer, map_location="cpu")
    except Exception as exc:
        raise HablaError(f"--init-from {path}: cannot restore a NeMo model ({one_line(exc)})") from None


def _use_run_data(model, cfg) -> None:
    """A restored model trains on this run's data with this run's optimiser (its own are the checkpoint's)."""
    from omegaconf import open_dict

    with open_dict(model.cfg):
        model.cfg.train_ds = cfg.model.train_ds
        model.cfg.validation_ds = cfg.model.validation_ds
        model.cfg.optim = cfg.model.optim
    model.setup_training_data(model.cfg.train_ds)
    model.setup_validation_data(model.cfg.validation_ds)


def build_model(cfg, trainer, kind: str, init_from: Path | None, tokenizer_dir: Path | None, checkpoint=None):
    from nemo.collections.asr.models import EncDecCTCModel, EncDecCTCModelBPE

    from habla.training.init_from import ctc_from

    if checkpoint is not None:
        return _restore_as_it_is(cfg, trainer, checkpoint)
    if init_from is None:
        return model_class(kind)(cfg=cfg.model, trainer=trainer)

    model = _restore(init_from, trainer)
    if not isinstance(model, EncDecCTCModel):  # hybrid RNNT/CTC or transducer: its encoder under a CTC head
        model = ctc_from(model, cfg, trainer, kind == train_config.BPE, tokenizer_dir)
    is_bpe = isinstance(model, EncDecCTCModelBPE)
    if is_bpe != (kind == train_config.BPE):
        raise HablaError(
            f"--init-from {init_from} is a {'BPE' if is_bpe else 'character'} model but the config is "
            f"{'BPE' if kind == train_config.BPE else 'character'}-based; choose a matching config"
        )
    # The .nemo provides the architecture and the weights; the config provides vocabulary, data and optimizer.
    if kind == train_config.CHAR:
        labels = list(cfg.model.labels)
        if list(model.decoder.vocabulary) != labels:
            log.info(
                "init-from: vocabulary %d -> %d characters (new decoder)", len(model.decoder.vocabulary), len(labels)
            )
            model.change_vocabulary(new_vocabulary=labels)
    else:
        new_pieces = tokenizer.pieces(tokenizer_dir / "tokenizer.model")
        if list(model.tokenizer.vocab) != new_pieces:
            log.info("init-from: tokenizer %d -> %d pieces (new decoder)", model.tokenizer.vocab_size, len(new_pieces))
            model.change_vocabulary(new_tokenizer_dir=str(tokenizer_dir), new_tokenizer_type="bpe")
    _use_run_data(model, cfg)
    return model


def model_class(kind: str):
    from nemo.collections.asr.models import EncDecCTCModel, EncDecCTCModelBPE

    return EncDecCTCModelBPE if kind == train_config.BPE else EncDecCTCModel
