"""The habla pipeline, top to bottom: a Common Voice release → audio in object storage → NeMo model → WER.

    start_run → plan_dataset → convert_dataset [list_shards → ParallelFor(convert_shard) → assemble_dataset]
      → train_here (launcher "local") | train_on_cluster (TrainJob / PyTorchJob)
      → evaluate_models (new and current best, same test set) → If better: package_model (card, ONNX) → promote_model

:func:`build_pipeline` draws the graph for the images and conversion fan-out chosen at compile time
(:class:`~habla.kubeflow.compile.CompileOptions`); :func:`compile_pipeline` writes it as IR YAML. Compile with
``habla pipeline compile``, run locally with ``habla pipeline run-local``, submit with ``habla pipeline submit``.
"""

import re
from pathlib import Path

import yaml
from habla.components.data import assemble_dataset, convert_shard, list_shards, plan_dataset, register_dataset
from habla.components.evaluation import evaluate_models, package_model, promote_model
from habla.components.training import plan_training, start_run, train_here, train_on_cluster
from kfp import compiler, dsl, kubernetes

from habla.core.errors import HablaError
from habla.kubeflow.compile import CompileOptions
from habla.kubeflow.jobs import SHM_SIZE
from habla.runs.parameters import RunParameters

PIPELINE_NAME = "habla-train"
# Kubernetes objects the steps read S3 settings from (manifests/): credentials, and endpoint/region.
S3_SECRET = "habla-s3-credentials"
S3_CONFIG_MAP = "habla-s3-config"
EVALUATION_SHM_SIZE = "4Gi"  # one process, its DataLoader workers: far less than a training node's SHM_SIZE


# What every step reads from the ConfigMap, by whether the kubelet may start the step without it: a required key
# missing from the ConfigMap is CreateContainerConfigError, and the step never starts (every overlay in manifests/
# must hold the required ones; tests/kubeflow/test_manifests.py checks). No endpoint means AWS's own (the aws-s3
# overlay).
S3_CONFIG_REQUIRED = {"AWS_DEFAULT_REGION": "AWS_DEFAULT_REGION"}
S3_CONFIG_OPTIONAL = {"AWS_ENDPOINT_URL": "AWS_ENDPOINT_URL"}
# Retries of the long steps (training, evaluation) must outlive the work they retry: Argo stops retrying a step once
# backoff.maxDuration has passed since its first attempt started, and kills a retry at that deadline
# (argo-workflows workflow/controller/operator.go, v3.7 and v4.0; KFP passes the IR's backoffMaxDuration through,
# backend/src/v2/compiler/argocompiler/container.go); the SDK's default is 3600 s. Each attempt may take this long:
LONGEST_ATTEMPT_S = 7 * 24 * 3600
# and a data step's attempt (planning a 55 GB archive, converting one shard of a 1.7 M-clip release) this long:
DATA_ATTEMPT_S = 12 * 3600


def _step(task: dsl.PipelineTask, image: str) -> dsl.PipelineTask:
    """A step's image, and its S3 access: credentials from the Secret, endpoint and region from the ConfigMap."""
    task.set_container_image(image)
    kubernetes.use_secret_as_env(
        task,
        secret_name=S3_SECRET,
        secret_key_to_env={"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"},
    )
    kubernetes.use_config_map_as_env(task, config_map_name=S3_CONFIG_MAP, config_map_key_to_env=S3_CONFIG_REQUIRED)
    kubernetes.use_config_map_as_env(
        task, config_map_name=S3_CONFIG_MAP, config_map_key_to_env=S3_CONFIG_OPTIONAL, optional=True
    )
    return task


def _glue(task: dsl.PipelineTask, image: str) -> dsl.PipelineTask:
    """A bookkeeping step (records, listings): small requests, so that a namespace whose ResourceQuota counts
    requests and has no LimitRange admits it too."""
    return _step(task, image).set_cpu_request("100m").set_memory_request("512Mi").set_memory_limit("2Gi")


# The data steps' memory (request, limit), from bench/RESULTS.md ("A whole release through object storage"): at
# 1.7 M TSV rows planning peaks under 1 GB, the archive pass adds at most its bundle buffers (256 MB) and four
# 16 MB chunks in flight; a shard's conversion stays under 200 MB per process (its bundle is read from local
# scratch, its tar streamed up in 16 MB parts); assembly of 1.7 M rows merges streams in about 540 MB. Each
# limit leaves twice the request for releases larger than the one measured. CPU: planning uses a second core
# (Arrow, the uploads), conversion one per worker (workers_per_shard, 2 by default: its CPU request).
PLAN_MEMORY = ("2Gi", "4Gi")
CONVERT_MEMORY = ("1Gi", "4Gi")
ASSEMBLE_MEMORY = ("1Gi", "2Gi")


def _shm(task: dsl.PipelineTask, size: str = SHM_SIZE) -> dsl.PipelineTask:
    """A RAM-backed /dev/shm of at most ``size``: PyTorch DataLoader workers pass batches through it (a pod gets
    64 MiB otherwise); it counts against the pod's memory limit."""
    return kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                      size_limit=size)  # fmt: skip


def _retry_long(
    task: dsl.PipelineTask, retries: int, backoff_s: int = 120, attempt_s: int = LONGEST_ATTEMPT_S
) -> dsl.PipelineTask:
    """Retry a step ``retries`` times, ``backoff_s`` apart (doubling), for as long as its attempts (``attempt_s``
    each) may take."""
    window = (retries + 1) * attempt_s + sum(backoff_s * 2**k for k in range(retries))
    return task.set_retry(num_retries=retries, backoff_duration=f"{backoff_s}s", backoff_factor=2.0,
                          backoff_max_duration=f"{window}s")  # fmt: skip


def _on_gpu_nodes(task: dsl.PipelineTask, p) -> dsl.PipelineTask:
    """Let a GPU step onto the GPU nodes: the run's node selector and tolerations (STRUCT and LIST parameters,
    resolved by KFP's driver: backend/src/v2/driver/k8s.go, 2.16 and 2.17)."""
    kubernetes.add_node_selector_json(task, p.gpu_node_selector)
    kubernetes.add_toleration_json(task, p.gpu_tolerations)
    return task


def build_pipeline(options: CompileOptions | None = None):
    """The training pipeline (a KFP pipeline function) with the images and fan-out of ``options``."""
    options = options or CompileOptions()
    prep, train = options.prep_image, options.train_image

    @dsl.pipeline(name="convert-dataset")
    def convert_dataset(dataset_uri: str, workers_per_shard: int) -> str:
        """Convert every shard of a planned dataset (fan-out), then assemble manifests and the report (fan-in).

        A pipeline of its own so that the shards' tasks receive the dataset as a pipeline input.
        """
        shards = list_shards(dataset_uri=dataset_uri).set_caching_options(True)
        _glue(shards, prep)
        with dsl.ParallelFor(shards.output, parallelism=options.conversion_parallelism, name="convert-shards") as shard:
            converted = convert_shard(dataset_uri=dataset_uri, shard=shard, workers=workers_per_shard)
            _retry_long(converted.set_caching_options(True), retries=3, backoff_s=30, attempt_s=DATA_ATTEMPT_S)
            _step(converted, prep).set_cpu_request("2").set_cpu_limit("2").set_memory_request(
                CONVERT_MEMORY[0]
            ).set_memory_limit(CONVERT_MEMORY[1])

        dataset = assemble_dataset(dataset_uri=dataset_uri, shard_hours=dsl.Collected(converted.output))
        _retry_long(dataset.set_caching_options(True), retries=2, backoff_s=60, attempt_s=DATA_ATTEMPT_S)
        _step(dataset, prep).set_cpu_request("1").set_memory_request(ASSEMBLE_MEMORY[0]).set_memory_limit(
            ASSEMBLE_MEMORY[1]
        )
        return dataset.outputs["Output"]

    def habla_pipeline(*values):
        p = RunParameters.channels(values)  # the pipeline's parameters, by name (habla.runs.parameters)
        run = start_run(run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, step_image=train, **vars(p)).set_caching_options(False)
        _glue(run, prep)

        plan = _retry_long(
            plan_dataset(
                release_uri=p.release_uri,
                output_uri=p.output_uri,
                locale=p.locale,
                num_shards=p.num_shards,
                train_source=p.train_source,
                audio_format=p.audio_format,
                min_duration=p.min_duration,
                max_duration=p.max_duration,
            ).set_caching_options(True),
            retries=2,
            backoff_s=60,
            attempt_s=DATA_ATTEMPT_S,
        )
        _step(plan, prep).set_cpu_request("2").set_memory_request(PLAN_MEMORY[0]).set_memory_limit(PLAN_MEMORY[1])
        dataset = convert_dataset(dataset_uri=plan.output, workers_per_shard=p.workers_per_shard)

        train_args = dict(
            run_dir=run.output,
            dataset_uri=dataset.output,
            config=p.config,
            config_overrides=p.config_overrides,
            max_steps=p.max_steps,
            max_epochs=p.max_epochs,
            init_from=p.init_from,
            nodes=p.nodes,
            gpus_per_node=p.gpus_per_node,
        )
        with dsl.If(p.launcher == "local", name="train-in-pipeline-pod"):
            here = train_here(**train_args, train_cpu=p.train_cpu, train_memory=p.train_memory)
            _retry_long(here.set_caching_options(False), retries=1)
            _step(here, train).set_cpu_request(p.train_cpu).set_memory_request(p.train_memory)
            _on_gpu_nodes(_shm(here.set_memory_limit(p.train_memory)), p)
            here.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(p.gpus_per_node)
        with dsl.Else(name="train-as-cluster-job"):
            planned = plan_training(**{k: v for k, v in train_args.items() if k != "run_dir"})
            planned.set_caching_options(False).set_retry(num_retries=2, backoff_duration="60s")
            _step(planned, train).set_cpu_request("2").set_memory_request("8Gi").set_memory_limit("8Gi")
            job = train_on_cluster(
                **train_args,
                kind=p.launcher,
                runtime=p.runtime,
                image=p.train_image,
                job_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                task_name=dsl.PIPELINE_TASK_NAME_PLACEHOLDER,
                train_cpu=p.train_cpu,
                train_memory=p.train_memory,
                gpu_node_selector=p.gpu_node_selector,
                gpu_tolerations=p.gpu_tolerations,
                priority_class=p.priority_class,
                plan=planned.outputs["Output"],
            ).set_caching_options(False)
            _retry_long(job, retries=2)
            _step(job, prep).set_cpu_request("500m").set_memory_request("1Gi")
        model = dsl.OneOf(here.outputs["Output"], job.outputs["Output"])

        registered = _glue(register_dataset(dataset_uri=dataset.output).set_caching_options(False), prep)
        evaluation = evaluate_models(
            run_dir=run.output,
            dataset_uri=dataset.output,
            model_uri=model,
            output_uri=p.output_uri,
            promotion_margin=p.promotion_margin,
            dataset=registered.outputs["dataset"],
            init_from=p.init_from,
            overlap_with=p.overlap_with,
        ).set_caching_options(False)
        _retry_long(evaluation, retries=1)
        _step(evaluation, train).set_cpu_request("4").set_memory_request("16Gi").set_memory_limit("32Gi")
        _on_gpu_nodes(_shm(evaluation, EVALUATION_SHM_SIZE), p)
        evaluation.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(p.evaluate_gpus)

        with dsl.If(evaluation.outputs["Output"] == True, name="beats-best-model"):  # noqa: E712 - a KFP condition, not Python
            packaged = package_model(
                run_dir=run.output,
                dataset_uri=dataset.output,
                model_uri=model,
                output_uri=p.output_uri,
                candidate=evaluation.outputs["candidate"],
            ).set_caching_options(False)
            _step(packaged, train).set_cpu_request("2").set_memory_request("8Gi")
            _glue(
                promote_model(output_uri=p.output_uri, run_dir=run.output, model_uri=model)
                .set_caching_options(False)
                .after(packaged),
                prep,
            )

    habla_pipeline.__signature__ = RunParameters.signature(train_image=options.train_image)
    habla_pipeline.__doc__ = RunParameters.docstring()
    return dsl.pipeline(
        name=PIPELINE_NAME,
        description="Common Voice release -> 16 kHz audio in object storage -> NeMo ASR model -> WER/CER; "
        "promotes the model when it beats the current best.",
    )(habla_pipeline)


# An executor field the KFP driver fills from a parameter at run time: "{{$.inputs.parameters['NAME']}}".
_PARAMETER_CHANNEL = re.compile(r"^\{\{\$\.inputs\.parameters\['([^']+)'\]\}\}$")


def check_pod_spec_parameters(ir: dict) -> None:
    """Refuse a compiled pipeline whose pod spec takes a non-STRING parameter (HablaError).

    KFP's driver resolves an image, CPU/memory request or limit, accelerator type or accelerator count bound
    to a parameter with ``GetStringValue()`` (kubeflow/pipelines, backend/src/v2/driver/resolve.go,
    ``resolvePodSpecInputRuntimeParameter``, 2.15.0 to 2.17.0; driver.go sets the limit only when the value is
    not empty). A NUMBER_INTEGER parameter reads as "" there: the pod would get no GPU limit and train on CPU.
    The compiler binds such a field to a task input ``pipelinechannel--<name>``; its type is that of what
    feeds it: an input of the enclosing DAG, another task's output, or a constant.
    """
    components = ir["components"]
    executors = ir["deploymentSpec"]["executors"]
    dags = [(ir["root"], "root")] + [(c, name) for name, c in components.items() if "dag" in c]
    for owner, owner_name in dags:
        tasks = owner["dag"]["tasks"]
        for task_name, task in tasks.items():
            component = components[task["componentRef"]["name"]]
            label = component.get("executorLabel")
            if not label:
                continue
            container = executors[label]["container"]
            resources = container.get("resources") or {}
            fields = {"image": container.get("image")}
            fields.update({k: v for k, v in resources.items() if k.startswith("resource")})
            fields.update({f"accelerator.{k}": v for k, v in (resources.get("accelerator") or {}).items()})
            for field, value in fields.items():
                match = _PARAMETER_CHANNEL.match(str(value or ""))
                if not match:
                    continue
                kind = _parameter_type(match.group(1), task, component, owner, components, tasks)
                if kind != "STRING":
                    raise HablaError(
                        f"{owner_name}/{task_name}: {field} comes from parameter {match.group(1)!r} of type {kind}; "
                        "KFP's driver reads pod spec parameters as strings (resolvePodSpecInputRuntimeParameter): "
                        "make it a str"
                    )


def _parameter_type(name: str, task: dict, component: dict, owner: dict, components: dict, tasks: dict) -> str:
    """The IR type of the value a task's input parameter ``name`` receives."""
    declared = ((component.get("inputDefinitions") or {}).get("parameters") or {}).get(name)
    if declared:
        return declared["parameterType"]
    source = ((task.get("inputs") or {}).get("parameters") or {}).get(name) or {}
    if "componentInputParameter" in source:
        inputs = (owner.get("inputDefinitions") or {}).get("parameters") or {}
        return (inputs.get(source["componentInputParameter"]) or {}).get("parameterType", "unknown")
    if "taskOutputParameter" in source:
        producer = tasks[source["taskOutputParameter"]["producerTask"]]
        outputs = (components[producer["componentRef"]["name"]].get("outputDefinitions") or {}).get("parameters")
        return ((outputs or {}).get(source["taskOutputParameter"]["outputParameterKey"]) or {}).get(
            "parameterType", "unknown"
        )
    if "runtimeValue" in source:
        return "STRING" if isinstance(source["runtimeValue"].get("constant"), str) else "not a string constant"
    return "unknown"


def compile_pipeline(out_path: str, options: CompileOptions | None = None) -> str:
    """Compile the training pipeline to IR YAML (to upload in the KFP UI or submit); returns ``out_path``.

    The IR is checked with :func:`check_pod_spec_parameters` before it is handed out.
    """
    compiler.Compiler().compile(build_pipeline(options), out_path)
    with open(out_path, encoding="utf-8") as f:
        check_pod_spec_parameters(next(yaml.safe_load_all(f)))
    return out_path


def compile_into(folder: str, options: CompileOptions | None = None) -> str:
    """Compile the training pipeline into ``folder`` (``training_pipeline.yaml``); its path. What the watcher
    submits (habla.kubeflow.watch)."""
    return compile_pipeline(str(Path(folder, "training_pipeline.yaml")), options)
