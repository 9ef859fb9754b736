"""The habla pipeline, top to bottom: a Common Voice release → audio in object storage → NeMo model → WER.

    start_run → plan_dataset → convert_dataset [list_shards → ParallelFor(convert_shard) → assemble_dataset]
      → train_here (launcher "local") | train_on_cluster (TrainJob / PyTorchJob)
      → evaluate_models (new and current best, same test set) → If better: package_model (card, ONNX) → promote_model

:func:`build_pipeline` draws the graph for the images and conversion fan-out chosen at compile time
(:class:`~habla.kubeflow.compile.CompileOptions`); :func:`compile_pipeline` writes it as IR YAML. Compile with
``habla pipeline compile``, run locally with ``habla pipeline run-local``, submit with ``habla pipeline submit``.
"""

import re

import yaml
from habla.components.data import assemble_dataset, convert_shard, list_shards, plan_dataset, register_dataset
from habla.components.evaluation import evaluate_models, package_model, promote_model
from habla.components.training import start_run, train_here, train_on_cluster
from kfp import compiler, dsl, kubernetes

from habla.core.errors import HablaError
from habla.kubeflow.compile import CompileOptions
from habla.kubeflow.jobs import DEFAULT_RUNTIME

PIPELINE_NAME = "habla-train"
# Kubernetes objects the steps read S3 settings from (manifests/): credentials, and endpoint/region.
S3_SECRET = "habla-s3-credentials"
S3_CONFIG_MAP = "habla-s3-config"


def _step(task: dsl.PipelineTask, image: str) -> dsl.PipelineTask:
    """A step's image, and its S3 access: credentials from the Secret, endpoint and region from the ConfigMap."""
    task.set_container_image(image)
    kubernetes.use_secret_as_env(
        task,
        secret_name=S3_SECRET,
        secret_key_to_env={"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"},
    )
    kubernetes.use_config_map_as_env(
        task,
        config_map_name=S3_CONFIG_MAP,
        config_map_key_to_env={"AWS_ENDPOINT_URL": "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION": "AWS_DEFAULT_REGION"},
    )
    return task


def _shm(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """A RAM-backed /dev/shm: PyTorch DataLoader workers pass batches through it (a pod gets 64 MiB otherwise)."""
    return kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory")


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
        _step(shards, prep)
        with dsl.ParallelFor(shards.output, parallelism=options.conversion_parallelism, name="convert-shards") as shard:
            converted = convert_shard(dataset_uri=dataset_uri, shard=shard, workers=workers_per_shard)
            converted.set_caching_options(True).set_retry(num_retries=3, backoff_duration="30s", backoff_factor=2.0)
            _step(converted, prep).set_cpu_request("2").set_cpu_limit("2").set_memory_request("4Gi").set_memory_limit(
                "8Gi"
            )

        dataset = assemble_dataset(dataset_uri=dataset_uri, shard_hours=dsl.Collected(converted.output))
        dataset.set_caching_options(True).set_retry(num_retries=2, backoff_duration="60s")
        _step(dataset, prep).set_cpu_request("1").set_memory_request("8Gi").set_memory_limit("16Gi")
        return dataset.outputs["Output"]

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="Common Voice release -> 16 kHz audio in object storage -> NeMo ASR model -> WER/CER; "
        "promotes the model when it beats the current best.",
    )
    def habla_pipeline(
        release_uri: str,
        output_uri: str,
        locale: str = "es",
        num_shards: int = 32,
        workers_per_shard: int = 2,
        train_source: str = "train",
        audio_format: str = "tar",
        min_duration: float = 0.5,
        max_duration: float = 20.0,
        config: str = "fastconformer_ctc_bpe",
        config_overrides: str = "",
        init_from: str = "",
        nodes: int = 1,
        gpus_per_node: str = "1",
        max_steps: int = 0,
        max_epochs: int = 0,
        launcher: str = "trainjob",
        runtime: str = DEFAULT_RUNTIME,
        train_image: str = options.train_image,
        promotion_margin: float = 0.0,
        run_name: str = "",
    ):
        """Prepare a Common Voice release, train a NeMo model on it, evaluate it and promote it if it is better.

        Args:
            release_uri: The release: an extracted locale folder, a cv-corpus-*.tar.gz archive, or an s3:// prefix.
            output_uri: Where everything goes (s3://bucket/prefix): datasets/, runs/<run>/, models/best.json.
            locale: Common Voice locale folder inside the release.
            num_shards: Conversion shards (parallel tasks); about one per 20 h of audio is a good size. With audio_format=tar they are also the train tar shards: a multiple of nodes × gpus_per_node × 8 loader workers streams best.
            workers_per_shard: Conversion processes inside each shard's pod (matches its CPU request).
            train_source: "train" (train.tsv) or "validated" (validated.tsv minus dev/test speakers and sentences).
            audio_format: "tar" (train split as NeMo tarred shards, streamed from object storage) or "wav".
            min_duration: Shortest clip kept, in seconds.
            max_duration: Longest clip kept, in seconds.
            config: Model config name (tiny_ctc_char, quartznet15x5_char, fastconformer_ctc_bpe) or a YAML path in the image.
            config_overrides: Space-separated dotted key=value overrides, e.g. "model.optim.lr=0.001 trainer.precision=bf16-mixed".
            init_from: Optional checkpoint to fine-tune from: a .nemo (path in the image or s3://) or a name in $HABLA_MODEL_STORE; CTC, hybrid RNNT/CTC (its CTC head) or transducer (its encoder).
            nodes: Training nodes (pods).
            gpus_per_node: GPUs per training node (one process per GPU); a string, e.g. "8", as KFP needs for a GPU limit.
            max_steps: Training steps; 0 keeps the config's.
            max_epochs: Training epochs; 0 keeps the config's.
            launcher: "trainjob" (Kubeflow Trainer v2), "pytorchjob" (Training Operator) or "local" (inside this pipeline's pod).
            runtime: The TrainJob's ClusterTrainingRuntime; the default (manifests/runtimes) gives the pods a RAM-backed /dev/shm.
            train_image: Image of the training pods (CUDA + NeMo + habla).
            promotion_margin: Promote only when the new WER is lower than the best model's by more than this (absolute), with 95 % confidence (paired bootstrap over test utterances).
            run_name: Name of the run's folder under output_uri/runs/ (one run's only); empty: the KFP run's id.
        """
        run = start_run(
            output_uri=output_uri,
            run_name=run_name,
            run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            release_uri=release_uri,
            locale=locale,
            config=config,
            config_overrides=config_overrides,
            nodes=nodes,
            gpus_per_node=gpus_per_node,
            max_steps=max_steps,
            max_epochs=max_epochs,
            train_source=train_source,
            audio_format=audio_format,
            num_shards=num_shards,
            launcher=launcher,
            promotion_margin=promotion_margin,
        ).set_caching_options(False)
        _step(run, prep)

        plan = (
            plan_dataset(
                release_uri=release_uri,
                output_uri=output_uri,
                locale=locale,
                num_shards=num_shards,
                train_source=train_source,
                audio_format=audio_format,
                min_duration=min_duration,
                max_duration=max_duration,
            )
            .set_caching_options(True)
            .set_retry(num_retries=2, backoff_duration="60s")
        )
        _step(plan, prep).set_cpu_request("2").set_memory_request("8Gi").set_memory_limit("16Gi")
        dataset = convert_dataset(dataset_uri=plan.output, workers_per_shard=workers_per_shard)

        train_args = dict(
            run_dir=run.output,
            dataset_uri=dataset.output,
            config=config,
            config_overrides=config_overrides,
            max_steps=max_steps,
            max_epochs=max_epochs,
            init_from=init_from,
            nodes=nodes,
            gpus_per_node=gpus_per_node,
        )
        with dsl.If(launcher == "local", name="train-in-pipeline-pod"):
            here = train_here(**train_args).set_caching_options(False).set_retry(num_retries=1)
            _shm(_step(here, train).set_cpu_request("8").set_memory_request("32Gi"))
            here.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(gpus_per_node)
        with dsl.Else(name="train-as-cluster-job"):
            job = (
                train_on_cluster(
                    **train_args,
                    kind=launcher,
                    runtime=runtime,
                    image=train_image,
                    job_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                    task_name=dsl.PIPELINE_TASK_NAME_PLACEHOLDER,
                )
                .set_caching_options(False)
                .set_retry(num_retries=2, backoff_duration="120s")
            )
            _step(job, prep).set_cpu_request("500m").set_memory_request("1Gi")
        model = dsl.OneOf(here.outputs["Output"], job.outputs["Output"])

        registered = _step(register_dataset(dataset_uri=dataset.output).set_caching_options(False), prep)
        evaluation = (
            evaluate_models(
                run_dir=run.output,
                dataset_uri=dataset.output,
                model_uri=model,
                output_uri=output_uri,
                promotion_margin=promotion_margin,
                dataset=registered.outputs["dataset"],
            )
            .set_caching_options(False)
            .set_retry(num_retries=1)
        )
        _shm(_step(evaluation, train).set_cpu_request("4").set_memory_request("16Gi"))
        evaluation.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)

        with dsl.If(evaluation.outputs["Output"] == True, name="beats-best-model"):  # noqa: E712 - a KFP condition, not Python
            packaged = package_model(
                run_dir=run.output,
                dataset_uri=dataset.output,
                model_uri=model,
                output_uri=output_uri,
                candidate=evaluation.outputs["candidate"],
            ).set_caching_options(False)
            _step(packaged, train).set_cpu_request("2").set_memory_request("8Gi")
            _step(
                promote_model(output_uri=output_uri, run_dir=run.output, model_uri=model)
                .set_caching_options(False)
                .after(packaged),
                prep,
            )

    return habla_pipeline


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
