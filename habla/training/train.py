"""``habla train``: train a NeMo CTC model from a YAML config on NeMo manifests, on one CPU or many GPUs/nodes.

    habla train --config tiny_ctc_char --train-manifest M --val-manifest M --out DST \\
        [--train-tars 's3://…/audio__OP_0..N_CL_.tar'] [--init-from MODEL.nemo] [--resume] [key=value …]

DST (local or ``s3://``) receives ``model.nemo``, ``checkpoints/`` (``last.ckpt`` + the best by validation
WER), ``logs/`` (TensorBoard), ``tokenizer/`` (BPE configs), ``config.yaml`` (the resolved config) and
``train_summary.json``. Everything that can be checked before training is checked first, most of it before
the slow NeMo import: the config and overrides, the manifests, that every audio file exists (S3 audio is
downloaded into the cache; tar shards must exist), that a sample decodes, and that the vocabulary covers
every character of the train text. The batch, the gradient accumulation and the run's length in steps (which
NeMo sizes the LR schedule from) are decided there too, from the data and the world size (training.budget).

Distributed: the same command runs under torchrun, a Kubeflow TrainJob or a PyTorchJob (training.topology);
Lightning's DDP is configured from the environment. Only rank 0 writes artifacts, after a barrier; every
rank returns normally.

Checkpoints of an ``s3://`` DST are written to a local folder in the cache and uploaded by rank 0 after
each save. ``--resume`` looks for ``DST/checkpoints/last.ckpt``; every rank downloads it into its own local
folder before training (nodes share no filesystem). Every rank takes the same decision because nothing is
written to DST until all ranks have joined the process group, which happens after this check.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from habla.core import jsonl, storage
from habla.core.errors import HablaError, one_line
from habla.core.layout import TrainLayout
from habla.data.text import uncovered_characters
from habla.training import budget, manifests, topology
from habla.training import config as train_config
from habla.training.init_from import resolve as resolve_init_from

log = logging.getLogger("habla.train")

TOKENIZER_SEED = 1234  # every rank builds the same tokenizer from the same text
FULL_PRECISION = ("32", "32-true", "64", "64-true")


# ------------------------------------------------------------------------------------------ locations


@dataclass(frozen=True)
class RunPaths:
    """Where a run's files live: ``dst`` the user's DST; ``work`` the local folder Lightning writes to (DST
    itself when local); ``scratch`` local files of this run that are not outputs (localised manifests)."""

    dst: TrainLayout
    work: Path
    scratch: Path

    @property
    def remote(self) -> bool:
        return storage.is_s3(self.dst.root)

    @classmethod
    def for_dst(cls, dst: str) -> RunPaths:
        dst = storage.absolute(dst).rstrip("/")
        run_dir = manifests.cache_root() / "runs" / hashlib.sha1(dst.encode()).hexdigest()[:16]
        work = run_dir / "work" if storage.is_s3(dst) else Path(dst)
        return cls(dst=TrainLayout(dst), work=work, scratch=run_dir)


# ------------------------------------------------------------------------------------------- checks


def _check_characters(texts: list[str], vocabulary: Sequence[str], what: str) -> None:
    """NeMo's char parser lower-cases; anything else outside the vocabulary would be trained as ⁇."""
    missing = uncovered_characters((t.strip().lower() for t in texts), vocabulary)
    if missing:
        shown = " ".join(repr(c) for c in sorted(missing)[:12])
        raise HablaError(
            f"the train text uses {len(missing)} character(s) the {what} lacks: {shown} "
            "(normalize the text with habla prepare, or add them to the vocabulary)"
        )


def _check_tokenizer(model_file: Path, texts: list[str]) -> None:
    """Every character of the train text must encode to something other than SentencePiece's unknown piece."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    chars = {c for t in texts for c in t if not c.isspace()}
    missing = sorted(c for c in chars if sp.unk_id() in sp.encode(c))
    if missing:
        shown = " ".join(repr(c) for c in missing[:12])
        raise HablaError(f"the train text uses {len(missing)} character(s) the tokenizer {model_file} lacks: {shown}")


def _tokenizer_pieces(model_file: Path) -> list[str]:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    return [sp.id_to_piece(i) for i in range(sp.get_piece_size())]


def _prepare_data(
    cfg, paths: RunPaths, train_manifest: str, val_manifest: str, train_tars: str | None, world_size: int
):
    """Read, check and localise the manifests; point the config at them. Returns the train entries."""
    train_entries = manifests.read_manifest(train_manifest)
    val_entries = manifests.read_manifest(val_manifest)
    local_manifests = paths.scratch / "manifests"
    ds = cfg.model.train_ds
    if train_tars:
        tars = manifests.check_tar_shards(train_tars, train_manifest)
        manifests.check_tar_sample(tars[0], manifests.expand_shards(train_manifest)[0])
        _check_shard_count(len(tars), world_size, int(ds.get("num_workers") or 0))
        # Tarred shards stream through Lhotse (also from s3://): no copy; the epoch length and the dynamic
        # bucketing are set with the rest of the budget (habla.training.budget).
        ds.manifest_filepath = train_manifest
        ds.tarred_audio_filepaths = train_tars
        ds.is_tarred = True
        ds.use_lhotse = True
        cfg.trainer.use_distributed_sampler = False
        for key in ("shuffle_buffer_size", "bucket_buffer_size"):
            if ds.get(key) is None:
                # Lhotse fills these buffers before every epoch's first batch; its default (10,000 utterances)
                # over a smaller set would read that set many times over first (measured: 20x slower on 120 clips).
                ds[key] = min(10_000, len(train_entries))
    else:
        if ds.get("is_tarred"):
            raise HablaError("model.train_ds.is_tarred is set: give the tar shards with --train-tars")
        train_entries = manifests.localize(train_entries, train_manifest)
        manifests.check_audio_readable(train_entries)
        ds.manifest_filepath = str(local_manifests / "train_manifest.json")
        manifests.write_manifest(train_entries, ds.manifest_filepath)
    val_entries = manifests.localize(val_entries, val_manifest)
    manifests.check_audio_readable(val_entries)
    cfg.model.validation_ds.manifest_filepath = str(local_manifests / "val_manifest.json")
    manifests.write_manifest(val_entries, cfg.model.validation_ds.manifest_filepath)
    log.info(
        "train: %d utterances, %.2f h%s; validation: %d utterances, %.2f h",
        len(train_entries), manifests.total_hours(train_entries), " (tar shards)" if train_tars else "",
        len(val_entries), manifests.total_hours(val_entries),
    )  # fmt: skip
    return train_entries


def _check_shard_count(shards: int, world_size: int, workers: int) -> None:
    """Each rank's loader workers stream the shards in their own random order (Lhotse): with fewer shards
    than world size × workers, several read the same shard at once and batches repeat clips; NeMo's
    non-Lhotse tarred loader also needs the count to be a multiple (habla prepare --world-size sizes it)."""
    readers = world_size * max(1, workers)
    if shards % readers:
        log.warning(
            "%d tar shards for %d rank(s) × %d loader worker(s): not a multiple of %d; prepare the data with "
            "habla prepare --format tar --shards <a multiple of %d> (or set model.train_ds.num_workers)",
            shards, world_size, max(1, workers), readers, readers,
        )  # fmt: skip


def _pull_from_dst(paths: RunPaths, resume: bool) -> str | None:
    """The checkpoint to resume from (made local), or None. Refuses to mix a new run into an old DST."""
    remote_last = paths.dst.last_checkpoint
    has_checkpoint = storage.exists(remote_last)
    if not resume and (has_checkpoint or storage.exists(paths.dst.model)):
        raise HablaError(
            f"{paths.dst.root} already holds a training run: pass --resume to continue it, or choose another --out"
        )
    if not (resume and has_checkpoint):
        if resume:
            log.info("--resume: no checkpoint in %s yet, starting at step 0", paths.dst.root)
        if paths.remote:
            # A working copy left on this disk by an earlier run of this DST would be taken for this run's
            # (Lightning renames a new last.ckpt to last-v1.ckpt next to a stale one; old TensorBoard files).
            shutil.rmtree(paths.work, ignore_errors=True)
        return None
    local_last = paths.work / "checkpoints" / storage.name(remote_last)
    if paths.remote:
        log.info("--resume: fetching %s", remote_last)
        storage.download_file(remote_last, local_last)
    return str(local_last)


def _build_tokenizer(cfg, texts: list[str], scratch: Path) -> Path:
    """A SentencePiece tokenizer of the train text, in a local folder named after its inputs.

    Every rank builds it (no rank waits for another before the process group exists): the same text, settings
    and seed give the same pieces. Ranks sharing a disk share the folder (built aside, renamed into place).
    """
    tok = cfg.model.tokenizer
    settings = {"vocab_size": int(tok.get("vocab_size", 256)), "spe_type": str(tok.get("spe_type", "bpe")),
                "character_coverage": float(tok.get("character_coverage", 1.0))}  # fmt: skip
    digest = hashlib.sha1(json.dumps([settings, texts], ensure_ascii=False).encode()).hexdigest()[:16]
    folder = scratch / "tokenizers" / digest
    if (folder / "tokenizer.model").is_file():
        return folder
    import sentencepiece
    from nemo.collections.common.tokenizers.sentencepiece_tokenizer import create_spt_model

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=folder.parent))
    try:
        text_file = tmp / "text.txt"
        text_file.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
        sentencepiece.set_random_generator_seed(TOKENIZER_SEED)
        create_spt_model(
            str(text_file), vocab_size=settings["vocab_size"], sample_size=-1, do_lower_case=False,
            tokenizer_type=settings["spe_type"], output_dir=str(tmp / "out"),
            character_coverage=settings["character_coverage"],
        )  # fmt: skip
        try:
            os.rename(tmp / "out", folder)  # atomic; another rank on this disk may have won the race
        except OSError:
            if not (folder / "tokenizer.model").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("tokenizer: %d pieces from %d sentences", len(_tokenizer_pieces(folder / "tokenizer.model")), len(texts))
    return folder


def _publish_tokenizer(folder: Path, paths: RunPaths, resuming: bool, rank_zero: bool) -> None:
    """DST/tokenizer is the tokenizer of the run; a resumed run must have rebuilt exactly the same one."""
    published = storage.join(paths.dst.tokenizer, "tokenizer.model")
    if resuming and storage.exists(published):
        with tempfile.TemporaryDirectory() as tmp:
            storage.download_file(published, Path(tmp) / "tokenizer.model")
            if _tokenizer_pieces(Path(tmp) / "tokenizer.model") != _tokenizer_pieces(folder / "tokenizer.model"):
                raise HablaError(
                    f"the tokenizer built now differs from {published}, which the checkpoint was trained with: "
                    "the train text or model.tokenizer settings changed; resume with the same ones or use a new --out"
                )
    elif rank_zero:
        for path in sorted(folder.iterdir()):
            if path.is_file():
                storage.upload_file(path, storage.join(paths.dst.tokenizer, path.name))


# ------------------------------------------------------------------------------------------- NeMo


def _build_trainer(cfg, where: topology.Topology, paths: RunPaths, progress):
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger
    from omegaconf import OmegaConf

    from habla.training.callbacks import LogSync, MirroredCheckpointIO

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
            kwargs["strategy"] = "ddp"
        if kwargs.get("accelerator") in (None, "auto"):
            kwargs["accelerator"] = "gpu" if torch.cuda.is_available() else "cpu"
        if where.one_process_per_node:
            from lightning.pytorch.plugins.environments import KubeflowEnvironment

            plugins.append(KubeflowEnvironment())
    log_sync = LogSync(paths.work / "logs", paths.dst.logs) if paths.remote else None
    if paths.remote:
        plugins.append(MirroredCheckpointIO(paths.dst.checkpoints, after_upload=log_sync))
    checkpoint = ModelCheckpoint(
        dirpath=str(paths.work / "checkpoints"),
        filename="step={step}-val_wer={val_wer:.4f}",
        auto_insert_metric_name=False,
        **OmegaConf.to_container(cfg.get("checkpoint") or OmegaConf.create({}), resolve=True),
    )
    logger = TensorBoardLogger(save_dir=str(paths.work), name="logs")
    trainer = pl.Trainer(
        **kwargs, logger=logger, callbacks=[progress, checkpoint], enable_checkpointing=True, plugins=plugins or None
    )
    return trainer, log_sync


def _build_model(cfg, trainer, kind: str, init_from: Path | None, tokenizer_dir: Path | None):
    from nemo.collections.asr.models import ASRModel, EncDecCTCModel, EncDecCTCModelBPE
    from omegaconf import open_dict

    from habla.training.init_from import ctc_from

    if init_from is None:
        model_class = EncDecCTCModelBPE if kind == train_config.BPE else EncDecCTCModel
        return model_class(cfg=cfg.model, trainer=trainer)

    try:
        model = ASRModel.restore_from(str(init_from), trainer=trainer, map_location="cpu")
    except Exception as exc:
        raise HablaError(f"--init-from {init_from}: cannot restore a NeMo model ({one_line(exc)})") from None
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
        new_pieces = _tokenizer_pieces(tokenizer_dir / "tokenizer.model")
        if list(model.tokenizer.vocab) != new_pieces:
            log.info("init-from: tokenizer %d -> %d pieces (new decoder)", model.tokenizer.vocab_size, len(new_pieces))
            model.change_vocabulary(new_tokenizer_dir=str(tokenizer_dir), new_tokenizer_type="bpe")
    with open_dict(model.cfg):
        model.cfg.train_ds = cfg.model.train_ds
        model.cfg.validation_ds = cfg.model.validation_ds
        model.cfg.optim = cfg.model.optim
    model.setup_training_data(model.cfg.train_ds)
    model.setup_validation_data(model.cfg.validation_ds)
    return model


def _shutdown_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------- train


def train(
    config: str,
    train_manifest: str,
    val_manifest: str,
    out: str,
    overrides: Sequence[str] = (),
    init_from: str | None = None,
    resume: bool = False,
    train_tars: str | None = None,
) -> dict:
    """Train a model; write DST/model.nemo, checkpoints, logs, tokenizer and DST/train_summary.json.

    Returns the summary (the same dict on every rank; ``written_by_this_rank`` is True on rank 0).
    Raises HablaError for any problem with the inputs, before training starts.
    """
    started = time.time()
    place = topology.detect()
    topology.export_for_lightning(place)
    log.info("habla train: %s", topology.describe(place))

    # 1. Checks that need no NeMo: config, output, manifests, audio, vocabulary.
    cfg = train_config.load(config, overrides)
    kind = train_config.model_kind(cfg)
    storage.check_writable_root(out)
    paths = RunPaths.for_dst(out)
    train_entries = _prepare_data(cfg, paths, train_manifest, val_manifest, train_tars, place.world_size)
    plan = budget.plan(cfg, train_entries, place.world_size, streamed=bool(train_tars))
    budget.apply(cfg, plan, streamed=bool(train_tars))
    for line in budget.describe(plan):
        log.info(line)
    warning = budget.global_batch_warning(plan)
    if warning:
        log.warning(warning)
    texts = [e["text"] for e in train_entries]
    if kind == train_config.CHAR:
        _check_characters(texts, cfg.model.labels, "vocabulary (model.labels)")
    elif cfg.model.tokenizer.get("dir"):
        user_tokenizer = Path(cfg.model.tokenizer.dir) / "tokenizer.model"
        if not user_tokenizer.is_file():
            raise HablaError(f"model.tokenizer.dir: {user_tokenizer} not found")
        _check_tokenizer(user_tokenizer, texts)
    init_local = manifests.fetch_model(resolve_init_from(init_from), "--init-from") if init_from else None
    ckpt_path = _pull_from_dst(paths, resume)

    # 2. NeMo and Lightning (slow imports).
    train_config.check_against_signatures(cfg)
    from omegaconf import OmegaConf

    from habla.training.callbacks import TrainingProgress

    tokenizer_dir = None
    if kind == train_config.BPE:
        if cfg.model.tokenizer.get("dir"):
            tokenizer_dir = Path(cfg.model.tokenizer.dir)
        else:
            tokenizer_dir = _build_tokenizer(cfg, texts, paths.scratch)
            _check_tokenizer(tokenizer_dir / "tokenizer.model", texts)
            cfg.model.tokenizer.dir = str(tokenizer_dir)
        _publish_tokenizer(tokenizer_dir, paths, ckpt_path is not None, place.is_rank_zero)

    progress = TrainingProgress(cfg.model.sample_rate, int(cfg.trainer.get("max_steps") or -1))
    trainer, log_sync = _build_trainer(cfg, place, paths, progress)
    try:
        model = _build_model(cfg, trainer, kind, init_local, tokenizer_dir)
    except HablaError:
        raise
    except Exception as exc:  # a config NeMo cannot build (bad encoder arguments, ...)
        raise HablaError(f"cannot build the model from {config}: {type(exc).__name__}: {one_line(exc)}") from None
    log.info("model: %s, %.2f M parameters", type(model).__name__, sum(p.numel() for p in model.parameters()) / 1e6)

    # 3. Train, then one validation of the final weights unless the last one already was (all ranks).
    trainer.fit(model, ckpt_path=ckpt_path)
    final_lr = float(trainer.optimizers[0].param_groups[0]["lr"]) if trainer.optimizers else None
    val_wer = progress.last_val_wer if progress.last_val_step == trainer.global_step else None
    if val_wer is None:
        results = trainer.validate(model, verbose=False)
        val_wer = float(results[0]["val_wer"]) if results and "val_wer" in results[0] else None

    # utterances per optimizer step (unknown when resumed from a checkpoint that did not count them)
    counted = progress.start_step == 0 or progress.utterances_before > 0
    measured = progress.utterances / trainer.global_step if trainer.global_step and counted else None
    note = budget.measured_batch_warning(plan, measured)
    if note and trainer.is_global_zero:
        log.warning(note)
    summary = {
        "world_size": trainer.world_size,
        "nodes": trainer.num_nodes,
        "devices": trainer.num_devices,
        "steps": trainer.global_step,
        "epochs": trainer.current_epoch,
        "wall_seconds": round(time.time() - started, 1),
        "audio_hours_seen": round(progress.audio_seconds / 3600, 6),
        "utterances_seen": progress.utterances,
        "final_train_loss": progress.last_loss,
        "val_wer": val_wer,
        "config": config,
        "init_from": init_from,
        "overrides": list(overrides),
        "resumed_from_step": progress.start_step,
        "fit_seconds": round(progress.fit_seconds, 1),
        "precision": str(cfg.trainer.precision),
        "final_lr": final_lr,
        **plan.as_summary(),
    }
    summary["batch"]["measured_global_batch"] = None if measured is None else round(measured, 2)

    # 4. Rank 0 writes the artifacts; the other ranks leave without any further collective.
    trainer.strategy.barrier("habla-train-artifacts")
    summary["written_by_this_rank"] = trainer.is_global_zero
    if trainer.is_global_zero:
        with tempfile.TemporaryDirectory(prefix="habla-model-") as tmp:
            local_model = Path(tmp) / "model.nemo"
            model.save_to(str(local_model))
            storage.upload_file(local_model, paths.dst.model)
        if log_sync:
            log_sync()
        storage.write_text(paths.dst.config, OmegaConf.to_yaml(cfg))
        public = {k: v for k, v in summary.items() if k != "written_by_this_rank"}
        storage.write_text(paths.dst.summary, jsonl.dump(jsonl.finite_or_null(public), indent=2) + "\n")
        log.info("rank 0 wrote %s and %s (steps %d, val WER %s)", paths.dst.model, paths.dst.summary,
                 summary["steps"], "n/a" if val_wer is None else f"{val_wer:.4f}")  # fmt: skip
    else:
        log.info("rank %d done; rank 0 writes the artifacts", trainer.global_rank)
    _shutdown_process_group()
    return summary
