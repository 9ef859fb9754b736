"""habla: Common Voice -> NeMo ASR on Kubeflow."""

__version__ = "0.1.0"
