"""The release watcher's step: look at the inbox once and submit the training pipeline for each new release."""

from kfp import dsl

from habla.runs.parameters import DEFAULT_PREP_IMAGE


@dsl.component(base_image=DEFAULT_PREP_IMAGE, install_kfp_package=False)
def watch_releases(
    inbox: str,
    state: str,
    output_root: str,
    experiment: str,
    locale: str,
    kfp_host: str,
    training_params: str,
    s3_endpoint_url: str,
    mdc: bool,
    dry_run: bool,
    compile_options: str,
    claims: str = "auto",
) -> str:
    """Look at the inbox once; submit the training pipeline, compiled in this pod with ``compile_options`` (the
    ones the watcher pipeline was compiled with), for each new release. Returns the decisions (JSON); fails
    when a submission failed (the next scheduled run retries it)."""
    from habla.core.errors import pipeline_step

    with pipeline_step("watch-releases"):
        import functools
        import json
        import os
        from dataclasses import asdict

        if s3_endpoint_url:
            os.environ["AWS_ENDPOINT_URL"] = s3_endpoint_url
        from habla.pipelines.training_pipeline import compile_into

        from habla.kubeflow.compile import CompileOptions
        from habla.kubeflow.watch import watch

        decisions = watch(
            inbox,
            state,
            output_root=output_root,
            host=kfp_host,
            experiment=experiment,
            locale=locale,
            params=json.loads(training_params or "{}"),
            dry_run=dry_run,
            mdc=mdc,
            package=functools.partial(compile_into, options=CompileOptions.from_json(compile_options)),
            claims=claims,
        )
        report = json.dumps([asdict(d) for d in decisions], indent=2)
        print(report)
        failed = [d.release for d in decisions if d.action == "failed"]
        if failed:  # the run shows as failed; the next scheduled run retries these
            raise RuntimeError(f"submission failed for {', '.join(failed)}")
        return report
