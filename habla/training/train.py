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

import copy
import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from habla.core import jsonl, state, storage
from habla.core.errors import HablaError, one_line
from habla.speech import manifests, models
from habla.training import budget, build, finetune, output, tokenizer, topology
from habla.training import config as train_config

log = logging.getLogger("habla.train")


def _prepare_data(
    cfg, paths: output.RunPaths, train_manifest: str, val_manifest: str, train_tars: str | None, world_size: int,
    val_tars: str | None = None,
):  # fmt: skip
    """Read, check and localise the manifests; point the config at them. Returns the train entries. Validation
    audio is always made local (a tarred dev split is read out of its tars once)."""
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
        if ds.get("augmentor"):
            log.warning("model.train_ds.augmentor (speed perturbation) is not applied to tar shards: NeMo's Lhotse "
                        "loader ignores it (train on WAV manifests to have it)")  # fmt: skip
        ds.manifest_filepath = train_manifest
        ds.tarred_audio_filepaths = train_tars
        ds.is_tarred = True
        ds.use_lhotse = True
        cfg.trainer.use_distributed_sampler = False
    else:
        if ds.get("is_tarred"):
            raise HablaError("model.train_ds.is_tarred is set: give the tar shards with --train-tars")
        train_entries = manifests.localize(train_entries, train_manifest)
        manifests.check_audio_readable(train_entries)
        ds.manifest_filepath = str(local_manifests / "train_manifest.json")
        manifests.write_manifest(train_entries, ds.manifest_filepath)
    val_entries = manifests.localize(val_entries, val_manifest, tars=val_tars)
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


def _pull_from_dst(paths: output.RunPaths, resume: bool) -> str | None:
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


def _shutdown_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------- train


@dataclass
class Run:
    """What train() decided before the slow imports: the config (with the plan applied), the config as
    loaded (the plan is redone from it after a GPU batch search), the data, the place in the job, the plan."""

    cfg: object  # DictConfig
    loaded: object  # DictConfig, before budget.apply
    kind: str
    config: str
    overrides: tuple[str, ...]
    init_from: str | None
    init_local: Path | None
    entries: list[dict]
    place: topology.Topology
    paths: output.RunPaths
    plan: budget.Budget
    streamed: bool
    checkpoint: finetune.Checkpoint | None = None  # --init-from without --config: fine-tuned as it is

    @property
    def texts(self) -> list[str]:
        return [e["text"] for e in self.entries]

    def replan(self, measured_capacity: float) -> None:
        """The plan for the capacity a GPU was measured to hold (habla.training.sizing)."""
        self.plan = budget.plan(self.loaded, self.entries, self.place.world_size, self.streamed,
                                devices_per_node=self.place.devices, measured_capacity=measured_capacity)  # fmt: skip
        budget.apply(self.cfg, self.plan, self.streamed)
        _log_plan(self.plan)


def _log_plan(plan: budget.Budget, memory_limit_gib: float | None = None) -> None:
    """The plan's lines, its cautions, and whether this container's memory holds what the plan asks of a node."""
    for line in budget.describe(plan):
        log.info(line)
    for warning in budget.cautions(plan):
        log.warning(warning)
    if memory_limit_gib is not None and memory_limit_gib < plan.node.memory_gib:
        log.warning(
            "this container's memory limit, %.0f GiB, is below the %s the plan asks of a node for its %d "
            "process(es) and their loader workers: expect them to be killed for memory; request more memory "
            "or lower resources.loader_worker_memory_gib / the loader's num_workers",
            memory_limit_gib, plan.node.memory, plan.node.processes,
        )  # fmt: skip


NEEDS_CONFIG = "habla train needs --config NAME|PATH, or --init-from MODEL to fine-tune a checkpoint as it is"


def load_config(
    config: str | None, overrides: Sequence[str], init_from: str | None, freeze_encoder_steps: int | None = None
):
    """The run's config, its label, and the checkpoint fine-tuned as it is (None with ``--config``)."""
    overrides = list(overrides)
    if freeze_encoder_steps is not None:
        steps = freeze_encoder_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise HablaError(f"--freeze-encoder-steps must be a whole number >= 0 (got {freeze_encoder_steps!r})")
        overrides.append(f"fine_tune.freeze_encoder_steps={freeze_encoder_steps}")
    if config:  # another architecture's config: the checkpoint is read when the model is built
        return train_config.load(config, overrides), config, None
    if not init_from:
        raise HablaError(NEEDS_CONFIG)
    checkpoint = finetune.read_checkpoint(models.fetch_model(models.resolve_model(init_from), "--init-from"))
    cfg = train_config.load_mapping(finetune.config_dict(checkpoint), f"--init-from {init_from}", overrides)
    return cfg, f"init-from:{init_from}", checkpoint


def plan_run(
    config: str | None,
    train_manifest: str,
    overrides: Sequence[str] = (),
    train_tars: str | None = None,
    nodes: int = 1,
    gpus_per_node: int = 0,
    init_from: str | None = None,
    freeze_encoder_steps: int | None = None,
) -> dict:
    """The plan of a run on ``nodes`` × ``gpus_per_node`` (0: one CPU process per node), from the config (or
    the checkpoint fine-tuned as it is) and the train manifest's durations alone (``habla train --dry-run``):
    nothing is built, no audio is read."""
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise HablaError(f"--nodes must be a whole number >= 1 (got {nodes!r})")
    if isinstance(gpus_per_node, bool) or not isinstance(gpus_per_node, int) or gpus_per_node < 0:
        raise HablaError(f"--gpus-per-node must be a whole number >= 0 (got {gpus_per_node!r})")
    cfg, _, checkpoint = load_config(config, overrides, init_from, freeze_encoder_steps)
    devices = max(1, gpus_per_node)
    plan = budget.plan(cfg, manifests.read_manifest(train_manifest), nodes * devices, streamed=bool(train_tars),
                       devices_per_node=devices)  # fmt: skip
    budget.apply(cfg, plan, bool(train_tars))
    return {
        "world": {"nodes": nodes, "gpus_per_node": gpus_per_node, "world_size": nodes * devices},
        **({"fine_tuning": finetune.plan_note(cfg)} if checkpoint is not None else {}),
        **plan.as_summary(),
        "described": budget.describe(plan),  # the lines habla train logs when it starts
        "warnings": budget.cautions(plan),
    }


def train(
    config: str | None,
    train_manifest: str,
    val_manifest: str,
    out: str,
    overrides: Sequence[str] = (),
    init_from: str | None = None,
    resume: bool = False,
    train_tars: str | None = None,
    freeze_encoder_steps: int | None = None,
    val_tars: str | None = None,
) -> dict:
    """Train a model; write DST/model.nemo, checkpoints, logs, tokenizer and DST/train_summary.json.

    ``config`` None with ``init_from``: fine-tune the checkpoint as it is (habla.training.finetune).

    Returns the summary (the same dict on every rank; ``written_by_this_rank`` is True on rank 0).
    Raises HablaError for any problem with the inputs, before training starts.
    """
    started = time.time()
    place = topology.detect()
    topology.export_for_lightning(place)
    log.info("habla train: %s", topology.describe(place))

    # 1. Checks that need no NeMo: config, output, manifests, audio, vocabulary; the plan.
    cfg, label, checkpoint = load_config(config, overrides, init_from, freeze_encoder_steps)
    kind = train_config.model_kind(cfg)
    storage.check_writable_root(out)
    paths = output.RunPaths.for_dst(out)
    streamed = bool(train_tars)
    entries = _prepare_data(cfg, paths, train_manifest, val_manifest, train_tars, place.world_size, val_tars)
    loaded = copy.deepcopy(cfg)
    plan = budget.plan(cfg, entries, place.world_size, streamed, devices_per_node=place.devices)
    budget.apply(cfg, plan, streamed)
    _log_plan(plan, topology.memory_limit_gib())
    texts = [e["text"] for e in entries]
    if checkpoint is not None:
        finetune.check_vocabulary(checkpoint, texts, paths.scratch / "init-tokenizer")
    elif kind == train_config.CHAR:
        tokenizer.check_characters(texts, cfg.model.labels, "vocabulary (model.labels)")
    elif init_from and cfg.model.tokenizer.get("dir") == KEEP_TOKENIZER:
        # --config with --init-from, keeping the checkpoint's tokenizer (and so its CTC head)
        cfg.model.tokenizer.dir = str(_checkpoint_tokenizer(init_from, paths))
        tokenizer.check_tokenizer(Path(cfg.model.tokenizer.dir) / "tokenizer.model", texts)
    elif cfg.model.tokenizer.get("dir"):
        user_tokenizer = Path(cfg.model.tokenizer.dir) / "tokenizer.model"
        if not user_tokenizer.is_file():
            raise HablaError(f"model.tokenizer.dir: {user_tokenizer} not found")
        tokenizer.check_tokenizer(user_tokenizer, texts)
    init_local = models.fetch_model(models.resolve_model(init_from), "--init-from") if init_from else None
    run = Run(cfg, loaded, kind, label, tuple(overrides), init_from, init_local, entries, place, paths, plan,
              streamed, checkpoint)  # fmt: skip
    with output.writing(paths.dst, output.identity(label, overrides, init_from), resume, place.is_rank_zero) as w:
        summary = _fit(run, _pull_from_dst(paths, resume), started, w)
    _shutdown_process_group()
    return summary


#: ``model.tokenizer.dir=checkpoint`` with ``--config NAME --init-from MODEL``: the checkpoint's own tokenizer.
KEEP_TOKENIZER = "checkpoint"


def _checkpoint_tokenizer(init_from: str, paths: output.RunPaths) -> Path:
    local = models.fetch_model(models.resolve_model(init_from), "--init-from")
    ck = finetune.read_checkpoint(local)
    if not ck.is_bpe:
        raise HablaError(f"model.tokenizer.dir=checkpoint: --init-from {init_from} is a character model (no tokenizer)")
    return ck.extract_tokenizer(paths.scratch / "init-tokenizer")


def _size_on_gpu(run: Run, tokenizer_dir: Path | None) -> None:
    """On a GPU, with resources.gpu_batch_search and duration batches: the plan for what this GPU holds."""
    import torch

    cfg = run.cfg
    wanted = (cfg.get("resources") or {}).get("gpu_batch_search", False)
    if not (wanted and torch.cuda.is_available() and run.plan.batch_duration is not None):
        return
    if run.loaded.model.train_ds.get("batch_duration") is not None:
        log.info("GPU batch search: skipped, the config sets model.train_ds.batch_duration")
        return
    if run.init_local is not None:
        log.info("GPU batch search: skipped for --init-from (its architecture is not the config's)")
        return
    from omegaconf import open_dict

    from habla.training import sizing

    torch.cuda.set_device(run.place.local_rank)
    probe_cfg = copy.deepcopy(cfg.model)
    with open_dict(probe_cfg):
        probe_cfg.train_ds = probe_cfg.validation_ds = None
        if tokenizer_dir is not None:
            probe_cfg.tokenizer.dir = str(tokenizer_dir)
    model = build.model_class(run.kind)(cfg=probe_cfg)
    longest = max(budget.kept_durations(run.entries, run.loaded.model.train_ds))
    bf16 = "bf16" in str(cfg.trainer.get("precision", ""))
    fits = sizing.oom_safe(sizing.ctc_probe(model, longest, int(cfg.model.sample_rate), "cuda", bf16))
    capacity = sizing.measure(fits, longest, run.plan.device_capacity)
    del model, fits
    torch.cuda.empty_cache()
    run.replan(capacity)


def _fit(run: Run, ckpt_path: str | None, started: float, writing: output.Writing) -> dict:
    """Build the model and train it; rank 0 publishes model.nemo, the config and the summary."""
    # 2. NeMo and Lightning (slow imports).
    cfg, place, paths = run.cfg, run.place, run.paths
    train_config.check_against_signatures(cfg)
    from omegaconf import OmegaConf

    from habla.training.callbacks import TrainingProgress

    tokenizer_dir = None
    if run.kind == train_config.BPE and run.checkpoint is None:
        if cfg.model.tokenizer.get("dir"):
            tokenizer_dir = Path(cfg.model.tokenizer.dir)
        else:
            tokenizer_dir = tokenizer.build(cfg, run.texts, paths.scratch)
            tokenizer.check_tokenizer(tokenizer_dir / "tokenizer.model", run.texts)
            cfg.model.tokenizer.dir = str(tokenizer_dir)
        tokenizer.publish(tokenizer_dir, paths.dst, ckpt_path is not None, place.is_rank_zero)
    _size_on_gpu(run, tokenizer_dir)
    plan = run.plan

    progress = TrainingProgress(cfg.model.sample_rate, int(cfg.trainer.get("max_steps") or -1))
    freeze = int((cfg.get("fine_tune") or {}).get("freeze_encoder_steps") or 0)
    trainer, log_sync, mirror = build.build_trainer(cfg, place, paths, progress, freeze)
    try:
        model = build.build_model(cfg, trainer, run.kind, run.init_local, tokenizer_dir, run.checkpoint)
    except HablaError:
        raise
    except Exception as exc:  # a config NeMo cannot build (bad encoder arguments, ...)
        raise HablaError(f"cannot build the model from {run.config}: {type(exc).__name__}: {one_line(exc)}") from None
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
        "config": run.config,
        "init_from": run.init_from,
        "overrides": list(run.overrides),
        "resumed_from_step": progress.start_step,
        "fit_seconds": round(progress.fit_seconds, 1),
        "precision": str(cfg.trainer.precision),
        "final_lr": final_lr,
        **({"fine_tuning": finetune.plan_note(cfg)} if cfg.get("fine_tune") is not None else {}),
        **plan.as_summary(),
    }
    summary["batch"]["measured_global_batch"] = None if measured is None else round(measured, 2)

    # 4. Rank 0 writes the artifacts; the other ranks leave without any further collective.
    trainer.strategy.barrier("habla-train-artifacts")
    summary["written_by_this_rank"] = trainer.is_global_zero
    if trainer.is_global_zero:
        if mirror is not None:
            mirror.wait()  # the last checkpoints reach DST before the model is published
        writing.check_still_ours()
        with tempfile.TemporaryDirectory(prefix="habla-model-") as tmp:
            local_model = Path(tmp) / "model.nemo"
            model.save_to(str(local_model))
            storage.upload_file(local_model, paths.dst.model)
        if log_sync:
            log_sync()
        storage.write_text(paths.dst.config, OmegaConf.to_yaml(cfg))
        public = {k: v for k, v in summary.items() if k != "written_by_this_rank"}
        state.write(paths.dst.summary, jsonl.finite_or_null(public), indent=2)
        log.info("rank 0 wrote %s and %s (steps %d, val WER %s)", paths.dst.model, paths.dst.summary,
                 summary["steps"], "n/a" if val_wer is None else f"{val_wer:.4f}")  # fmt: skip
    else:
        log.info("rank %d done; rank 0 writes the artifacts", trainer.global_rank)
    return summary
