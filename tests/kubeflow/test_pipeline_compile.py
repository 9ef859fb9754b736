"""The compiled pipeline (IR YAML) holds what a cluster run relies on, checked against what KFP's backend does
with it (kubeflow/pipelines, backend/src/v2/driver)."""

import pytest
import yaml
from fixtures.commands import run_habla
from habla.pipelines import training_pipeline
from kfp import compiler, dsl

from habla.core.errors import HablaError
from habla.kubeflow import jobs, kfp_api

SECRET_VALUE = "wJalrXUtnFEMI-not-a-real-key-7Q"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("ir") / "habla.yaml"
    env = {"AWS_SECRET_ACCESS_KEY": SECRET_VALUE, "AWS_ACCESS_KEY_ID": "AKIAHABLATEST"}
    result = run_habla(
        "pipeline",
        "compile",
        "--out",
        str(out),
        "--prep-image",
        "registry.example/habla-prep:1",
        "--train-image",
        "registry.example/habla-train:1",
        "--conversion-parallelism",
        "12",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    ir, platform = yaml.safe_load_all(text)
    return text, ir, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def executor(ir, name):
    return ir["deploymentSpec"]["executors"][f"exec-{name}"]["container"]


def test_parameters_have_defaults_and_descriptions(compiled):
    _, ir, _ = compiled
    params = ir["root"]["inputDefinitions"]["parameters"]
    assert {"release_uri", "output_uri"} <= set(params) and not params["release_uri"].get("isOptional")
    expected = {
        "locale": "es",
        "num_shards": 32,
        "train_source": "train",
        "min_duration": 0.5,
        "max_duration": 20.0,
        "config": "fastconformer_ctc_bpe",
        "nodes": 1,
        "gpus_per_node": "1",
        "max_steps": 0,
        "promotion_margin": 0.0,
        "launcher": "trainjob",
        "runtime": jobs.DEFAULT_RUNTIME,
        "audio_format": "tar",
    }
    for name, default in expected.items():
        assert params[name]["defaultValue"] == default, name
    assert all(p.get("description") for p in params.values()), "every parameter is described in the UI"


def test_conversion_fans_out_with_bounded_parallelism_and_retries(compiled):
    _, ir, _ = compiled
    dataset = ir["components"]["comp-convert-dataset"]["dag"]["tasks"]
    loop = dataset["for-loop-1"]
    assert loop["iteratorPolicy"]["parallelismLimit"] == 12
    assert loop["parameterIterator"]["items"]["inputParameter"].endswith("list-shards-Output")
    convert = ir["components"]["comp-for-loop-1"]["dag"]["tasks"]["convert-shard"]
    assert convert["retryPolicy"]["maxRetryCount"] == 3 and convert["cachingOptions"]["enableCache"] is True
    resources = executor(ir, "convert-shard")["resources"]
    assert resources["resourceCpuRequest"] == "2" and resources["resourceMemoryLimit"] == "4Gi"
    # the fan-in waits for every shard
    assert "for-loop-1" in dataset["assemble-dataset"]["dependentTasks"]


def test_training_requests_gpus_only_where_training_runs(compiled):
    _, ir, _ = compiled
    here = executor(ir, "train-here")["resources"]["accelerator"]
    assert here["resourceType"] == "nvidia.com/gpu" and "gpus_per_node" in here["resourceCount"]
    assert "accelerator" not in executor(ir, "train-on-cluster").get("resources", {})  # the job's pods get them
    assert executor(ir, "evaluate-models")["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert executor(ir, "train-here")["image"] == "registry.example/habla-train:1"
    assert executor(ir, "convert-shard")["image"] == "registry.example/habla-prep:1"


def test_a_whole_number_of_gpus_is_passed_as_the_string_kfp_needs(compiled, tmp_path):
    text, _, _ = compiled
    package = tmp_path / "habla.yaml"
    package.write_text(text)
    params = {
        "release_uri": "s3://a/b",
        "output_uri": "s3://c",
        "gpus_per_node": 8,
    }  # habla watch --param gpus_per_node=8
    assert kfp_api.explicit_params(str(package), params)["gpus_per_node"] == "8"
    with pytest.raises(HablaError, match="not a NUMBER_INTEGER"):
        kfp_api.explicit_params(str(package), {**params, "nodes": "4"})


def test_gpu_limits_come_from_string_parameters(compiled):
    """KFP's driver reads a parameter bound to a pod spec field with GetStringValue() (resolve.go,
    resolvePodSpecInputRuntimeParameter): a NUMBER_INTEGER gives "", and the pod gets no GPU limit."""
    _, ir, _ = compiled
    count = executor(ir, "train-here")["resources"]["accelerator"]["resourceCount"]
    assert count == "{{$.inputs.parameters['pipelinechannel--gpus_per_node']}}"
    # The count is a task input fed by the enclosing If's input, fed by the pipeline parameter: all strings.
    (branch,) = [c for c in ir["components"].values() if "train-here" in (c.get("dag") or {}).get("tasks", {})]
    source = branch["dag"]["tasks"]["train-here"]["inputs"]["parameters"]["pipelinechannel--gpus_per_node"]
    assert branch["inputDefinitions"]["parameters"][source["componentInputParameter"]]["parameterType"] == "STRING"
    assert ir["root"]["inputDefinitions"]["parameters"]["gpus_per_node"]["parameterType"] == "STRING"
    training_pipeline.check_pod_spec_parameters(ir)  # the check habla pipeline compile runs passes


def test_compiling_refuses_a_gpu_limit_bound_to_a_number(tmp_path):
    """What gpus_per_node: int compiled to: the check that now runs in compile_pipeline refuses it."""

    @dsl.component(base_image="python:3.11")
    def step(n: int) -> int:
        return n

    @dsl.pipeline(name="int-gpus")
    def int_gpus(gpus: int = 1):
        task = step(n=gpus)
        task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(gpus)

    path = tmp_path / "int-gpus.yaml"
    compiler.Compiler().compile(int_gpus, str(path))
    with pytest.raises(
        HablaError, match="resourceCount comes from parameter 'pipelinechannel--gpus' of type NUMBER_INT"
    ):
        training_pipeline.check_pod_spec_parameters(yaml.safe_load(path.read_text()))


def test_training_and_evaluation_pods_get_a_bounded_ram_backed_dev_shm(compiled):
    _, _, platform = compiled
    for name, size in (("exec-train-here", jobs.SHM_SIZE), ("exec-evaluate-models", "4Gi")):
        shm = {"volumeName": "dshm", "mountPath": "/dev/shm", "medium": "Memory", "sizeLimit": size}
        assert shm in platform[name]["emptyDirMounts"]


def test_the_run_folder_is_named_from_the_run_id(compiled):
    _, ir, _ = compiled
    inputs = ir["root"]["dag"]["tasks"]["start-run"]["inputs"]["parameters"]
    assert inputs["run_id"] == {"runtimeValue": {"constant": dsl.PIPELINE_JOB_ID_PLACEHOLDER}}
    assert dsl.PIPELINE_JOB_NAME_PLACEHOLDER not in str(ir)  # a display name two runs may share


def test_the_cluster_launcher_gets_the_runtime_parameter(compiled):
    _, ir, _ = compiled
    (branch,) = [c for c in ir["components"].values() if "train-on-cluster" in (c.get("dag") or {}).get("tasks", {})]
    runtime = branch["dag"]["tasks"]["train-on-cluster"]["inputs"]["parameters"]["runtime"]
    assert runtime == {"componentInputParameter": "pipelinechannel--runtime"}
    assert ir["root"]["inputDefinitions"]["parameters"]["runtime"]["defaultValue"] == "habla-torch-distributed"


def test_caching_keyed_on_data_steps_only(compiled):
    _, ir, _ = compiled
    tasks = ir["root"]["dag"]["tasks"]
    assert tasks["plan-dataset"]["cachingOptions"]["enableCache"] is True
    assert ir["components"]["comp-convert-dataset"]["dag"]["tasks"]["assemble-dataset"]["cachingOptions"]["enableCache"]
    assert not tasks["start-run"]["cachingOptions"].get("enableCache")
    assert not tasks["evaluate-models"]["cachingOptions"].get("enableCache")


def test_promotion_is_conditional(compiled):
    _, ir, _ = compiled
    condition = next(t for t in ir["root"]["dag"]["tasks"].values() if t.get("triggerPolicy", {}).get("condition"))
    assert "evaluate-models" in condition["dependentTasks"]
    assert "promote-model" in str(ir["components"][condition["componentRef"]["name"]])


def test_no_runtime_pip_install_and_no_secret_values(compiled):
    text, ir, platform = compiled
    for name, spec in ir["deploymentSpec"]["executors"].items():
        assert "pip install" not in " ".join(spec["container"]["command"]), name
    assert SECRET_VALUE not in text and "AKIAHABLATEST" not in text
    refs = platform["exec-convert-shard"]["secretAsEnv"][0]
    assert refs["secretName"] == "habla-s3-credentials"
    assert {k["envVar"] for k in refs["keyToEnv"]} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert all("secretAsEnv" in spec for spec in platform.values()), "every step reads S3 credentials from the Secret"


def test_submit_sends_the_real_pipeline_with_every_parameter(tmp_path):
    """`habla pipeline submit` against a stand-in KFP API (no KFP backend runs here)."""
    from standins.kfp_server import KfpStandin

    with KfpStandin() as kfp:
        release = "s3://cv/cv-corpus-25.0-2026-03-09-es.tar.gz"
        result = run_habla(
            *("pipeline", "submit", "--host", kfp.url, "--release", release, "--out", "s3://habla"),
            *("--experiment", "es", "--run-name", "try-1", "--train-image", "registry.example/habla-train:1"),
            *("nodes=4", "gpus_per_node=8", "trainer.precision=bf16-mixed"),
        )
        assert result.returncode == 0, result.stderr
        [run] = kfp.runs.values()
    assert run["display_name"] == "try-1" and run["run_id"] in result.stdout
    params = run["runtime_config"]["parameters"]
    assert (
        params["release_uri"].endswith("cv-corpus-25.0-2026-03-09-es.tar.gz") and params["output_uri"] == "s3://habla"
    )
    assert params["nodes"] == 4 and params["gpus_per_node"] == "8"
    assert run["service_account"] == kfp_api.PIPELINE_SERVICE_ACCOUNT  # what manifests/ grants the Roles to
    assert params["config_overrides"] == "trainer.precision=bf16-mixed"
    assert (
        params["launcher"] == "trainjob" and params["config"] == "fastconformer_ctc_bpe"
    )  # defaults passed explicitly


def test_submit_refuses_unknown_parameters():
    result = run_habla("pipeline", "submit", "--host", "http://127.0.0.1:9", "--release", "s3://a/b", "--out", "s3://c",
                       "nodez=4")  # fmt: skip
    assert result.returncode == 2 and "unknown pipeline parameter 'nodez'" in result.stderr


@pytest.mark.parametrize("value", ["-1", "1.5", "²", "eight", ""])
def test_a_gpu_count_that_is_not_a_whole_number_is_one_line(value):
    from habla.runs.parameters import gpu_count

    assert gpu_count(" 8 ") == 8
    with pytest.raises(HablaError, match="gpus_per_node must be a whole number"):
        gpu_count(value)


def _task(ir, name):
    for component in [ir["root"], *ir["components"].values()]:
        task = (component.get("dag") or {}).get("tasks", {}).get(name)
        if task:
            return task
    raise KeyError(name)


@pytest.mark.parametrize(
    ("name", "attempt_s"),
    [(name, training_pipeline.LONGEST_ATTEMPT_S) for name in ("train-here", "train-on-cluster", "evaluate-models")]
    + [(name, training_pipeline.DATA_ATTEMPT_S) for name in ("plan-dataset", "convert-shard", "assemble-dataset")],
)
def test_long_steps_keep_retrying_for_as_long_as_their_attempts_take(compiled, name, attempt_s):
    """Argo stops retrying once backoff.maxDuration has passed since the first attempt started, and kills a retry
    at that deadline (argo-workflows workflow/controller/operator.go, v3.7.3 and v4.0.5); KFP's compiler passes the
    IR's backoffMaxDuration through as seconds (backend/src/v2/compiler/argocompiler/container.go, 2.16.0, 2.17.0),
    and the SDK's default is 3600 s."""
    _, ir, _ = compiled
    policy = _task(ir, name)["retryPolicy"]
    window = int(policy["backoffMaxDuration"].rstrip("s"))
    attempts = policy["maxRetryCount"] + 1
    backoffs = sum(
        int(policy["backoffDuration"].rstrip("s")) * policy["backoffFactor"] ** k for k in range(attempts - 1)
    )
    assert attempts >= 2 and window >= attempts * attempt_s + backoffs - 1
    assert training_pipeline.LONGEST_ATTEMPT_S >= 3 * 24 * 3600  # a three-day run is retried
    assert training_pipeline.DATA_ATTEMPT_S >= 4 * 3600  # not the SDK's one hour


def test_training_resources_and_placement_come_from_the_runs_parameters(compiled):
    """CPU and memory of the training pod (and, passed on, of the job's pods), the GPU steps' node selector and
    tolerations (STRUCT/LIST parameters KFP's driver resolves: backend/src/v2/driver/k8s.go), evaluation's GPU."""
    _, ir, platform = compiled
    here = executor(ir, "train-here")["resources"]
    assert here["resourceCpuRequest"] == "{{$.inputs.parameters['pipelinechannel--train_cpu']}}"
    assert here["resourceMemoryRequest"] == here["resourceMemoryLimit"]
    assert "train_memory" in here["resourceMemoryLimit"]
    params = ir["root"]["inputDefinitions"]["parameters"]
    assert params["gpu_node_selector"]["parameterType"] == "STRUCT"
    assert params["gpu_tolerations"]["parameterType"] == "LIST"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in params["gpu_tolerations"][
        "defaultValue"
    ]
    for name in ("exec-train-here", "exec-evaluate-models"):
        assert "nodeSelectorJson" in platform[name]["nodeSelector"]
        assert "tolerationJson" in platform[name]["tolerations"][0]
    accelerator = executor(ir, "evaluate-models")["resources"]["accelerator"]
    assert accelerator["resourceCount"] == "{{$.inputs.parameters['pipelinechannel--evaluate_gpus']}}"
    cluster = _task(ir, "train-on-cluster")["inputs"]["parameters"]
    assert {"train_cpu", "train_memory", "gpu_node_selector", "gpu_tolerations", "priority_class"} <= set(cluster)
    training_pipeline.check_pod_spec_parameters(ir)  # every one of them a string where KFP needs one


def test_the_endpoint_is_optional_for_every_step(compiled):
    """aws-s3 sets no AWS_ENDPOINT_URL (AWS's own endpoint): a required key would stop every step
    (CreateContainerConfigError); the keys every overlay holds stay required (test_manifests.py checks them)."""
    _, _, platform = compiled
    for name, spec in platform.items():
        endpoint = [e for e in spec["configMapAsEnv"] if e["keyToEnv"][0]["configMapKey"] == "AWS_ENDPOINT_URL"]
        assert endpoint and all(e["optional"] for e in endpoint), name


def test_one_image_trains_and_scores_a_model(tmp_path, capsys):
    """The training job's image (train_image) must be the one the pipeline's train/evaluate steps were compiled
    with: start_run refuses another (bad input: one line, exit 2)."""
    from habla.components.training import start_run

    from habla.runs.parameters import RunParameters

    fields = {f: getattr(RunParameters(release_uri="r", output_uri=str(tmp_path)), f) for f in RunParameters.names()}
    with pytest.raises(SystemExit) as exited:
        start_run.python_func(run_id="run-1", step_image="registry.example/habla-train:1",
                              **{**fields, "train_image": "other:1"})  # fmt: skip
    assert exited.value.code == 2
    assert "compile it with --train-image other:1" in capsys.readouterr().err


def test_every_step_ends_bad_input_in_one_line_and_exit_2(compiled):
    """On a cluster too, each step's body runs inside habla.core.errors.pipeline_step: bad input is one line and
    exit code 2, never a traceback (KFP's launcher still exits 1, so Argo retries it: docs/operators.md)."""
    _, ir, _ = compiled
    for name, spec in ir["deploymentSpec"]["executors"].items():
        source = "\n".join(spec["container"]["command"])
        step = name.removeprefix("exec-")
        assert f'with pipeline_step("{step}"):' in source, name


def test_a_cluster_run_is_planned_before_its_job_and_its_pods_default_to_the_plans_node(compiled):
    """The cluster branch: plan_training (the train image: it reads the config and the manifest as habla train
    does) runs before train_on_cluster and hands it the plan; train_cpu/train_memory default to "auto"."""
    _, ir, _ = compiled
    params = ir["root"]["inputDefinitions"]["parameters"]
    assert params["train_cpu"]["defaultValue"] == params["train_memory"]["defaultValue"] == "auto"
    assert executor(ir, "plan-training")["image"] == "registry.example/habla-train:1"
    (branch,) = [c for c in ir["components"].values() if "train-on-cluster" in (c.get("dag") or {}).get("tasks", {})]
    tasks = branch["dag"]["tasks"]
    assert "plan-training" in tasks and "plan-training" in tasks["train-on-cluster"]["dependentTasks"]
    source = tasks["train-on-cluster"]["inputs"]["parameters"]["plan"]["taskOutputParameter"]
    assert source == {"outputParameterKey": "Output", "producerTask": "plan-training"}
    assert "accelerator" not in executor(ir, "plan-training")["resources"]  # planning needs no GPU


def test_every_step_requests_cpu_and_memory(compiled):
    """A namespace whose ResourceQuota counts requests.cpu/requests.memory refuses a pod that names none (unless a
    LimitRange fills them in): every step of the compiled pipeline requests both."""
    _, ir, _ = compiled
    for name, spec in ir["deploymentSpec"]["executors"].items():
        resources = spec["container"].get("resources") or {}
        assert resources.get("resourceCpuRequest") and resources.get("resourceMemoryRequest"), name
