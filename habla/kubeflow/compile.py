"""What is fixed when a pipeline is compiled (:class:`CompileOptions`): the images of its steps and the
conversion fan-out.

KFP needs these when the pipeline graph is built: a ParallelFor's parallelism must be a constant, and a
step's image is part of its executor. They are passed as an argument to the pipelines' ``build_pipeline``
and ``compile_pipeline`` (habla.pipelines), never read from the environment; the watcher forwards them to
the training pipeline it compiles. Light on purpose: the CLI builds ``--help`` from the defaults.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass

from habla import __version__
from habla.core.errors import HablaError

DEFAULT_PREP_IMAGE = f"ghcr.io/habla-asr/habla-prep:{__version__}"
DEFAULT_TRAIN_IMAGE = f"ghcr.io/habla-asr/habla-train:{__version__}"
DEFAULT_CONVERSION_PARALLELISM = 16
_IMAGE = re.compile(r"^[^\s]+$")


@dataclass(frozen=True)
class CompileOptions:
    """Images and fan-out of a compiled pipeline."""

    prep_image: str = DEFAULT_PREP_IMAGE  # slim CPU image: data steps, glue steps, the training launcher
    train_image: str = DEFAULT_TRAIN_IMAGE  # CUDA + NeMo: training in the step's pod, evaluation
    conversion_parallelism: int = DEFAULT_CONVERSION_PARALLELISM  # shards converted at once

    def __post_init__(self) -> None:
        for what in ("prep_image", "train_image"):
            if not _IMAGE.match(getattr(self, what) or ""):
                raise HablaError(f"--{what.replace('_', '-')} must be an image reference, got {getattr(self, what)!r}")
        value = self.conversion_parallelism
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise HablaError(f"--conversion-parallelism must be an integer >= 1, got {value!r}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CompileOptions:
        """The options a watcher was compiled with (empty text: the defaults)."""
        try:
            values = json.loads(text) if text else {}
            return cls(**values)
        except (ValueError, TypeError) as exc:
            raise HablaError(f"compile options {text!r} are not valid ({exc})") from None
