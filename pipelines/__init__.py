"""The habla Kubeflow pipeline."""
