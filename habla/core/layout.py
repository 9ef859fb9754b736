"""Where everything habla writes lives: the one place that builds output paths (docs/layout.md shows the tree).

Every location is a local path or an ``s3://`` URI. Commands, components and tests ask these classes for a
path; none joins one by hand.

The pipeline's output location ``OUT`` (:class:`OutputLayout`)::

    OUT/datasets/<release>-<fingerprint>/   a prepared dataset (DatasetLayout), shared by runs with the same inputs
    OUT/runs/<run>/                         a run (RunLayout): run.json, model/ (TrainLayout), eval/ (EvalLayout)
    OUT/models/<run>/model.nemo             promoted models (ModelPackage: + README.md model card, model.onnx)
    OUT/models/best.json                    the current best model (the registry)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from habla.core import storage

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def slug(text: str, limit: int = 80) -> str:
    """A name safe as one path component and in a URL: ``"a b/c"`` -> ``"a-b-c"``; never empty, never ``..``."""
    clean = _UNSAFE.sub("-", str(text)).strip("-.")[:limit].strip("-.")
    return clean or "run"


def run_name(name: str, run_id: str) -> str:
    """The name of a pipeline run's folder: the ``run_name`` parameter, else the KFP run's id.

    Never the run's display name, which two runs may share. A named folder belongs to the first run that
    claims it (habla.runs.record.start_run), so no two runs ever share one either.
    """
    return name or run_id


@dataclass(frozen=True)
class TrainLayout:
    """``habla train --out DST``."""

    root: str

    def _at(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    @property
    def model(self) -> str:
        return self._at("model.nemo")

    @property
    def checkpoints(self) -> str:
        return self._at("checkpoints")

    @property
    def last_checkpoint(self) -> str:
        return self._at("checkpoints", "last.ckpt")

    @property
    def summary(self) -> str:
        return self._at("train_summary.json")

    @property
    def claim(self) -> str:
        """Created once by the first run: which model this folder trains (config, checkpoint, model overrides)."""
        return self._at("claim.json")

    @property
    def lease(self) -> str:
        """Held by the one process writing the folder, renewed while it trains (habla.core.claims.Lease)."""
        return self._at(".lease.json")

    @property
    def config(self) -> str:
        return self._at("config.yaml")

    @property
    def tokenizer(self) -> str:
        return self._at("tokenizer")

    @property
    def logs(self) -> str:
        return self._at("logs")


@dataclass(frozen=True)
class EvalLayout:
    """``habla evaluate --out DST``."""

    root: str

    @property
    def metrics(self) -> str:
        return storage.join(self.root, "metrics.json")

    @property
    def predictions(self) -> str:
        """A NeMo manifest: ``text`` (reference) and ``pred_text`` (hypothesis), normalized, per utterance."""
        return storage.join(self.root, "predictions.json")

    @property
    def report(self) -> str:
        return storage.join(self.root, "report.md")

    @property
    def plot(self) -> str:
        return storage.join(self.root, "wer_by_group.png")

    @property
    def log(self) -> str:
        """``evaluate.log``: what NeMo printed while restoring the model (not the console)."""
        return storage.join(self.root, "evaluate.log")

    @property
    def promotion(self) -> str:
        """``promotion.json``: the best model this evaluation compared against, and whether it was replaced."""
        return storage.join(self.root, "promotion.json")


@dataclass(frozen=True)
class TranscribeLayout:
    """``habla transcribe --out DST``."""

    root: str

    @property
    def transcripts(self) -> str:
        return storage.join(self.root, "transcripts.json")

    @property
    def summary(self) -> str:
        return storage.join(self.root, "summary.json")

    @property
    def rejected(self) -> str:
        return storage.join(self.root, "rejected.jsonl")

    @property
    def log(self) -> str:
        """``transcribe.log``: what NeMo printed while restoring the model (not the console)."""
        return storage.join(self.root, "transcribe.log")

    def subtitles(self, index: int, audio: str, kind: str) -> str:
        """``subtitles/<NNNN>-<recording's stem>.<srt|vtt>``: the recording's place in the input order first, so
        that two recordings of one name (or one input named twice) never share a file."""
        stem = slug(storage.name(audio).rsplit(".", 1)[0], limit=60) or "recording"
        return storage.join(self.root, "subtitles", f"{index:04d}-{stem}.{kind}")


@dataclass(frozen=True)
class ModelPackage:
    """What a promoted model is handed on with: ``OUT/models/<run>/`` (the model card is its README)."""

    root: str

    @property
    def model(self) -> str:
        return storage.join(self.root, "model.nemo")

    @property
    def card(self) -> str:
        return storage.join(self.root, "README.md")

    @property
    def onnx(self) -> str:
        return storage.join(self.root, "model.onnx")

    @property
    def onnx_check(self) -> str:
        """How the ONNX export was verified against the .nemo (transcripts compared on the test split)."""
        return storage.join(self.root, "onnx_check.json")


@dataclass(frozen=True)
class RunLayout:
    """One pipeline run: ``OUT/runs/<run>/``."""

    root: str

    @property
    def record(self) -> str:
        """``run.json``: the run's parameters."""
        return storage.join(self.root, "run.json")

    @property
    def train(self) -> TrainLayout:
        return TrainLayout(storage.join(self.root, "model"))

    @property
    def eval(self) -> EvalLayout:
        return EvalLayout(storage.join(self.root, "eval"))

    @property
    def logs(self) -> str:
        """``habla pipeline run-local``: one log file per step, everything the steps printed."""
        return storage.join(self.root, "logs")

    def step_log(self, task: str) -> str:
        return storage.join(self.root, "logs", f"{slug(task)}.log")

    @property
    def best_eval(self) -> EvalLayout:
        """The current best model scored on this run's test set."""
        return EvalLayout(storage.join(self.root, "eval", "best"))

    @property
    def baseline_eval(self) -> EvalLayout:
        """The checkpoint the run fine-tuned (``init_from``), scored zero-shot on this run's test set."""
        return EvalLayout(storage.join(self.root, "eval", "baseline"))


@dataclass(frozen=True)
class DatasetLayout:
    """``habla prepare --out DST``: plan, shards, audio, manifests, report."""

    root: str

    def _at(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    # plan (step 1)
    @property
    def plan(self) -> str:
        return self._at("plan", "plan.json")

    def plan_shard(self, shard: int) -> str:
        return self._at("plan", f"shard-{shard:05d}.jsonl")

    @property
    def plan_rejected(self) -> str:
        return self._at("plan", "rejected.jsonl")

    @property
    def claim(self) -> str:
        """Created once (conditional create) by the first run: the release and options this folder is for."""
        return self._at("plan", "claim.json")

    @property
    def staging(self) -> str:
        """Where a release archive is unpacked."""
        return self._at("staging")

    # convert (step 2)
    def shard_result(self, shard: int) -> str:
        """Written last by a converted shard: its presence means the shard is complete."""
        return self._at("shards", f"shard-{shard:05d}.json")

    def shard_started(self, shard: int) -> str:
        return self._at("shards", f"shard-{shard:05d}.started")

    def shard_file(self, shard: int, name: str) -> str:
        return self._at("shards", f"shard-{shard:05d}", name)

    def wav(self, split: str, name: str) -> str:
        """``audio/<split>/<name>``: ``name`` is the clip's WAV name, chosen by the plan (unique per split)."""
        return self._at("audio", split, name)

    def tar(self, split: str, shard: int) -> str:
        return self._at("tarred", split, f"audio_{shard}.tar")

    def tar_manifest(self, split: str, shard: int) -> str:
        return self._at("tarred", split, f"manifest_{shard}.json")

    def tar_patterns(self, split: str, count: int) -> tuple[str, str]:
        """NeMo's brace patterns over shards ``0..count-1``: (manifests, tar files)."""
        last = count - 1
        return (
            self._at("tarred", split, f"manifest__OP_0..{last}_CL_.json"),
            self._at("tarred", split, f"audio__OP_0..{last}_CL_.tar"),
        )

    # assemble (step 3)
    def manifest(self, split: str) -> str:
        return self._at("manifests", f"{split}.json")

    @property
    def rejected(self) -> str:
        return self._at("rejected.jsonl")

    @property
    def report_json(self) -> str:
        return self._at("report.json")

    @property
    def report_md(self) -> str:
        return self._at("report.md")

    @property
    def report_png(self) -> str:
        return self._at("report.png")


@dataclass(frozen=True)
class OutputLayout:
    """The pipeline's ``output_uri``: datasets, runs and the model registry."""

    root: str

    def dataset(self, release_label: str, fingerprint: str) -> DatasetLayout:
        return DatasetLayout(storage.join(self.root, "datasets", f"{slug(release_label)}-{fingerprint}"))

    @property
    def runs(self) -> str:
        return storage.join(self.root, "runs")

    def run(self, name: str) -> RunLayout:
        return RunLayout(storage.join(self.root, "runs", slug(name)))

    def promoted_model(self, run_name: str) -> str:
        return self.package(run_name).model

    def package(self, run_name: str) -> ModelPackage:
        """``models/<run>/``: the promoted model, its model card and its verified ONNX export."""
        return ModelPackage(storage.join(self.root, "models", slug(run_name)))

    @property
    def best(self) -> str:
        """``models/best.json``: the registry's record of the current best model."""
        return storage.join(self.root, "models", "best.json")
