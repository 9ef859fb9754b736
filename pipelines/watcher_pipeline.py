"""The release watcher as a tiny KFP pipeline: one step, ``components/watcher.py``, that runs habla.kubeflow.watch.

``habla schedule`` uploads it and makes it a recurring run. The component runs in the habla-prep image, which
already holds habla and kfp: nothing is pip-installed at run time (offline clusters, kubeflow/pipelines
#6738). The compile options (images, conversion fan-out) are chosen when this pipeline is compiled and
handed to the component as a constant, so the training pipeline the watcher compiles in its pod gets the
same ones. Caching is off, or every poll after the first would be
answered from the cache without looking.
S3 credentials come from the Secret ``habla-s3-credentials`` (keys ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``), the endpoint and region from the ConfigMap ``habla-s3-config`` as for the training
pipeline's steps (``s3_endpoint_url``, when given, wins); the Data Collective key from the optional Secret
``habla-mdc`` (``MDC_API_KEY``). With ``claims`` ``lease`` (or ``auto`` on a store that fails the conditional-write
check) the pod claims releases through Leases in its own namespace: its service account needs the Role
``habla-watcher`` (manifests/base). Against a multi-user KFP it submits runs in its own namespace with a token
of its own service account for the audience ``pipelines.kubeflow.org``, requested from the Kubernetes API (the
Roles ``habla-kfp-client`` and ``habla-kfp-token``; habla.kubeflow.kfp_auth).
"""

# no "from __future__ import annotations": KFP reads the real annotation types
from habla.components.watcher import watch_releases
from habla.pipelines.training_pipeline import S3_CONFIG_MAP, S3_CONFIG_OPTIONAL, S3_CONFIG_REQUIRED
from kfp import compiler, dsl, kubernetes

from habla.kubeflow.compile import CompileOptions

S3_SECRET = "habla-s3-credentials"
S3_SECRET_KEYS = {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}
MDC_SECRET = "habla-mdc"
IN_CLUSTER_KFP = "http://ml-pipeline.kubeflow.svc.cluster.local:8888"


def build_pipeline(options: CompileOptions | None = None):
    """The watcher pipeline; ``options`` are its own image and what it compiles the training pipeline with."""
    options = options or CompileOptions()

    @dsl.pipeline(
        name="habla-release-watcher",
        description="Look for new Common Voice releases in an inbox and submit the habla training pipeline "
        "once for each.",
    )
    def watcher_pipeline(
        inbox: str,
        state: str,
        output_root: str,
        experiment: str = "habla",
        locale: str = "es",
        kfp_host: str = IN_CLUSTER_KFP,
        training_params: str = "{}",
        s3_endpoint_url: str = "",
        mdc: bool = False,
        dry_run: bool = False,
        claims: str = "auto",
    ) -> None:
        task = watch_releases(
            inbox=inbox,
            state=state,
            output_root=output_root,
            experiment=experiment,
            locale=locale,
            kfp_host=kfp_host,
            training_params=training_params,
            s3_endpoint_url=s3_endpoint_url,
            mdc=mdc,
            dry_run=dry_run,
            compile_options=options.to_json(),
            claims=claims,
        )
        task.set_caching_options(False)
        task.set_display_name("watch releases")
        task.set_cpu_request("100m").set_memory_request("256M").set_memory_limit("1G")
        task.set_container_image(options.prep_image)
        kubernetes.use_secret_as_env(task, S3_SECRET, S3_SECRET_KEYS)
        kubernetes.use_config_map_as_env(task, S3_CONFIG_MAP, S3_CONFIG_REQUIRED)
        kubernetes.use_config_map_as_env(task, S3_CONFIG_MAP, S3_CONFIG_OPTIONAL, optional=True)
        kubernetes.use_secret_as_env(task, MDC_SECRET, {"MDC_API_KEY": "MDC_API_KEY"}, optional=True)

    return watcher_pipeline


def compile_pipeline(out_path: str, options: CompileOptions | None = None) -> str:
    """Compile the watcher pipeline to IR YAML; returns ``out_path``."""
    compiler.Compiler().compile(build_pipeline(options), out_path)
    return out_path
