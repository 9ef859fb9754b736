"""A pipeline run's parameters: the one typed definition (:class:`RunParameters`).

Everything else is derived from it: the training pipeline's signature, defaults and parameter descriptions
(pipelines/training_pipeline.py), the run record ``runs/<run>/run.json`` (habla.runs.record), the defaults of
``habla pipeline run-local`` (:meth:`RunParameters.local_defaults`), how ``key=value`` settings are typed
(:func:`typed`) and the columns of ``habla compare`` (:data:`COMPARE_COLUMNS`).

Light on purpose (no kfp): the CLI builds its help from it.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import math
import os
import re
import shlex
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field
from types import SimpleNamespace
from typing import Any

from habla import __version__
from habla.core.errors import HablaError
from habla.speech.releases import release_label
from habla.training import configs

DEFAULT_RUNTIME = "habla-torch-distributed"  # manifests/runtimes: a ClusterTrainingRuntime with a RAM /dev/shm
DEFAULT_PREP_IMAGE = f"ghcr.io/habla-asr/habla-prep:{__version__}"
DEFAULT_TRAIN_IMAGE = f"ghcr.io/habla-asr/habla-train:{__version__}"
_SAME = object()
_TYPES = {"str": str, "int": int, "float": float, "dict": dict, "list": list}  # the fields' annotations, as text
_KIND_NAMES = {str: "a string", int: "an integer", float: "a finite number", dict: "a JSON object",
               list: "a JSON list"}  # fmt: skip
# The taint the NVIDIA GPU operator and the managed Kubernetes services put on GPU nodes (GKE adds it to every GPU
# node pool; EKS and AKS documentation use it): tolerating it lets a GPU pod onto such a node and keeps it off no
# other node. manifests/runtimes (the TrainJob's pods) carries the same toleration.
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
# Training pods per node (the pipeline's train_cpu / train_memory parameters): a CPU request, and memory requested
# and limited alike; the RAM-backed /dev/shm (SHM_SIZE in habla.kubeflow.jobs, at most) counts against that memory.
# AUTO: a cluster job's pods request the node of the run's plan (its loader workers' buffers decide the memory).
# The pipeline's own training pod (launcher "local") is sized before it starts, so it needs quantities.
AUTO = "auto"
TRAIN_CPU = AUTO
TRAIN_MEMORY = AUTO


def _param(default: Any = MISSING, *, help: str, local: Any = _SAME, compared: bool = True):  # noqa: A002
    """A field of :class:`RunParameters`: its default, its description (the compiled pipeline's docstring and
    ``habla pipeline parameters``: KFP 2.15–2.17's run form shows names and types only), its default under
    ``habla pipeline run-local`` (``local``), and whether a difference between runs is worth a column of its
    own in ``habla compare`` (``compared``: not for knobs of speed). A dict or list default is copied per run."""
    meta = {"help": help, "local": local, "compared": compared}
    if default is MISSING:
        return field(metadata=meta)
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def default_of(f: dataclasses.Field) -> Any:
    """A field's default (MISSING when it has none), a dict or list one included."""
    if f.default_factory is not MISSING:
        return f.default_factory()
    return f.default


@dataclass(frozen=True)
class RunParameters:
    """Prepare a Common Voice release, train a NeMo model on it, evaluate it and promote it if it is better."""

    release_uri: str = _param(
        help="The release: an extracted locale folder, a cv-corpus-*.tar.gz archive, or an s3:// prefix."
    )
    output_uri: str = _param(
        help="Where everything goes (s3://bucket/prefix): datasets/, runs/<run>/, models/best.json.", compared=False
    )
    locale: str = _param("es", help="Common Voice locale folder inside the release.")
    num_shards: int = _param(
        32,
        local=2,
        help="Conversion shards (parallel tasks); about one per 20 h of audio is a good size. With audio_format=tar "
        "they are also the train tar shards: a multiple of nodes × gpus_per_node × 8 loader workers streams best.",
    )
    workers_per_shard: int = _param(
        2,
        local=os.cpu_count() or 1,
        compared=False,
        help="Conversion processes inside each shard's pod (matches its CPU request).",
    )
    train_source: str = _param(
        "train",
        help='"train" (train.tsv) or "validated" (validated.tsv minus dev/test speakers and sentences).',
    )
    audio_format: str = _param(
        "tar",
        local="wav",
        help='"tar" (NeMo tarred shards: train streamed from object storage, dev/test one tar per shard) or "wav".',
    )
    min_duration: float = _param(0.5, help="Shortest clip kept, in seconds.")
    max_duration: float = _param(20.0, help="Longest clip kept, in seconds.")
    config: str = _param(
        "fastconformer_ctc_bpe",
        local="tiny_ctc_char",
        help="Model config name (tiny_ctc_char, quartznet15x5_char, fastconformer_ctc_bpe) or a YAML path in the "
        'image; "" with init_from: fine-tune the checkpoint as it is (its architecture, tokenizer and heads).',
    )
    config_overrides: str = _param(
        "",
        help='Space-separated dotted key=value overrides, e.g. "model.optim.lr=0.001 trainer.precision=bf16-mixed".',
    )
    init_from: str = _param(
        "",
        help="Optional checkpoint to fine-tune from: a .nemo (path in the image or s3://) or a name in "
        '$HABLA_MODEL_STORE; CTC, hybrid RNNT/CTC or transducer. With config "": fine-tuned as it is.',
    )
    overlap_with: str = _param(
        "",
        help="Optional training data of the checkpoint (a Common Voice train.tsv or manifest, path in the image or "
        "s3://): the evaluation reports the test clips, speakers and sentences in it and the WER without them.",
    )
    nodes: int = _param(1, local=1, help="Training nodes (pods).")
    gpus_per_node: str = _param(
        "1",
        local="0",
        help='GPUs per training node (one process per GPU); a string, e.g. "8", as KFP needs for a GPU limit.',
    )
    max_steps: int = _param(0, help="Training steps; 0 keeps the config's.")
    max_epochs: int = _param(0, help="Training epochs; 0 keeps the config's.")
    launcher: str = _param(
        "trainjob",
        local="local",
        help='"trainjob" (Kubeflow Trainer v2), "pytorchjob" (Training Operator) or "local" (inside this pipeline\'s '
        "pod).",
    )
    runtime: str = _param(
        DEFAULT_RUNTIME,
        compared=False,
        help="The TrainJob's ClusterTrainingRuntime; the default (manifests/runtimes) gives the pods a RAM-backed "
        "/dev/shm.",
    )
    train_image: str = _param(
        DEFAULT_TRAIN_IMAGE,
        help="Image of training and evaluation (CUDA + NeMo + habla): the training job's pods and the pipeline's "
        "train, evaluation and packaging steps, so the model is trained and scored by the same code.",
    )
    train_cpu: str = _param(
        TRAIN_CPU,
        local="1",
        compared=False,
        help='CPU request of each training pod: "auto" (a cluster job: its plan\'s node request) or a Kubernetes '
        'quantity, e.g. "8" or "500m" (needed with launcher "local").',
    )
    train_memory: str = _param(
        TRAIN_MEMORY,
        local="4Gi",
        compared=False,
        help='Memory request and limit of each training pod: "auto" (a cluster job: its plan\'s node request) or a '
        'quantity, e.g. "64Gi" (needed with launcher "local"); its RAM-backed /dev/shm counts against it.',
    )
    evaluate_gpus: str = _param(
        "1",
        local="0",
        compared=False,
        help='GPUs of the evaluation step: "1", or "0" to evaluate on CPUs (a CPU-only cluster, or a small test set).',
    )
    gpu_node_selector: dict = _param(
        {},
        compared=False,
        help='Node labels the GPU pods must match, e.g. {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}; '
        "PyTorchJob pods and the pipeline's GPU steps (a TrainJob's pods: its ClusterTrainingRuntime).",
    )
    gpu_tolerations: list = _param(
        [GPU_TOLERATION],
        compared=False,
        help="Tolerations of the GPU pods (Kubernetes Toleration objects); the default tolerates the "
        "nvidia.com/gpu:NoSchedule taint GPU nodes usually carry. PyTorchJob pods and the pipeline's GPU steps (a "
        "TrainJob's pods: its ClusterTrainingRuntime).",
    )
    priority_class: str = _param(
        "",
        compared=False,
        help="PriorityClass of the PyTorchJob's pods (empty: the namespace's default; a TrainJob's pods: its "
        "ClusterTrainingRuntime), so that a multi-day gang job is not preempted by shorter work.",
    )
    promotion_margin: float = _param(
        0.0,
        help="Promote only when the new WER is lower than the best model's by more than this (absolute), with 95 % "
        "confidence (paired bootstrap over test utterances).",
    )
    run_name: str = _param(
        "",
        compared=False,
        help="Name of the run's folder under output_uri/runs/ (one run's only); empty: the KFP run's id.",
    )

    def __post_init__(self) -> None:
        """Every parameter checked before anything is submitted, recorded or started: one line per problem."""
        problem = _problem(self)
        if problem:
            raise HablaError(f"pipeline parameter {problem}")

    @classmethod
    def checked(cls, values: dict[str, Any], **fixed: Any) -> RunParameters:
        """The run parameters ``values`` (JSON-typed: ``--param nodes=2``, the watcher's ``training_params``)
        with ``fixed`` ones (what the watcher sets per release), as the pipeline will receive them: a whole
        number where a string is declared becomes that string (``gpus_per_node=8``), an integral float an int.
        HablaError for an unknown name or a value of another type, or any parameter :meth:`__post_init__`
        refuses."""
        kinds = {f.name: _TYPES.get(f.type, f.type) for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(kinds))
        if unknown:
            raise HablaError(f"unknown pipeline parameter(s) {', '.join(unknown)} (known: {', '.join(sorted(kinds))})")
        out = {}
        for name, value in {**values, **fixed}.items():
            kind = kinds[name]
            if kind is str and isinstance(value, int) and not isinstance(value, bool):
                value = str(value)
            elif kind is int and isinstance(value, float) and value.is_integer():
                value = int(value)
            out[name] = value
        return cls(**out)

    @classmethod
    def for_each_release(cls, params: dict[str, Any], output_uri: str, locale: str) -> RunParameters:
        """The parameters a watcher submits with every release (``habla watch --param``, ``habla schedule``),
        checked before it claims or schedules anything; the release's own (its location, run name, locale, the
        output) are the watcher's to set."""
        reserved = sorted({"release_uri", "output_uri", "locale", "run_name"} & set(params))
        if reserved:
            raise HablaError(f"--param {', '.join(reserved)}: set by the watcher for each release")
        each = "(each release)"
        return cls.checked(params, release_uri=each, output_uri=output_uri or each, locale=locale, run_name=each)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def channels(cls, values: Sequence[Any]) -> SimpleNamespace:
        """The pipeline function's arguments by name (KFP passes them in :meth:`signature` order)."""
        return SimpleNamespace(**dict(zip(cls.names(), values, strict=True)))

    @classmethod
    def local_defaults(cls) -> dict[str, Any]:
        """What ``habla pipeline run-local`` changes from the cluster defaults: CPU training in the pipeline's
        own process, a small model, WAV audio."""
        return {f.name: f.metadata["local"] for f in dataclasses.fields(cls) if f.metadata["local"] is not _SAME}

    @classmethod
    def signature(cls, **defaults: Any) -> inspect.Signature:
        """The pipeline function's signature: one typed parameter per field, with its default (``defaults``
        replaces some: the train image chosen at compile time)."""
        out = []
        for f in dataclasses.fields(cls):
            default = defaults.get(f.name, default_of(f))
            default = inspect.Parameter.empty if default is MISSING else default
            kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
            out.append(inspect.Parameter(f.name, kind, default=default, annotation=_TYPES.get(f.type, f.type)))
        return inspect.Signature(out)

    @classmethod
    def docstring(cls) -> str:
        """The pipeline's docstring: what KFP shows as its description and each parameter's (``Args:``)."""
        lines = [cls.__doc__ or "", "", "Args:"]
        lines += [f"    {f.name}: {f.metadata['help']}" for f in dataclasses.fields(cls)]
        return "\n".join(lines)

    def check_image(self, compiled: str) -> None:
        """HablaError unless ``train_image`` is ``compiled``, the image the pipeline's own training, evaluation and
        packaging steps run in (fixed when it was compiled: a step's image is part of its executor)."""
        if self.train_image != compiled:
            raise HablaError(
                f"pipeline parameter train_image={self.train_image!r}: this pipeline trains in-pipeline and evaluates "
                f"in {compiled!r}; compile it with --train-image {self.train_image} rather than set another image "
                "for one run (a model is trained and scored by the same code)"
            )

    def record(self) -> dict[str, Any]:
        """What ``run.json`` records of the run's parameters (the GPU count as a number, the release's label)."""
        values = dataclasses.asdict(self)
        for name in ("output_uri", "run_name"):  # recorded as run_dir and run_name by start_run
            values.pop(name)
        values["format"] = values.pop("audio_format")
        values["gpus_per_node"] = gpu_count(self.gpus_per_node)
        return {"release": release_label(self.release_uri), **values}


#: ``habla compare``'s columns that are run parameters, in their order: (column, parameter).
COMPARE_COLUMNS = (("config", "config"), ("train_source", "train_source"), ("nodes", "nodes"),
                   ("gpus", "gpus_per_node"), ("steps", "max_steps"))  # fmt: skip
#: run.json keys that are never a difference column of ``habla compare``: bookkeeping, what has a column, and
#: ``config_overrides`` (each override is compared on its own).
NOT_COMPARED = frozenset(
    {"run_name", "run_id", "run_dir", "started", "release", "release_uri", "promotion", "config_overrides"}
    | {"state", "finished", "failed_step", "error", "bad_input", "resume", "resumed"}  # how it ended (runs.record)
    | {name for _, name in COMPARE_COLUMNS}
    | {f.name for f in dataclasses.fields(RunParameters) if not f.metadata["compared"]}
)


LAUNCHERS = ("trainjob", "pytorchjob", "local")
_AUTO_ON_CLUSTER = (
    " (\"auto\", the plan's request, is for cluster jobs: the pipeline's own pod is sized before it starts)"
)
_LOCALE = re.compile(r"^[A-Za-z]{2,3}(-[A-Za-z0-9]+)*$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_IMAGE = re.compile(r"^[^\s]+$")
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")  # a Kubernetes quantity
# The fields of a Kubernetes Toleration (k8s.io/api core/v1 types.go) and the values the API server accepts.
_TOLERATION_FIELDS = {"key", "operator", "value", "effect", "tolerationSeconds"}
_TOLERATION_OPERATORS = ("Exists", "Equal")
_TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
_CONFIG_FILE = (".yaml", ".yml")
_OVERRIDE_KEY = re.compile(r"^\+?[A-Za-z_]\w*(\.\w+)*$")  # habla.training.config: + adds a key
MAX_SHARDS = 10_000


def _problem(p: RunParameters) -> str | None:
    """What is wrong with ``p`` (``"nodes=0: …"``), or None."""
    for f in dataclasses.fields(p):  # the types first: KFP passes exactly these
        value, kind = getattr(p, f.name), _TYPES.get(f.type, f.type)
        ok = isinstance(value, kind) and not isinstance(value, bool)
        if kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok:
            return f"{f.name}={value!r}: needs {_KIND_NAMES[kind]}"
    checks = [
        ("release_uri", p.release_uri.strip() != "", "needs the release's location"),
        ("output_uri", p.output_uri.strip() != "", "needs the output location"),
        ("locale", bool(_LOCALE.match(p.locale)), "a Common Voice locale such as es or zh-TW"),
        ("num_shards", 1 <= p.num_shards <= MAX_SHARDS, f"an integer from 1 to {MAX_SHARDS}"),
        ("workers_per_shard", 0 <= p.workers_per_shard <= 1024, "an integer from 0 (one per CPU) to 1024"),
        ("train_source", p.train_source in ("train", "validated"), "train or validated"),
        ("audio_format", p.audio_format in ("wav", "tar"), "wav or tar"),
        ("min_duration", 0 <= p.min_duration < p.max_duration, "at least 0 and below max_duration"),
        ("config", _known_config(p.config) or (p.config == "" and p.init_from.strip() != ""),
         "a config name (" + ", ".join(configs.available()) + ") or the path of a .yaml file (or \"\" with "
         "init_from: the checkpoint as it is)"),
        ("config_overrides", _overrides_problem(p.config_overrides) is None,
         _overrides_problem(p.config_overrides) or ""),
        ("nodes", 1 <= p.nodes <= 4096, "an integer from 1 to 4096"),
        ("gpus_per_node", p.gpus_per_node.strip().isascii() and p.gpus_per_node.strip().isdigit()
         and int(p.gpus_per_node) <= 64, "a whole number from 0 to 64, as a string"),
        ("max_steps", p.max_steps >= 0, "0 (the config's) or more"),
        ("max_epochs", p.max_epochs >= 0, "0 (the config's) or more"),
        ("launcher", p.launcher in LAUNCHERS, " or ".join(LAUNCHERS)),
        ("runtime", len(p.runtime) <= 253 and bool(_DNS_SUBDOMAIN.match(p.runtime)),
         "the name of a ClusterTrainingRuntime"),
        ("train_image", bool(_IMAGE.match(p.train_image)), "an image reference"),
        ("promotion_margin", 0 <= p.promotion_margin <= 1, "an absolute WER margin from 0 to 1"),
        ("train_cpu", (p.train_cpu == AUTO and p.launcher != "local")
         or (bool(QUANTITY.match(p.train_cpu)) and p.train_cpu.strip("0.m") != ""),
         "a Kubernetes CPU quantity above 0 such as 8 or 500m" + _AUTO_ON_CLUSTER),
        ("train_memory", (p.train_memory == AUTO and p.launcher != "local")
         or (bool(QUANTITY.match(p.train_memory)) and p.train_memory[0] != "0"),
         "a Kubernetes memory quantity such as 64Gi" + _AUTO_ON_CLUSTER),
        ("evaluate_gpus", p.evaluate_gpus in ("0", "1"), '"0" or "1", as a string'),
        ("gpu_node_selector", all(isinstance(k, str) and isinstance(v, str) and k
                                  for k, v in p.gpu_node_selector.items()), "an object of label names to strings"),
        ("gpu_tolerations", _tolerations_problem(p.gpu_tolerations) is None,
         _tolerations_problem(p.gpu_tolerations) or ""),
        ("priority_class", p.priority_class == "" or (len(p.priority_class) <= 253
                                                      and bool(_DNS_SUBDOMAIN.match(p.priority_class))),
         "empty or the name of a PriorityClass"),
    ]  # fmt: skip
    for name, ok, need in checks:
        if not ok:
            return f"{name}={getattr(p, name)!r}: {need}"
    if p.evaluate_gpus == "1" and gpu_count(p.gpus_per_node) == 0:  # its pod would wait for a GPU forever
        return 'evaluate_gpus="1" with gpus_per_node="0": a CPU run evaluates on CPUs, set evaluate_gpus="0"'
    return None


def _tolerations_problem(tolerations: list) -> str | None:
    """Why ``tolerations`` is not a list of Kubernetes Tolerations the API server would accept, or None."""
    for item in tolerations:
        if not isinstance(item, dict) or set(item) - _TOLERATION_FIELDS:
            return f"{json.dumps(item)} is not a Toleration (fields: {', '.join(sorted(_TOLERATION_FIELDS))})"
        operator = item.get("operator", "Equal")
        if operator not in _TOLERATION_OPERATORS or item.get("effect", "NoSchedule") not in (*_TAINT_EFFECTS, ""):
            return f"{json.dumps(item)}: operator Exists or Equal, effect one of {', '.join(_TAINT_EFFECTS)}"
        if operator == "Exists" and item.get("value"):
            return f"{json.dumps(item)}: an Exists toleration has no value"
        if not item.get("key") and operator != "Exists":
            return f"{json.dumps(item)}: a toleration without a key must use operator Exists"
    return None


def _known_config(config: str) -> bool:
    """A shipped config's name, or a YAML file (a path in the training image: it cannot be checked here)."""
    return config in configs.available() or config.endswith(_CONFIG_FILE)


def _overrides_problem(overrides: str) -> str | None:
    """Why ``config_overrides`` is not a list of dotted ``key=value`` items, or None."""
    try:
        items = shlex.split(overrides)
    except ValueError as exc:
        return f"unbalanced quotes ({exc})"
    for item in items:
        key, sep, _ = item.partition("=")
        if not sep or not _OVERRIDE_KEY.match(key):
            return f"{item!r} is not a dotted key=value override such as trainer.max_steps=300"
    return None


def typed(name: str, value: str) -> Any:
    """A ``key=value`` setting's value with the parameter's type; HablaError for an unknown name or bad value."""
    kinds = {f.name: _TYPES.get(f.type, f.type) for f in dataclasses.fields(RunParameters)}
    if name not in kinds:
        import difflib

        close = difflib.get_close_matches(name, list(kinds), n=1, cutoff=0.6)
        hint = f": did you mean {close[0]}?" if close else ""
        raise HablaError(f"unknown pipeline parameter {name!r}{hint} (known: {', '.join(sorted(kinds))})")
    kind = kinds[name]
    try:
        if kind in (dict, list):
            parsed = json.loads(value)
            if not isinstance(parsed, kind):
                raise ValueError(value)
            return parsed
        return kind(value) if kind in (int, float) else value
    except ValueError:
        raise HablaError(f"pipeline parameter {name} needs {_KIND_NAMES[kind]}, got {value!r}") from None


def gpu_count(value: str | int) -> int:
    """GPUs per node from the pipeline's ``gpus_per_node``: a STRING parameter (see pipelines/training_pipeline.py
    ``check_pod_spec_parameters``), a whole number >= 0."""
    text = str(value).strip()
    if not (text.isascii() and text.isdigit()):  # not "²": isdigit() but not int()
        raise HablaError(f"gpus_per_node must be a whole number >= 0, got {value!r}")
    return int(text)
