"""Data preparation steps: plan → convert one shard (fanned out) → assemble manifests and the report."""

from typing import List

from kfp import dsl
from kfp.dsl import HTML, Dataset, Markdown, Metrics, Output

from habla.runs.parameters import DEFAULT_PREP_IMAGE


@dsl.component(base_image=DEFAULT_PREP_IMAGE, install_kfp_package=False)
def plan_dataset(
    release_uri: str,
    output_uri: str,
    locale: str,
    num_shards: int,
    train_source: str,
    audio_format: str,
    min_duration: float,
    max_duration: float,
) -> str:
    """Read the release's TSVs and plan the shards. Returns the dataset folder.

    The folder is ``<output_uri>/datasets/<release>-<fingerprint of release and options>``: runs that
    prepare the same release the same way share it, and an existing complete plan is reused.
    """
    from habla.core.errors import pipeline_step

    with pipeline_step("plan-dataset"):
        from habla.data.options import PrepareOptions
        from habla.data.plan import plan_into

        options = PrepareOptions(shards=num_shards, train_source=train_source, format=audio_format, locale=locale,
                                 min_duration=min_duration, max_duration=max_duration)  # fmt: skip
        return plan_into(output_uri, release_uri, options)


@dsl.component(base_image=DEFAULT_PREP_IMAGE, install_kfp_package=False)
def list_shards(dataset_uri: str) -> List[int]:
    """The shard numbers of a planned dataset (what the ParallelFor iterates over)."""
    from habla.core.errors import pipeline_step

    with pipeline_step("list-shards"):
        from habla.data.dataset import read_plan

        return list(range(read_plan(dataset_uri)["num_shards"]))


@dsl.component(base_image=DEFAULT_PREP_IMAGE, install_kfp_package=False)
def convert_shard(dataset_uri: str, shard: int, workers: int) -> float:
    """Convert one shard's clips to 16 kHz WAV (or a tar shard) in object storage. Returns its audio hours.

    Resumes where an earlier attempt stopped; a shard already converted is not touched.
    """
    from habla.core.errors import pipeline_step

    with pipeline_step("convert-shard"):
        from habla.data.convert import convert_shard as convert

        return convert(dataset_uri, shard, workers if workers > 0 else None)["audio_seconds"] / 3600


@dsl.component(base_image=DEFAULT_PREP_IMAGE, install_kfp_package=False)
def assemble_dataset(
    dataset_uri: str,
    shard_hours: List[float],
    report: Output[Markdown],
    plots: Output[HTML],
    hours: Output[Metrics],
) -> str:
    """Gather the shards into NeMo manifests, rejected.jsonl and the dataset report. Returns the dataset folder."""
    from habla.core.errors import pipeline_step

    with pipeline_step("assemble-dataset"):
        from habla.core import render
        from habla.data import report as dataset_report
        from habla.data.assemble import assemble

        summary = assemble(dataset_uri)
        markdown, png = dataset_report.for_ui(dataset_uri)
        with open(report.path, "w", encoding="utf-8") as f:
            f.write(markdown)
        with open(plots.path, "w", encoding="utf-8") as f:
            f.write(render.png_html(png, "dataset report"))
        numbers = {**dataset_report.split_numbers(summary), "rejected_rows": summary["accounting"]["rejected"]}
        for key, value in numbers.items():
            hours.log_metric(key, value)
        print(f"converted {sum(shard_hours):.2f} h of audio in {len(shard_hours)} shards")
        return dataset_uri


@dsl.component(base_image=DEFAULT_PREP_IMAGE, install_kfp_package=False)
def register_dataset(dataset_uri: str, dataset: Output[Dataset]) -> str:
    """The prepared dataset as a KFP Dataset artifact (its report.json; metadata: where it is, release, hours),
    so the UI's lineage leads from the data to the models trained and evaluated on it. The audio stays where
    it is: only the report travels as the artifact. Returns the dataset folder."""
    from habla.core.errors import pipeline_step

    with pipeline_step("register-dataset"):
        import json

        from habla.data.report import split_numbers
        from habla.speech.dataset import read_report

        report = read_report(dataset_uri)
        with open(dataset.path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1, ensure_ascii=False)
        dataset.metadata.update({"uri": dataset_uri, "release": report["release"], "release_uri": report["release_uri"],
                                 **split_numbers(report)})  # fmt: skip
        return dataset_uri
