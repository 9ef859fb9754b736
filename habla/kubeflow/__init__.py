"""Kubeflow: the KFP API client, compile options, TrainJob/PyTorchJob specs, the job follower, and torchrun
for local runs. The pipelines and their components live in habla.pipelines and habla.components."""
