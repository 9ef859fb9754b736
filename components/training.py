"""Training steps: record the run, then train in this pod (local/single node) or as a cluster job."""

from habla.components import PREP_IMAGE, TRAIN_IMAGE
from kfp import dsl
from kfp.dsl import Metrics, Output


@dsl.component(base_image=PREP_IMAGE, install_kfp_package=False)
def start_run(
    output_uri: str,
    run_name: str,
    job_name: str,
    release_uri: str,
    locale: str,
    config: str,
    config_overrides: str,
    nodes: int,
    gpus_per_node: int,
    max_steps: int,
    max_epochs: int,
    train_source: str,
    audio_format: str,
    num_shards: int,
    launcher: str,
    promotion_margin: float,
) -> str:
    """Write the run's parameters to ``<output_uri>/runs/<run>/run.json``. Returns the run folder."""
    from habla import commonvoice, runs

    name = run_name or job_name
    run = runs.run_dir(output_uri, name)
    runs.write_run_record(
        run,
        {
            "run_name": name,
            "release": commonvoice.release_label(release_uri),
            "release_uri": release_uri,
            "locale": locale,
            "config": config,
            "config_overrides": config_overrides,
            "nodes": nodes,
            "gpus_per_node": gpus_per_node,
            "max_steps": max_steps,
            "max_epochs": max_epochs,
            "train_source": train_source,
            "format": audio_format,
            "num_shards": num_shards,
            "launcher": launcher,
            "promotion_margin": promotion_margin,
        },
    )
    return run


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def train_here(
    run_dir: str,
    dataset_uri: str,
    config: str,
    config_overrides: str,
    max_steps: int,
    max_epochs: int,
    init_from: str,
    nodes: int,
    gpus_per_node: int,
    training: Output[Metrics],
) -> str:
    """Train in this step's own pod: ``torchrun`` with one process per GPU (or per simulated node on CPU).

    What ``habla pipeline run-local`` uses; on a cluster it suits one-node runs (the step requests the GPUs).
    Returns the model's URI.
    """
    from habla import launcher, runs, storage

    model_dir = storage.join(run_dir, "model")
    args = runs.train_arguments(dataset_uri, model_dir, config, config_overrides, max_steps, max_epochs, init_from)
    launcher.run_local(args, nproc_per_node=max(gpus_per_node, 1), nnodes=nodes)
    for key, value in runs.training_metrics(model_dir).items():
        training.log_metric(key, value)
    return storage.absolute(storage.join(model_dir, "model.nemo"))


@dsl.component(base_image=PREP_IMAGE, install_kfp_package=False)
def train_on_cluster(
    run_dir: str,
    dataset_uri: str,
    config: str,
    config_overrides: str,
    max_steps: int,
    max_epochs: int,
    init_from: str,
    nodes: int,
    gpus_per_node: int,
    kind: str,
    image: str,
    job_id: str,
    task_name: str,
    training: Output[Metrics],
) -> str:
    """Train as a Kubeflow Trainer ``TrainJob`` (kind ``trainjob``) or a ``PyTorchJob`` of nodes × GPUs.

    This step only launches and follows the job (it needs no GPU); the job's pods run the unchanged
    ``habla train``, with S3 credentials from the ``habla-s3-credentials`` Secret. A retried step adopts
    the job it started before. Returns the model's URI.
    """
    import os

    from habla import launcher, runs, storage

    model_dir = storage.join(run_dir, "model")
    args = runs.train_arguments(dataset_uri, model_dir, config, config_overrides, max_steps, max_epochs, init_from)
    env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION") if os.environ.get(k)}
    launch = launcher.TrainLaunch(
        image=image,
        name=launcher.job_name(job_id, task_name),
        train_args=tuple(args),
        namespace=launcher.current_namespace(),
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        env=env,
    )
    launcher.run_on_cluster(launch, kind)
    for key, value in runs.training_metrics(model_dir).items():
        training.log_metric(key, value)
    return storage.absolute(storage.join(model_dir, "model.nemo"))
