"""Training configs: NeMo-style YAML files in ``habla/configs/``, selected by name or path, with dotted
``key=value`` overrides (OmegaConf), checked before anything slow happens.

A config has these sections:

- ``name``: a label;
- ``global_batch``: the utterances per optimizer step its optimizer settings were tuned for; habla train
  accumulates gradients or shrinks the per-device batch to keep it whatever the world size
  (habla.training.budget). ``batch_size`` in ``model.train_ds`` is what one device holds;
- ``scale_lr``: null (refuse a world size that cannot hold ``global_batch``), ``linear`` or ``sqrt`` (scale
  the learning rate with the global batch instead);
- ``validate_every_steps``: optimizer steps between validations (null: once per epoch);
- ``resources``: host memory per training process and loader worker, and whether to size the batch on the
  GPU (habla.training.budget, habla.training.sizing);
- ``fine_tune`` (optional; made by habla.training.finetune for ``--init-from`` without ``--config``): the
  checkpoint's class, ``freeze_encoder_steps`` (train only the heads for the first N optimizer steps) and
  ``max_warmup_fraction`` (the warmup's cap, a fraction of the run);
- ``model``: NeMo's model config (``EncDecCTCModel`` when it has ``labels``, ``EncDecCTCModelBPE`` when it
  has ``tokenizer``); ``train_ds``/``validation_ds`` manifest paths are filled in by ``habla train``;
- ``trainer``: arguments of Lightning's ``Trainer`` (``num_nodes``/``devices`` are derived from the
  launcher's environment when distributed; ``logger``, ``callbacks``, ``plugins`` belong to habla);
- ``checkpoint``: arguments of Lightning's ``ModelCheckpoint`` (where checkpoints go belongs to habla).

An override must name a key the config already has (a typo is an error that suggests the right key);
``+key=value`` adds a new one, as in Hydra.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from pathlib import Path

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from habla.core.errors import HablaError, one_line
from habla.core.settings import split_pair
from habla.training import configs

SECTIONS = ("name", "global_batch", "scale_lr", "validate_every_steps", "resources", "fine_tune", "model", "trainer",
            "checkpoint")  # fmt: skip
RESOURCES = ("loader_worker_memory_gib", "process_memory_gib", "gpu_batch_search")
# habla's own keys: an override may set them whether or not the config has them
HABLA_KEYS = ("global_batch", "scale_lr", "validate_every_steps", *(f"resources.{k}" for k in RESOURCES),
              "fine_tune.freeze_encoder_steps", "fine_tune.max_warmup_fraction")  # fmt: skip
MODEL_SECTIONS = ("train_ds", "validation_ds", "preprocessor", "encoder", "decoder", "optim")
# Trainer / ModelCheckpoint arguments that habla sets itself.
HABLA_TRAINER_KEYS = ("logger", "callbacks", "plugins", "enable_checkpointing", "default_root_dir")
# Trainer arguments habla derives from a habla key, which says what to set instead.
DERIVED_TRAINER_KEYS = {"val_check_interval": "validate_every_steps", "check_val_every_n_epoch": "validate_every_steps"}
HABLA_CHECKPOINT_KEYS = ("dirpath", "filename")
CHAR = "char"
BPE = "bpe"
#: NeMo's optimizers by name (nemo.core.optim.optimizers.AVAILABLE_OPTIMIZERS, NeMo 3.0; a test keeps them equal).
OPTIMIZERS = ("adadelta", "adafactor", "adagrad", "adam", "adamax", "adamw", "adan", "novograd", "rmsprop", "rprop",
              "sgd")  # fmt: skip

_ABSENT = object()


def config_path(name_or_path: str) -> Path:
    """A shipped config's name (``tiny_ctc_char``) or a YAML file's path."""
    shipped = configs.find(name_or_path)
    if shipped is not None:
        return shipped
    path = Path(name_or_path)
    if path.is_file():
        return path
    raise HablaError(f"no config {name_or_path!r}: give one of {', '.join(configs.available())} or a YAML file's path")


def _leaf_keys(node, prefix: str = "") -> list[str]:
    keys = []
    items = node.items() if isinstance(node, DictConfig) else enumerate(node) if isinstance(node, ListConfig) else []
    for key, _ in items:
        path = f"{prefix}{key}"
        keys.append(path)
        child = node._get_node(key)
        if isinstance(child, (DictConfig, ListConfig)):
            keys.extend(_leaf_keys(child, path + "."))
    return keys


def _has_key(cfg: DictConfig, key: str) -> bool:
    return OmegaConf.select(cfg, key, default=_ABSENT) is not _ABSENT or key in OmegaConf.missing_keys(cfg)


def parse_override(item: str) -> tuple[str, object, bool]:
    """``a.b=1`` -> ("a.b", 1, False); ``+a.c=x`` -> ("a.c", "x", True). Values are parsed as YAML."""
    key, text = split_pair(item, "a config override (for example trainer.max_steps=300)")
    add = key.startswith("+")
    key = key.lstrip("+").strip()
    if not key:
        raise HablaError(f"override {item!r} names no key")
    try:
        value = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={text}"]))["v"]
    except OmegaConfBaseException as exc:
        raise HablaError(f"override {item!r}: cannot parse the value ({one_line(exc, first_line=True)})") from None
    return key, value, add


def apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """Apply dotted overrides in place; an unknown key is an error unless it starts with ``+``."""
    for item in overrides:
        key, value, add = parse_override(item)
        if not add and not _has_key(cfg, key) and key not in HABLA_KEYS:
            close = difflib.get_close_matches(key, _leaf_keys(cfg), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise HablaError(f"override {item!r}: the config has no key {key}{hint}; write +{key}=... to add one")
        if not add:
            _check_type(item, OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False), value)
        try:
            OmegaConf.update(cfg, key, value, merge=False, force_add=add)
        except OmegaConfBaseException as exc:
            raise HablaError(f"override {item!r}: {one_line(exc, first_line=True)}") from None


def _check_type(item: str, old: object, new: object) -> None:
    """An override keeps the kind of value the config has there: ``model.optim.lr=abc`` fails now, in one
    line, not mid-fit. Numbers stay finite numbers, booleans booleans, lists lists; ``null`` is always allowed
    (it disables a section) and a string setting takes any scalar (``trainer.precision=16``)."""
    if new is None or old is None:
        return
    if isinstance(new, float) and not math.isfinite(new):
        raise HablaError(f"override {item!r}: not a finite number")
    if isinstance(old, bool):
        expected, ok = "true or false", isinstance(new, bool)
    elif isinstance(old, (int, float)):
        expected, ok = "a number", isinstance(new, (int, float)) and not isinstance(new, bool)
    elif isinstance(old, (ListConfig, list)):
        expected, ok = "a list", isinstance(new, list)
    elif isinstance(old, (DictConfig, dict)):
        expected, ok = "a mapping", isinstance(new, dict)
    else:
        expected, ok = "a single value", not isinstance(new, (list, dict))
    if not ok:
        shown = repr(old) if len(repr(old)) <= 40 else repr(old)[:39] + "…"
        raise HablaError(f"override {item!r}: expects {expected} (the config has {shown}), got {new!r}")


def model_kind(cfg: DictConfig) -> str:
    """``char`` (labels) or ``bpe`` (tokenizer)."""
    return BPE if cfg.model.get("tokenizer") is not None else CHAR


def load(name_or_path: str, overrides: Sequence[str] = ()) -> DictConfig:
    """Load, override, check and resolve a config. Every problem is one HablaError line."""
    path = config_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise HablaError(f"{path}: not valid YAML ({one_line(exc, first_line=True)})") from None
    return load_mapping(raw, str(path), overrides)


def load_mapping(raw: object, where: str, overrides: Sequence[str] = ()) -> DictConfig:
    """:func:`load` for a config given as a mapping (habla.training.finetune makes one from a checkpoint)."""
    if not isinstance(raw, dict):
        raise HablaError(f"{where}: a config is a mapping with sections {', '.join(SECTIONS)}")
    try:
        cfg = OmegaConf.create(raw)
    except OmegaConfBaseException as exc:
        raise HablaError(f"{where}: {one_line(exc, first_line=True)}") from None
    apply_overrides(cfg, overrides)
    check(cfg, where)
    try:
        OmegaConf.resolve(cfg)  # NeMo saves the model section alone: ${model.x} must not survive into .nemo
    except OmegaConfBaseException as exc:
        raise HablaError(f"{where}: {one_line(exc, first_line=True)}") from None
    return cfg


def check(cfg: DictConfig, where: str) -> None:
    """Structure checks that need no NeMo/Lightning import."""
    unknown = [k for k in cfg if k not in SECTIONS]
    if unknown:
        raise HablaError(
            f"{where}: unknown section(s) {', '.join(map(str, unknown))}; a config has {', '.join(SECTIONS)}"
        )
    for section in ("model", "trainer"):
        if not isinstance(cfg.get(section), DictConfig):
            raise HablaError(f"{where}: missing section {section}")
    model = cfg.model
    absent = [s for s in MODEL_SECTIONS if model.get(s) is None]
    if absent:
        raise HablaError(f"{where}: model lacks {', '.join(absent)}")
    has_labels, has_tokenizer = model.get("labels") is not None, model.get("tokenizer") is not None
    if has_labels == has_tokenizer:
        raise HablaError(f"{where}: model needs exactly one of labels (characters) or tokenizer (BPE)")
    if has_labels and (not isinstance(model.labels, ListConfig) or len(model.labels) < 2):
        raise HablaError(f"{where}: model.labels must be a list of at least two characters")
    if has_tokenizer and model.tokenizer.get("type", "bpe") != "bpe":
        raise HablaError(f"{where}: model.tokenizer.type must be bpe (SentencePiece)")
    global_batch = cfg.get("global_batch")
    if global_batch is not None and (
        isinstance(global_batch, bool) or not isinstance(global_batch, int) or global_batch < 1
    ):
        raise HablaError(f"{where}: global_batch must be a whole number of utterances >= 1 (got {global_batch!r})")
    taken = [k for k in HABLA_TRAINER_KEYS if k in cfg.trainer]
    if taken:
        raise HablaError(f"{where}: trainer.{taken[0]} is set by habla train; remove it from the config")
    derived = [k for k in DERIVED_TRAINER_KEYS if k in cfg.trainer]
    if derived:
        raise HablaError(
            f"{where}: trainer.{derived[0]} is set by habla train from {DERIVED_TRAINER_KEYS[derived[0]]} (in "
            "optimizer steps, whatever the world size); set that instead"
        )
    resources = cfg.get("resources")
    if resources is not None:
        if not isinstance(resources, DictConfig):
            raise HablaError(f"{where}: resources must be a mapping with keys {', '.join(RESOURCES)}")
        for key in resources:
            if key not in RESOURCES:
                close = difflib.get_close_matches(str(key), RESOURCES, n=1)
                hint = f" (did you mean resources.{close[0]}?)" if close else ""
                raise HablaError(f"{where}: unknown key resources.{key}{hint}; resources has {', '.join(RESOURCES)}")
    steps, epochs = cfg.trainer.get("max_steps", -1), cfg.trainer.get("max_epochs", None)
    if (steps is None or steps < 0) and (epochs is None or epochs < 0):
        raise HablaError(f"{where}: set trainer.max_steps or trainer.max_epochs (training would never end)")
    for ds in ("train_ds", "validation_ds"):
        batch = model[ds].get("batch_size") if isinstance(model[ds], DictConfig) else None
        if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
            raise HablaError(f"{where}: model.{ds}.batch_size must be a positive integer (got {batch!r})")
    checkpoint = cfg.get("checkpoint") or {}
    taken = [k for k in HABLA_CHECKPOINT_KEYS if k in checkpoint]
    if taken:
        raise HablaError(f"{where}: checkpoint.{taken[0]} is set by habla train; remove it from the config")
    for key, ok, need in _VALUE_CHECKS:
        value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
        if value is not None and not ok(value):
            raise HablaError(f"{where}: {key} is {value!r}; it must be {need}")


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _devices(value: object) -> bool:
    """Lightning's ``devices``: a count >= 1, -1 (every device), "auto", or a list of device indices."""
    if isinstance(value, (list, ListConfig)):
        return len(value) > 0 and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    if isinstance(value, str):
        return value == "auto" or value.lstrip("-").isdigit() and _devices(int(value))
    return isinstance(value, int) and not isinstance(value, bool) and (value >= 1 or value == -1)


# Values a typo or a sign turns into a traceback minutes into training (or a silently broken run).
_VALUE_CHECKS = (
    ("model.sample_rate", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1000, "a rate in Hz"),
    ("model.optim.name", lambda v: isinstance(v, str) and v.lower() in OPTIMIZERS, "one of " + ", ".join(OPTIMIZERS)),
    ("model.optim.lr", lambda v: _number(v) and 0 < v < 10, "a learning rate above 0 (and below 10)"),
    ("model.optim.weight_decay", lambda v: _number(v) and v >= 0, "a number >= 0"),
    ("model.optim.sched.warmup_steps", lambda v: _number(v) and v >= 0, "a number of steps >= 0"),
    ("model.optim.sched.min_lr", lambda v: _number(v) and v >= 0, "a learning rate >= 0"),
    ("trainer.devices", _devices, "a device count >= 1, -1 (all), auto, or a list of device indices"),
    ("trainer.num_nodes", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a whole number >= 1"),
    ("trainer.accumulate_grad_batches", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
     "a whole number >= 1"),
    ("trainer.gradient_clip_val", lambda v: _number(v) and v >= 0, "a number >= 0"),
    ("trainer.log_every_n_steps", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
     "a whole number >= 1"),
    ("validate_every_steps", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
     "a whole number of optimizer steps >= 1 (or null: once per epoch)"),
    ("scale_lr", lambda v: v in ("linear", "sqrt"), "null, linear or sqrt"),
    ("resources.loader_worker_memory_gib", lambda v: _number(v) and v > 0, "a number of GiB above 0"),
    ("resources.process_memory_gib", lambda v: _number(v) and v > 0, "a number of GiB above 0"),
    ("resources.gpu_batch_search", lambda v: isinstance(v, bool), "true or false"),
    ("fine_tune.freeze_encoder_steps", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
     "a whole number of optimizer steps >= 0"),
    ("fine_tune.max_warmup_fraction", lambda v: _number(v) and 0 < v <= 1, "a fraction of the run above 0, at most 1"),
)  # fmt: skip


def check_against_signatures(cfg: DictConfig) -> None:
    """trainer and checkpoint keys must be arguments of Lightning's Trainer / ModelCheckpoint (imports Lightning)."""
    import inspect

    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    for section, target in (("trainer", Trainer), ("checkpoint", ModelCheckpoint)):
        accepted = set(inspect.signature(target.__init__).parameters) - {"self"}
        for key in cfg.get(section) or {}:
            if key not in accepted:
                close = difflib.get_close_matches(str(key), sorted(accepted), n=1)
                hint = f" (did you mean {section}.{close[0]}?)" if close else ""
                raise HablaError(f"{section}.{key} is not an argument of Lightning's {target.__name__}{hint}")
