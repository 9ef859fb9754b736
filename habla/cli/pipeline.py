"""``habla pipeline compile|run-local|submit``: the Kubeflow pipeline, compiled, run on this machine, or submitted.

Trailing ``key=value`` arguments: a key without a dot is a pipeline parameter (``num_shards=4``), a dotted
key is a training config override (``trainer.max_steps=300``).
"""

from __future__ import annotations

import argparse

from habla.cli.common import add_compile_arguments, add_kfp_access_arguments, compile_options

HELP = "The Kubeflow pipeline: compile it, run it here (kfp.local), or submit it"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="<action>", required=True)
    compile_ = sub.add_parser("compile", help="compile the pipeline to IR YAML (upload it in the KFP UI)")
    compile_.add_argument("--out", required=True, metavar="FILE.yaml")
    add_compile_arguments(compile_)

    sub.add_parser(
        "parameters",
        help="list the pipeline's parameters with their types, defaults and descriptions (KFP's run form shows "
        "only names and types)",
    )

    local = sub.add_parser(
        "run-local",
        help="run the whole pipeline on this machine through kfp.local",
        description="Run the whole pipeline on this machine through kfp.local. The same --run-name as a failed or "
        "interrupted run resumes it.",
        epilog=parameters_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    local.add_argument("--release", help="release to prepare (default: the bundled mini release)")
    local.add_argument("--out", required=True, metavar="DST", help="output folder or s3:// prefix")
    local.add_argument("--config", help="model config (default: tiny_ctc_char)")
    local.add_argument("--run-name", help="folder name under DST/runs/ (default: local-<time>)")
    local.add_argument(
        "--pipeline-defaults",
        action="store_true",
        help="start from the compiled pipeline's defaults (tar shards, fastconformer_ctc_bpe, its budget) instead "
        "of the local ones (wav, tiny_ctc_char); add launcher=local and what makes it fit this machine",
    )
    local.add_argument("settings", nargs="*", metavar="key=value", help="pipeline parameters and config overrides")

    submit = sub.add_parser("submit", help="submit a run to a Kubeflow Pipelines endpoint")
    submit.add_argument("--host", required=True, help="KFP API endpoint, e.g. https://kubeflow.example.com/pipeline")
    submit.add_argument("--release", required=True, metavar="SRC", help="release URI (s3://...)")
    submit.add_argument("--out", required=True, metavar="DST", help="output prefix (s3://...)")
    submit.add_argument("--experiment", default="habla", help="KFP experiment (default %(default)s)")
    submit.add_argument("--run-name", help="KFP run name (default: habla-<release>-<time>)")
    submit.add_argument(
        "--service-account",
        help="account the run's steps run as (default: habla-pipeline-runner, from manifests/; '' for the namespace's)",
    )
    add_kfp_access_arguments(submit)
    add_compile_arguments(submit)
    submit.add_argument("settings", nargs="*", metavar="key=value", help="pipeline parameters and config overrides")


def parameters_epilog() -> str:
    """The pipeline's parameters as run-local starts them (its own defaults), one line each."""
    import dataclasses
    import json

    from habla.runs.parameters import RunParameters, default_of

    local = RunParameters.local_defaults()
    lines = ["pipeline parameters (key=value; run-local's defaults; `habla pipeline parameters` describes each):"]
    for f in dataclasses.fields(RunParameters):
        if f.name in ("release_uri", "output_uri", "run_name"):  # --release, --out, --run-name
            continue
        default = local.get(f.name, default_of(f))
        shown = json.dumps(default, ensure_ascii=False)
        lines.append(f"  {f.name}={shown if len(shown) <= 60 else shown[:57] + '...'}")
    lines += ["", "a dotted key is a training config override: trainer.max_steps=300 model.optim.lr=0.001"]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.action == "compile":
        from habla.pipelines import training_pipeline

        path = training_pipeline.compile_pipeline(args.out, compile_options(args, warn=True))
        print(f"compiled {path}: upload it in the KFP UI (Pipelines > Upload pipeline) or use habla pipeline submit")
        return 0
    if args.action == "parameters":
        import dataclasses
        import json

        from habla.runs.parameters import RunParameters, default_of

        for f in dataclasses.fields(RunParameters):
            default = default_of(f)
            shown = "(required)" if default is dataclasses.MISSING else json.dumps(default, ensure_ascii=False)
            print(f"{f.name} ({f.type}) = {shown}\n    {f.metadata['help']}")
        return 0
    from habla.ops import pipeline_runs

    if args.action == "run-local":
        from habla.evaluation.report import format_metrics

        result = pipeline_runs.run_local(
            args.out,
            args.settings,
            release=args.release,
            config=args.config,
            run_name=args.run_name,
            pipeline_defaults=args.pipeline_defaults,
        )
        seconds = sum(step["seconds"] for step in result["steps"])
        print(f"\nrun {result['run_dir']} ({len(result['steps'])} steps, {seconds / 60:.1f} min)\n")
        print(format_metrics(result["metrics"], breakdowns=("by_gender",)))
        promotion = result.get("promotion") or {}
        if promotion:
            verdict = "promoted" if promotion.get("promote") else "not promoted"
            print(f"\n{verdict}: {promotion.get('reason') or promotion.get('rule')}")
            if "wer_improvement" in promotion:
                low, high = promotion["wer_improvement_ci"]
                print(f"  WER improvement over {promotion.get('best_run')}: {promotion['wer_improvement']:.4f} "
                      f"(95 % interval {low:.4f} to {high:.4f}), margin {promotion.get('margin')}")  # fmt: skip
        print()
        width = max(map(len, result["reports"]), default=0)
        for what, uri in result["reports"].items():
            print(f"  {what:<{width}}  {uri}")
        return 0
    ref = pipeline_runs.submit(
        args.host,
        args.release,
        args.out,
        args.settings,
        experiment=args.experiment,
        run_name=args.run_name,
        compile_options=compile_options(args),
        service_account=args.service_account,
        namespace=args.namespace,
        token_file=args.token_file,
    )
    print(ref.url)
    return 0
