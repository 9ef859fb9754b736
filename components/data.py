"""Data preparation steps: plan → convert one shard (fanned out) → assemble manifests and the report."""

from typing import List

from kfp import dsl
from kfp.dsl import HTML, Dataset, Markdown, Metrics, Output

from habla.kubeflow.compile import DEFAULT_PREP_IMAGE


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
    from habla.core.layout import OutputLayout
    from habla.data import commonvoice, prepare
    from habla.data.options import PrepareOptions, fingerprint

    options = PrepareOptions(
        shards=num_shards,
        train_source=train_source,
        format=audio_format,
        locale=locale,
        min_duration=min_duration,
        max_duration=max_duration,
    )
    label = commonvoice.release_label(release_uri)
    dataset = OutputLayout(output_uri).dataset(label, fingerprint(release_uri, options)).root
    prepare.plan(release_uri, dataset, options)
    return dataset


@dsl.component(base_image=DEFAULT_PREP_IMAGE, install_kfp_package=False)
def list_shards(dataset_uri: str) -> List[int]:
    """The shard numbers of a planned dataset (what the ParallelFor iterates over)."""
    from habla.data import prepare

    return list(range(prepare.read_plan(dataset_uri)["num_shards"]))


@dsl.component(base_image=DEFAULT_PREP_IMAGE, install_kfp_package=False)
def convert_shard(dataset_uri: str, shard: int, workers: int) -> float:
    """Convert one shard's clips to 16 kHz WAV (or a tar shard) in object storage. Returns its audio hours.

    Resumes where an earlier attempt stopped; a shard already converted is not touched.
    """
    from habla.data import prepare

    return prepare.convert_shard(dataset_uri, shard, workers if workers > 0 else None)["audio_seconds"] / 3600


@dsl.component(base_image=DEFAULT_PREP_IMAGE, install_kfp_package=False)
def assemble_dataset(
    dataset_uri: str,
    shard_hours: List[float],
    report: Output[Markdown],
    plots: Output[HTML],
    hours: Output[Metrics],
) -> str:
    """Gather the shards into NeMo manifests, rejected.jsonl and the dataset report. Returns the dataset folder."""
    from habla.core import render, storage
    from habla.core.layout import DatasetLayout
    from habla.data import prepare

    summary = prepare.assemble(dataset_uri)
    layout = DatasetLayout(dataset_uri)
    png = storage.read_bytes(layout.report_png)
    # The KFP UI cannot follow report.md's relative link to the plot: the artifact carries the image itself.
    markdown = storage.read_text(layout.report_md)
    with open(report.path, "w", encoding="utf-8") as f:
        f.write(markdown.replace(f"]({storage.name(layout.report_png)})", f"]({render.png_data_uri(png)})"))
    with open(plots.path, "w", encoding="utf-8") as f:
        f.write(render.png_html(png, "dataset report"))
    for split, stats in summary["splits"].items():
        hours.log_metric(f"{split}_hours", stats["hours"])
        hours.log_metric(f"{split}_clips", stats["clips"])
    hours.log_metric("rejected_rows", summary["accounting"]["rejected"])
    print(f"converted {sum(shard_hours):.2f} h of audio in {len(shard_hours)} shards")
    return dataset_uri


@dsl.component(base_image=DEFAULT_PREP_IMAGE, install_kfp_package=False)
def register_dataset(dataset_uri: str, dataset: Output[Dataset]) -> str:
    """The prepared dataset as a KFP Dataset artifact (its report.json; metadata: where it is, release, hours),
    so the UI's lineage leads from the data to the models trained and evaluated on it. The audio stays where
    it is: only the report travels as the artifact. Returns the dataset folder."""
    import json

    from habla.core import storage
    from habla.core.layout import DatasetLayout

    report = storage.read_text(DatasetLayout(dataset_uri).report_json)
    with open(dataset.path, "w", encoding="utf-8") as f:
        f.write(report)
    parsed = json.loads(report)
    dataset.metadata.update(
        {"uri": dataset_uri, "release": parsed["release"], "release_uri": parsed["release_uri"],
         **{f"{split}_hours": stats["hours"] for split, stats in parsed["splits"].items()},
         **{f"{split}_clips": stats["clips"] for split, stats in parsed["splits"].items()}}
    )  # fmt: skip
    return dataset_uri
