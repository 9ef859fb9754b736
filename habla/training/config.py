"""Training configs: NeMo-style YAML files in ``habla/configs/``, selected by name or path, with dotted
``key=value`` overrides (OmegaConf), checked before anything slow happens.

A config has these sections:

- ``name``: a label;
- ``global_batch``: the utterances per optimizer step its optimizer settings were tuned for; habla train
  accumulates gradients to keep it whatever the world size (habla.training.budget). ``batch_size`` in
  ``model.train_ds`` is per device;
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

SECTIONS = ("name", "global_batch", "model", "trainer", "checkpoint")
MODEL_SECTIONS = ("train_ds", "validation_ds", "preprocessor", "encoder", "decoder", "optim")
# Trainer / ModelCheckpoint arguments that habla sets itself.
HABLA_TRAINER_KEYS = ("logger", "callbacks", "plugins", "enable_checkpointing", "default_root_dir")
HABLA_CHECKPOINT_KEYS = ("dirpath", "filename")
CHAR = "char"
BPE = "bpe"

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
        if not add and not _has_key(cfg, key):
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
    if not isinstance(raw, dict):
        raise HablaError(f"{path}: a config is a mapping with sections {', '.join(SECTIONS)}")
    cfg = OmegaConf.create(raw)
    apply_overrides(cfg, overrides)
    check(cfg, str(path))
    try:
        OmegaConf.resolve(cfg)  # NeMo saves the model section alone: ${model.x} must not survive into .nemo
    except OmegaConfBaseException as exc:
        raise HablaError(f"{path}: {one_line(exc, first_line=True)}") from None
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
