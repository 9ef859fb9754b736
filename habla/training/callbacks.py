"""Lightning plugins and callbacks of ``habla train`` (this module imports Lightning: only once training starts).

- :class:`MirroredCheckpointIO`: Lightning's checkpoint writer (a public plugin API) that also publishes each
  saved (and removed) checkpoint, and the TensorBoard logs, to an ``s3://`` DST. Checkpoints are written to
  a local folder first (Lightning and torch save to files), then uploaded in the background
  (habla.training.uploads); every rank of a resumed run pulls ``last.ckpt`` back from DST before training
  (habla.training.train), so nodes need no shared filesystem.
- :class:`TrainingProgress`: counts the audio and utterances seen (all ranks, summed; kept in checkpoints so
  they survive a resume), keeps the last train loss, remembers the last validation, and logs one readable
  progress line every ``trainer.log_every_n_steps`` steps on rank 0 (progress bars are unreadable in pod logs).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch import Callback, LightningModule, Trainer

from habla.core import storage
from habla.core.errors import HablaError
from habla.training.uploads import BackgroundUploads

log = logging.getLogger("habla.train")


class LogSync:
    """Upload new or changed files of a local folder to a remote folder (TensorBoard event files grow)."""

    def __init__(self, local: Path, remote: str) -> None:
        self.local, self.remote = local, remote
        self._sent: dict[str, tuple[int, float]] = {}

    def __call__(self) -> None:
        if not self.local.is_dir():
            return
        for path in sorted(self.local.rglob("*")):
            if not path.is_file():
                continue
            stat = path.stat()
            key = str(path.relative_to(self.local))
            if self._sent.get(key) != (stat.st_size, stat.st_mtime):
                storage.upload_file(path, storage.join(self.remote, *path.relative_to(self.local).parts))
                self._sent[key] = (stat.st_size, stat.st_mtime)


class MirroredCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, plus a copy of every saved checkpoint in ``remote_dir`` (``s3://``).

    Lightning's strategy calls a CheckpointIO on global rank 0 only, for every save and every removal
    (ModelCheckpoint's top-k rotation), so the remote folder mirrors the local one. The save is local and
    synchronous; the upload (then ``after_upload``, the TensorBoard log sync) runs in the background:
    :meth:`wait` at the end of the run.
    """

    def __init__(self, remote_dir: str, after_upload: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.remote_dir = remote_dir
        self.uploads = BackgroundUploads(after_upload)

    def _remote(self, path) -> str:
        return storage.join(self.remote_dir, Path(path).name)

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        super().save_checkpoint(checkpoint, path, storage_options)
        self.uploads.upload(path, self._remote(path), label=f"step {checkpoint.get('global_step')}")

    def remove_checkpoint(self, path) -> None:
        super().remove_checkpoint(path)
        self.uploads.remove(self._remote(path))

    def wait(self) -> None:
        """Until every checkpoint saved so far is in ``remote_dir`` (Fault if the latest of one is not)."""
        self.uploads.wait()


class TrainingProgress(Callback):
    """Audio and utterances seen, last loss, last validation, and a progress line every ``log_every_n_steps``."""

    def __init__(self, sample_rate: int, max_steps: int) -> None:
        self.sample_rate = sample_rate
        self.max_steps = max_steps
        self.audio_seconds_before = 0.0  # from the checkpoint a resumed run starts from
        self.utterances_before = 0
        self.start_step = 0
        self.last_val_step = -1
        self.last_val_wer: float | None = None
        # [audio seconds this run, last loss summed over ranks, utterances this run]
        self._sums: torch.Tensor | None = None
        self._fit_started = 0.0
        self._logged_step = -1
        self._restored_loss: float | None = None
        self._world_size = 1
        self.fit_seconds = 0.0

    # -- state kept in checkpoints (identical on every rank: the counter is summed over ranks each step)
    def state_dict(self) -> dict:
        return {"audio_seconds": self.audio_seconds, "last_loss": self.last_loss, "utterances": self.utterances}

    def load_state_dict(self, state_dict: dict) -> None:  # after on_load_checkpoint
        self.audio_seconds_before = float(state_dict.get("audio_seconds", 0.0))
        self.utterances_before = int(state_dict.get("utterances", 0))
        self._restored_loss = state_dict.get("last_loss")
        log.info("resumed at step %d (%.2f h of audio seen before)", self.start_step, self.audio_seconds_before / 3600)

    @property
    def audio_seconds(self) -> float:
        return self.audio_seconds_before + (float(self._sums[0]) if self._sums is not None else 0.0)

    @property
    def utterances(self) -> int:
        return self.utterances_before + (int(self._sums[2]) if self._sums is not None else 0)

    @property
    def last_loss(self) -> float | None:
        """The last step's train loss, averaged over ranks."""
        if self._sums is None:
            return self._restored_loss
        return float(self._sums[1]) / self._world_size

    # -- hooks
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._fit_started = time.monotonic()
        self._world_size = trainer.world_size

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        self.start_step = int(checkpoint.get("global_step", 0))

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        lengths = batch[1]
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        step = torch.stack([lengths.sum().float() / self.sample_rate, loss.detach().float(),
                            torch.tensor(float(lengths.numel()), device=lengths.device)])  # fmt: skip
        # One tiny all-reduce per step keeps the counter identical on every rank (checkpoints hold rank 0's).
        step = trainer.strategy.reduce(step, reduce_op="sum")
        if not bool(torch.isfinite(step[1])):  # every rank sees the same sum: all stop at this step together
            raise HablaError(
                f"the training loss is not a finite number at step {trainer.global_step} ({float(step[1])}): broken "
                "audio in the train data (habla train checks the files it is given) or a learning rate far too "
                "high; nothing was published"
            )
        if self._sums is None:  # float64: a float32 sum of 10^8 clips' seconds would drift by whole percents
            self._sums = torch.zeros_like(step, dtype=torch.float64)
        self._sums[0] += step[0]
        self._sums[1] = step[1]
        self._sums[2] += step[2]
        every = max(1, trainer.log_every_n_steps)
        if trainer.is_global_zero and trainer.global_step % every == 0 and trainer.global_step != self._logged_step:
            self._logged_step = trainer.global_step  # several batches per step with accumulate_grad_batches
            self._log_progress(trainer)

    def _log_progress(self, trainer: Trainer) -> None:
        elapsed = max(time.monotonic() - self._fit_started, 1e-9)
        this_run = float(self._sums[0])
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
        total = f"/{self.max_steps}" if self.max_steps and self.max_steps > 0 else ""
        log.info(
            "step %d%s epoch %d loss %.3f lr %.2e audio %.2f h (%.0f audio-s/s)",
            trainer.global_step, total, trainer.current_epoch, self.last_loss or 0.0, lr,
            self.audio_seconds / 3600, this_run / elapsed,
        )  # fmt: skip

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        wer = trainer.callback_metrics.get("val_wer")
        if wer is not None:
            self.last_val_step, self.last_val_wer = trainer.global_step, float(wer)
            if trainer.is_global_zero and trainer.state.fn == "fit":
                log.info("validation at step %d: WER %.4f", trainer.global_step, self.last_val_wer)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.fit_seconds = time.monotonic() - self._fit_started


class FreezeEncoder(Callback):
    """``--freeze-encoder-steps N``: only the heads (and the preprocessor) train for the first N optimizer
    steps, while new or re-initialised heads warm up; then the encoder trains too. NeMo's ``freeze()``:
    no gradients, and evaluation mode (dropout off, batch-norm statistics kept)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.frozen = False

    def _set(self, pl_module: LightningModule, frozen: bool, step: int) -> None:
        encoder = pl_module.encoder
        if frozen:
            encoder.freeze()
        else:
            encoder.unfreeze()
            encoder.train()
        self.frozen = frozen
        log.info("encoder %s at step %d", "frozen" if frozen else "unfrozen (training every part)", step)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_step < self.steps:
            self._set(pl_module, True, trainer.global_step)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        if self.frozen and trainer.global_step >= self.steps:
            self._set(pl_module, False, trainer.global_step)
        elif self.frozen and pl_module.encoder.training:  # Lightning puts the model back in train mode each epoch
            pl_module.encoder.eval()
