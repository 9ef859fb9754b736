"""Fine-tuning a checkpoint as it is: ``habla train --init-from MODEL`` without ``--config``.

The ``.nemo`` (a tar archive: ``model_config.yaml``, ``model_weights.ckpt`` and the tokenizer's files) is read
here without NeMo: its model class, its config and its tokenizer. The run's habla config is made from them
(:func:`config_for`): the checkpoint's own model section (preprocessor, SpecAugment, encoder, heads, losses and
their weights, tokenizer, decoding), new ``train_ds``/``validation_ds`` for habla's manifests, and the fine-tuning
optimiser below. ``habla train`` then restores the checkpoint as its own class (a hybrid stays hybrid and trains
both losses as its ``aux_ctc.ctc_loss_weight`` weights them; a CTC model stays CTC; a transducer stays a
transducer) and trains it with the plan of habla.training.budget, as with any config.

Fine-tuning defaults (NeMo's fine-tuning reference, ``examples/asr/conf/asr_finetune/
speech_to_text_finetune.yaml``: AdamW lr 1e-4, betas 0.9/0.98, weight decay 1e-3, cosine annealing, 32
utterances per device, a budget in epochs; its 5,000 warmup steps are for runs of tens of thousands of steps):
a warmup of 1,000 optimizer steps capped at a tenth of the run, cosine to 1e-6, 10 epochs, a global batch of
256 (32 on each of 8 GPUs, as the reference runs), validation and a checkpoint once per epoch. Every one of them
is a ``key=value`` override like any config's (``trainer.max_epochs=5 model.optim.lr=5e-5 global_batch=128``).
"""

from __future__ import annotations

import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from habla.core.errors import HablaError, one_line

log = logging.getLogger("habla.train")

CTC = ("EncDecCTCModel", "EncDecCTCModelBPE")
HYBRID = ("EncDecHybridRNNTCTCModel", "EncDecHybridRNNTCTCBPEModel")
TRANSDUCER = ("EncDecRNNTModel", "EncDecRNNTBPEModel")
SUPPORTED = CTC + HYBRID + TRANSDUCER

SOURCE = "NeMo examples/asr/conf/asr_finetune/speech_to_text_finetune.yaml (lr, betas, weight decay, schedule, batch)"
LR = 1e-4
MIN_LR = 1e-6
WARMUP_STEPS = 1000
MAX_WARMUP_FRACTION = 0.1
EPOCHS = 10
PER_DEVICE_BATCH = 32
GLOBAL_BATCH = 256


@dataclass(frozen=True)
class Checkpoint:
    """What a ``.nemo`` holds, read without NeMo."""

    path: Path
    class_name: str
    target: str
    model: dict  # model_config.yaml
    members: tuple[str, ...]

    @property
    def family(self) -> str:
        """``ctc``, ``hybrid`` or ``transducer``."""
        return "ctc" if self.class_name in CTC else "hybrid" if self.class_name in HYBRID else "transducer"

    @property
    def is_bpe(self) -> bool:
        return self.model.get("tokenizer") is not None

    def tokenizer_member(self, suffix: str = "tokenizer.model") -> str | None:
        """The archive member of the tokenizer's file ``suffix`` (``tokenizer.model``, ``vocab.txt``,
        ``tokenizer.vocab``), as NeMo names it (``nemo:<hash>_tokenizer.model`` in the config)."""
        tok = self.model.get("tokenizer") or {}
        key = {"tokenizer.model": "model_path", "vocab.txt": "vocab_path", "tokenizer.vocab": "spe_tokenizer_vocab"}
        named = str(tok.get(key.get(suffix, ""), "") or "")
        if named.startswith("nemo:"):
            wanted = named[len("nemo:") :]
            for member in self.members:
                if member.rsplit("/", 1)[-1] == wanted:
                    return member
        found = [m for m in self.members if m.rsplit("/", 1)[-1].endswith(suffix)]
        return found[0] if len(found) == 1 else None

    def extract_tokenizer(self, folder: Path) -> Path:
        """The tokenizer's files as NeMo's BPE models want a tokenizer folder (``tokenizer.model``,
        ``vocab.txt``, ``tokenizer.vocab``)."""
        folder.mkdir(parents=True, exist_ok=True)
        with tarfile.open(self.path, "r:*") as tar:
            for name in ("tokenizer.model", "vocab.txt", "tokenizer.vocab"):
                member = self.tokenizer_member(name)
                if member is None:
                    if name == "tokenizer.model":
                        raise HablaError(f"--init-from {self.path}: holds no SentencePiece tokenizer.model")
                    continue
                data = tar.extractfile(member)
                if data is None:
                    raise HablaError(f"--init-from {self.path}: {member} is not a file")
                (folder / name).write_bytes(data.read())
        return folder


def read_checkpoint(path: Path, what: str = "--init-from") -> Checkpoint:
    """The class, config and members of a ``.nemo``; a file that is not one (corrupt, truncated, another
    format) is one line."""
    try:
        size = path.stat().st_size
        with tarfile.open(path, "r:*") as tar:
            members = tar.getmembers()
            for m in members:
                if m.isfile() and m.offset_data + m.size > size:
                    raise HablaError(f"{what} {path}: truncated (its member {m.name} ends past the end of the file)")
            names = tuple(m.name for m in members)
            config_member = next((m for m in members if m.name.rsplit("/", 1)[-1] == "model_config.yaml"), None)
            if config_member is None or not any(n.endswith("model_weights.ckpt") for n in names):
                raise HablaError(
                    f"{what} {path}: not a NeMo checkpoint (a .nemo holds model_config.yaml and model_weights.ckpt)"
                )
            raw = tar.extractfile(config_member).read()
    except HablaError:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise HablaError(f"{what} {path}: not a readable .nemo, corrupt or truncated ({one_line(exc)})") from None
    try:
        model = yaml.safe_load(raw.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise HablaError(f"{what} {path}: its model_config.yaml is not valid YAML ({one_line(exc)})") from None
    if not isinstance(model, dict):
        raise HablaError(f"{what} {path}: its model_config.yaml is not a mapping")
    target = str(model.get("target") or "")
    class_name = target.rsplit(".", 1)[-1]
    if class_name not in SUPPORTED:
        shown = class_name or "model without a target class"
        raise HablaError(
            f"{what} {path}: a {shown}, which habla cannot fine-tune; supported: CTC ({', '.join(CTC)}), "
            f"hybrid RNNT/CTC ({', '.join(HYBRID)}) and transducer ({', '.join(TRANSDUCER)}) models"
        )
    return Checkpoint(path=path, class_name=class_name, target=target, model=model, members=names)


def _dataset(sample_rate: int, train: bool) -> dict:
    ds = {
        "manifest_filepath": None,
        "sample_rate": sample_rate,
        "batch_size": PER_DEVICE_BATCH,
        "shuffle": train,
        "num_workers": 8,
        "pin_memory": True,
        "use_start_end_token": False,
    }
    if train:
        ds.update(max_duration=20.0, min_duration=0.1, is_tarred=False, tarred_audio_filepaths=None, shuffle_n=2048,
                  bucketing_strategy="fully_randomized", bucketing_batch_size=None)  # fmt: skip
    return ds


def config_dict(ck: Checkpoint) -> dict:
    """The habla config of a fine-tuning run of ``ck`` (see the module's docstring)."""
    model = {k: v for k, v in ck.model.items() if k not in ("train_ds", "validation_ds", "test_ds", "optim")}
    if ck.is_bpe:  # a BPE model also saves its pieces as labels; the tokenizer is what it is built from
        model.pop("labels", None)
    sample_rate = int(model.get("sample_rate") or (model.get("preprocessor") or {}).get("sample_rate") or 16000)
    model["sample_rate"] = sample_rate
    model["train_ds"] = _dataset(sample_rate, train=True)
    model["validation_ds"] = _dataset(sample_rate, train=False)
    model["optim"] = {
        "name": "adamw",
        "lr": LR,
        "betas": [0.9, 0.98],
        "weight_decay": 0.001,
        "sched": {"name": "CosineAnnealing", "warmup_steps": WARMUP_STEPS, "warmup_ratio": None, "min_lr": MIN_LR},
    }
    return {
        "name": f"finetune_{ck.class_name}",
        "global_batch": GLOBAL_BATCH,
        "scale_lr": None,
        "validate_every_steps": None,
        "resources": {"loader_worker_memory_gib": 3.0, "process_memory_gib": 8.0, "gpu_batch_search": False},
        "fine_tune": {
            "checkpoint_class": ck.class_name,
            "family": ck.family,
            "freeze_encoder_steps": 0,
            "max_warmup_fraction": MAX_WARMUP_FRACTION,
            "defaults_from": SOURCE,
        },
        "model": model,
        "trainer": {
            "devices": 1,
            "num_nodes": 1,
            "accelerator": "auto",
            "max_steps": -1,
            "max_epochs": EPOCHS,
            "gradient_clip_val": 0.0,
            "precision": "bf16-mixed",
            "log_every_n_steps": 10,
            "num_sanity_val_steps": 0,
            "sync_batchnorm": True,
            "enable_progress_bar": False,
            "benchmark": False,
        },
        "checkpoint": {"monitor": "val_wer", "mode": "min", "save_top_k": 3, "save_last": True},
    }


def check_vocabulary(ck: Checkpoint, texts: list[str], scratch: Path) -> Path | None:
    """Every character of the train text must be one the checkpoint's tokenizer (or labels) can encode, else
    one line naming them and how to re-tokenise. Returns the extracted tokenizer folder (BPE models)."""
    from habla.training import tokenizer

    hint = (
        "to re-tokenise, train with --config fastconformer_ctc_bpe --init-from MODEL (a tokenizer of the train "
        "text, new heads), or normalize the text with habla prepare"
    )
    if ck.is_bpe:
        folder = ck.extract_tokenizer(scratch)
        missing = tokenizer.uncovered_by_tokenizer(folder / "tokenizer.model", texts)
    else:
        labels = ck.model.get("labels") or (ck.model.get("decoder") or {}).get("vocabulary") or []
        from habla.speech.text import uncovered_characters

        folder, missing = None, sorted(uncovered_characters((t.strip().lower() for t in texts), labels))
    if missing:
        shown = " ".join(repr(c) for c in missing[:12])
        raise HablaError(
            f"the train text uses {len(missing)} character(s) the tokenizer of --init-from {ck.path.name} cannot "
            f"encode: {shown}; {hint}"
        )
    return folder


def plan_note(cfg) -> dict:
    """What train_summary.json and --dry-run record of a fine-tuning run (after the plan: the warmup is the
    capped one)."""
    ft = cfg.get("fine_tune")
    if ft is None:
        return {}
    from omegaconf import OmegaConf

    optim = cfg.model.optim
    sched = optim.get("sched") or {}
    out = OmegaConf.to_container(ft, resolve=True)
    out["optimizer"] = {"name": optim.get("name"), "lr": optim.get("lr"), "weight_decay": optim.get("weight_decay"),
                        "sched": sched.get("name"), "warmup_steps": sched.get("warmup_steps"),
                        "min_lr": sched.get("min_lr")}  # fmt: skip
    out["max_epochs"] = cfg.trainer.get("max_epochs")
    return out
