"""The ``habla train`` command line for a prepared dataset, and the numbers of a finished training run.

Light on purpose (no omegaconf, torch or NeMo): the pipeline's cluster launcher step calls it in the slim
image before it starts a TrainJob that runs the command.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from habla.core import state, storage
from habla.core.errors import HablaError
from habla.core.layout import RunLayout, TrainLayout
from habla.speech.dataset import read_report, split_tars

#: train_summary.json numbers worth showing and comparing in the KFP UI: top-level keys, then the plan's.
SUMMARY_METRICS = ("steps", "epochs", "wall_seconds", "audio_hours_seen", "final_train_loss", "val_wer", "world_size")
PLAN_METRICS = (("batch", "global_batch"), ("batch", "accumulate_grad_batches"), ("learning_rate", "lr"),
                ("schedule", "max_steps"), ("cadence", "validate_every_steps"))  # fmt: skip


@dataclass(frozen=True)
class TrainInputs:
    """What ``habla train`` is given for a prepared dataset: config, manifests (tar shards when it has them)."""

    config: str
    train_manifest: str
    val_manifest: str
    train_tars: str | None
    val_tars: str | None
    init_from: str
    overrides: tuple[str, ...]

    @classmethod
    def for_dataset(
        cls, dataset_uri: str, config: str, overrides: str = "", max_steps: int = 0, max_epochs: int = 0,
        init_from: str = "",
    ) -> TrainInputs:  # fmt: skip
        """``overrides`` is a space-separated list of dotted ``key=value`` config overrides; ``max_steps`` /
        ``max_epochs`` > 0 override the config's."""
        report = read_report(dataset_uri)
        manifests = report["manifests"]
        for split in ("train", "dev"):
            if split not in manifests:
                raise HablaError(f"{dataset_uri}: prepared without the {split} split, which training needs")
        tarred = report.get("tarred", {}).get("train")
        extra = shlex.split(overrides)
        if max_steps > 0:
            extra.append(f"trainer.max_steps={max_steps}")
        if max_epochs > 0:
            extra.append(f"trainer.max_epochs={max_epochs}")
        return cls(
            config=config,
            train_manifest=tarred["manifest_filepath"] if tarred else manifests["train"],
            val_manifest=manifests["dev"],
            train_tars=tarred["tarred_audio_filepaths"] if tarred else None,
            val_tars=split_tars(report, "dev"),
            init_from=init_from,
            overrides=tuple(extra),
        )

    def arguments(self, model_dir: str) -> list[str]:
        """``habla train``'s arguments into ``model_dir``. ``--resume`` makes a retried step continue from its
        checkpoints instead of starting over."""
        args = ["--config", self.config] if self.config else []  # none: --init-from fine-tuned as it is
        args += ["--out", storage.absolute(model_dir), "--val-manifest", self.val_manifest, "--resume",
                 "--train-manifest", self.train_manifest]  # fmt: skip
        if self.train_tars:
            args += ["--train-tars", self.train_tars]
        if self.val_tars:
            args += ["--val-tars", self.val_tars]
        if self.init_from:
            args += ["--init-from", self.init_from]
        return args + list(self.overrides)

    def plan(self, nodes: int, gpus_per_node: int) -> dict:
        """The run's plan on ``nodes`` × ``gpus_per_node`` (``habla train --dry-run``; needs habla[train])."""
        from habla.training.train import plan_run

        return plan_run(self.config or None, self.train_manifest, self.overrides, self.train_tars, nodes,
                        gpus_per_node, init_from=self.init_from or None)  # fmt: skip


def training_metrics(model_dir: str) -> dict[str, float]:
    """The numbers of ``train_summary.json`` worth showing and comparing in the KFP UI."""
    summary = state.load(TrainLayout(model_dir).summary, what="training summary")
    return _numbers({**{k: summary.get(k) for k in SUMMARY_METRICS}, **plan_metrics(summary)})


def plan_lines(plan: dict) -> list[str]:
    """A run's plan (``habla train --dry-run``) as the lines a launcher shows before it starts the run."""
    return [f"plan: {line}" for line in plan["described"]] + [f"warning: {w}" for w in plan["warnings"]]


def plan_metrics(plan: dict) -> dict[str, float]:
    """The figures of a run's plan (``habla train --dry-run``, or train_summary.json) shown in the KFP UI."""
    return _numbers({f"{section}.{key}": (plan.get(section) or {}).get(key) for section, key in PLAN_METRICS})


def _numbers(values: dict) -> dict[str, float]:
    return {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


@dataclass(frozen=True)
class TrainStep:
    """The pipeline's training step for a run: ``habla train`` on the run's dataset into ``<run>/model/``,
    whichever launcher runs it (habla.kubeflow: torchrun in the step's pod, or a cluster job)."""

    run_dir: str
    dataset_uri: str
    config: str
    overrides: str = ""
    max_steps: int = 0
    max_epochs: int = 0
    init_from: str = ""

    @property
    def model(self) -> TrainLayout:
        return RunLayout(self.run_dir).train

    @property
    def inputs(self) -> TrainInputs:
        return TrainInputs.for_dataset(self.dataset_uri, self.config, self.overrides, self.max_steps,
                                       self.max_epochs, self.init_from)  # fmt: skip

    def arguments(self) -> list[str]:
        """``habla train``'s arguments (:class:`TrainInputs`)."""
        return self.inputs.arguments(self.model.root)

    def result(self) -> tuple[str, dict[str, float]]:
        """After training: the model's URI and the numbers the KFP UI shows."""
        return storage.absolute(self.model.model), training_metrics(self.model.root)
