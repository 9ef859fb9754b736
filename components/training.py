"""Training steps: record the run, then train in this pod (local/single node) or as a cluster job."""

from kfp import dsl
from kfp.dsl import Metrics, Output

from habla.runs.parameters import DEFAULT_PREP_IMAGE, DEFAULT_TRAIN_IMAGE


@dsl.component(base_image=DEFAULT_PREP_IMAGE, install_kfp_package=False)
def start_run(
    run_id: str,
    step_image: str,
    release_uri: str,
    output_uri: str,
    locale: str,
    num_shards: int,
    workers_per_shard: int,
    train_source: str,
    audio_format: str,
    min_duration: float,
    max_duration: float,
    config: str,
    config_overrides: str,
    init_from: str,
    overlap_with: str,
    nodes: int,
    gpus_per_node: str,
    max_steps: int,
    max_epochs: int,
    launcher: str,
    runtime: str,
    train_image: str,
    train_cpu: str,
    train_memory: str,
    evaluate_gpus: str,
    gpu_node_selector: dict,
    gpu_tolerations: list,
    priority_class: str,
    promotion_margin: float,
    run_name: str,
) -> str:
    """Claim ``<output_uri>/runs/<run>/`` for this KFP run (``run_id``) and write its parameters to run.json.

    ``<run>`` is ``run_name``, else the run id: no two runs ever share a folder or its checkpoints. Returns the
    run folder. Its inputs are the pipeline's parameters (habla.runs.parameters.RunParameters, which checks
    them), passed on whole, and ``step_image``: the image the pipeline's own training and evaluation steps were
    compiled with, which ``train_image`` must name (one image trains and scores a model).
    """
    parameters = dict(locals())  # first statement: exactly this step's inputs
    from habla.core.errors import pipeline_step

    with pipeline_step("start-run"):
        from habla.runs.parameters import RunParameters
        from habla.runs.record import start_run as start

        run_id, compiled = parameters.pop("run_id"), parameters.pop("step_image")
        params = RunParameters(**parameters)
        params.check_image(compiled)
        return start(params, run_id).root


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
    train_cpu: str,
    train_memory: str,
    training: Output[Metrics],
) -> str:
    """Train in this step's own pod: ``torchrun`` with one process per GPU (or per simulated node on CPU).

    What ``habla pipeline run-local`` uses; on a cluster it suits one-node runs (the step requests the GPUs, and
    ``train_cpu`` and ``train_memory``: inputs so that KFP hands the pod spec these parameters inside the If).
    Returns the model's URI.
    """
    from habla.core.errors import pipeline_step

    with pipeline_step("train-here"):
        print(f"training pod: {gpus_per_node} GPU(s), {train_cpu} CPU, {train_memory} memory", flush=True)
        from habla.kubeflow.torchrun import train_here as train
        from habla.training.command import TrainStep

        step = TrainStep(run_dir, dataset_uri, config, config_overrides, max_steps, max_epochs, init_from)
        model, numbers = train(step, nodes, gpus_per_node)
        for key, value in numbers.items():
            training.log_metric(key, value)
        return model


@dsl.component(base_image=DEFAULT_TRAIN_IMAGE, install_kfp_package=False)
def plan_training(
    dataset_uri: str,
    config: str,
    config_overrides: str,
    max_steps: int,
    max_epochs: int,
    init_from: str,
    nodes: int,
    gpus_per_node: str,
    plan: Output[Metrics],
) -> str:
    """The run's plan on ``nodes`` × ``gpus_per_node`` (``habla train --dry-run``: batch, accumulation, learning
    rate, steps, validation cadence, loader memory, each node's CPU and memory), before the cluster job exists.

    A plan habla train would refuse fails here, before any GPU is requested. Returns the plan as JSON: the job's
    pods request its node when ``train_cpu``/``train_memory`` are ``auto``.
    """
    import json

    from habla.core.errors import pipeline_step

    with pipeline_step("plan-training"):
        from habla.kubeflow.cluster_step import plan_training as planned
        from habla.training.command import TrainStep, plan_metrics

        step = TrainStep("", dataset_uri, config, config_overrides, max_steps, max_epochs, init_from)
        result = planned(step, nodes, gpus_per_node)
        for key, value in plan_metrics(result).items():
            plan.log_metric(key, value)
        return json.dumps(result)


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
    train_cpu: str,
    train_memory: str,
    gpu_node_selector: dict,
    gpu_tolerations: list,
    priority_class: str,
    plan: str,
    training: Output[Metrics],
) -> str:
    """Train as a Kubeflow Trainer ``TrainJob`` (kind ``trainjob``, on ClusterTrainingRuntime ``runtime``) or a
    ``PyTorchJob`` of nodes × GPUs.

    This step only launches and follows the job (it needs no GPU); the job's pods run the unchanged
    ``habla train``, with S3 credentials from the ``habla-s3-credentials`` Secret. A retried step adopts
    the job it started before; the job belongs to this step's pod. Its pods request ``train_cpu`` and
    ``train_memory`` each, ``auto``: the node of the run's ``plan`` (``plan_training``'s JSON); PyTorchJob pods
    also get the node selector, tolerations and priority class. Returns the model's URI.
    """
    import json

    from habla.core.errors import pipeline_step

    with pipeline_step("train-on-cluster"):
        from habla.kubeflow.cluster_step import TrainPods
        from habla.kubeflow.cluster_step import train_on_cluster as train
        from habla.training.command import TrainStep

        step = TrainStep(run_dir, dataset_uri, config, config_overrides, max_steps, max_epochs, init_from)
        pods = TrainPods(train_cpu, train_memory, gpu_node_selector, tuple(gpu_tolerations), priority_class)
        model, numbers = train(
            step, nodes, gpus_per_node, kind, runtime, image, job_id, task_name, pods, json.loads(plan)
        )
        for key, value in numbers.items():
            training.log_metric(key, value)
        return model
