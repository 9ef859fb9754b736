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

from habla.core.errors import HablaError
from habla.runs.parameters import DEFAULT_PREP_IMAGE, DEFAULT_TRAIN_IMAGE

DEFAULT_CONVERSION_PARALLELISM = 16
_IMAGE = re.compile(r"^[^\s]+$")
_DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")


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

    def unpinned(self) -> list[str]:
        """The images named by a tag rather than a digest (``…@sha256:<64 hex>``): a tag can be moved, so a run
        may not get the image it was compiled with (infra/build.sh prints the digests to use)."""
        images = dict.fromkeys((self.prep_image, self.train_image))
        return [i for i in images if not _DIGEST.search(i)]

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
