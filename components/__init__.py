"""KFP v2 components: thin adapters over habla's functions (installed as ``habla.components``).

Every component is a lightweight Python component whose body imports habla; the images in ``infra/``
carry habla and kfp, so nothing is pip-installed when a step runs (``install_kfp_package=False``).
The images are chosen when the pipeline is compiled: ``HABLA_PREP_IMAGE`` (slim, CPU: data steps and
the training launcher) and ``HABLA_TRAIN_IMAGE`` (CUDA + NeMo: training and evaluation).
"""

import os

from habla import __version__

PREP_IMAGE = os.environ.get("HABLA_PREP_IMAGE", f"ghcr.io/habla-asr/habla-prep:{__version__}")
TRAIN_IMAGE = os.environ.get("HABLA_TRAIN_IMAGE", f"ghcr.io/habla-asr/habla-train:{__version__}")
