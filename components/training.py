"""Training steps: record the run, then train in this pod (local/single node) or as a cluster job."""

from kfp import dsl
from kfp.dsl import Metrics, Output

from habla.kubeflow.compile import DEFAULT_PREP_IMAGE, DEFAULT_TRAIN_IMAGE


@dsl.component(base_image=DEFAULT_PREP_IMAGE, install_kfp_package=False)
def start_run(
    output_uri: str,
    run_name: str,
    run_id: str,
    release_uri: str,
    locale: str,
    config: str,
    config_overrides: str,
    nodes: int,
    gpus_per_node: str,
    max_steps: int,
    max_epochs: int,
    train_source: str,
    audio_format: str,
    num_shards: int,
    launcher: str,
    promotion_margin: float,
) -> str:
    """Claim ``<output_uri>/runs/<run>/`` for this KFP run (``run_id``) and write its parameters to run.json.

    ``<run>`` is ``run_name``, else the run id: no two runs ever share a folder or its checkpoints. Returns the
    run folder.
    """
    from habla.data.commonvoice import release_label
    from habla.kubeflow.jobs import gpu_count
    from habla.ops import registry

    params = {
        "release": release_label(release_uri),
        "release_uri": release_uri,
        "locale": locale,
        "config": config,
        "config_overrides": config_overrides,
        "nodes": nodes,
        "gpus_per_node": gpu_count(gpus_per_node),
        "max_steps": max_steps,
        "max_epochs": max_epochs,
        "train_source": train_source,
        "format": audio_format,
        "num_shards": num_shards,
        "launcher": launcher,
        "promotion_margin": promotion_margin,
    }
    return registry.start_run(output_uri, run_name, run_id, params).root


@dsl.component(base_image=DEFAULT_TRAIN_IMAGE, install_kfp_package=False)
def train_here(
    run_dir: str,
    dataset_uri: str,
    config: str,
    config_overrides: str,
    max_steps: int,
    max_epochs: int,
    init_from: str,
    nodes: int,
    gpus_per_node: str,
    training: Output[Metrics],
) -> str:
    """Train in this step's own pod: ``torchrun`` with one process per GPU (or per simulated node on CPU).

    What ``habla pipeline run-local`` uses; on a cluster it suits one-node runs (the step requests the GPUs).
    Returns the model's URI.
    """
    from habla.core import storage
    from habla.core.layout import RunLayout
    from habla.kubeflow import torchrun
    from habla.kubeflow.jobs import gpu_count
    from habla.training.command import train_arguments, training_metrics

    model = RunLayout(run_dir).train
    args = train_arguments(dataset_uri, model.root, config, config_overrides, max_steps, max_epochs, init_from)
    torchrun.run_local(args, nproc_per_node=max(gpu_count(gpus_per_node), 1), nnodes=nodes)
    for key, value in training_metrics(model.root).items():
        training.log_metric(key, value)
    return storage.absolute(model.model)


@dsl.component(base_image=DEFAULT_PREP_IMAGE, install_kfp_package=False)
def train_on_cluster(
    run_dir: str,
    dataset_uri: str,
    config: str,
    config_overrides: str,
    max_steps: int,
    max_epochs: int,
    init_from: str,
    nodes: int,
    gpus_per_node: str,
    kind: str,
    runtime: str,
    image: str,
    job_id: str,
    task_name: str,
    training: Output[Metrics],
) -> str:
    """Train as a Kubeflow Trainer ``TrainJob`` (kind ``trainjob``, on ClusterTrainingRuntime ``runtime``) or a
    ``PyTorchJob`` of nodes × GPUs.

    This step only launches and follows the job (it needs no GPU); the job's pods run the unchanged
    ``habla train``, with S3 credentials from the ``habla-s3-credentials`` Secret. A retried step adopts
    the job it started before. Returns the model's URI.
    """
    import os

    from habla.core import storage
    from habla.core.layout import RunLayout
    from habla.kubeflow import follow, jobs
    from habla.training.command import train_arguments, training_metrics

    model = RunLayout(run_dir).train
    args = train_arguments(dataset_uri, model.root, config, config_overrides, max_steps, max_epochs, init_from)
    launch = jobs.TrainLaunch(
        image=image,
        name=jobs.job_name(job_id, task_name),
        train_args=tuple(args),
        namespace=jobs.current_namespace(),
        nodes=nodes,
        gpus_per_node=jobs.gpu_count(gpus_per_node),
        runtime=runtime,
        env={k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION") if os.environ.get(k)},
    )
    follow.run_on_cluster(launch, kind)
    for key, value in training_metrics(model.root).items():
        training.log_metric(key, value)
    return storage.absolute(model.model)
