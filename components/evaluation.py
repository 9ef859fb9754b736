"""Evaluation and promotion: score the new model and the current best on the same test set."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output

from habla.runs.parameters import DEFAULT_PREP_IMAGE, DEFAULT_TRAIN_IMAGE


@dsl.component(base_image=DEFAULT_TRAIN_IMAGE, install_kfp_package=False)
def evaluate_models(
    run_dir: str,
    dataset_uri: str,
    model_uri: str,
    output_uri: str,
    promotion_margin: float,
    scores: Output[Metrics],
    report: Output[Markdown],
    plots: Output[HTML],
    dataset: Input[Dataset],
    candidate: Output[Model],
    init_from: str = "",
    overlap_with: str = "",
) -> bool:
    """WER/CER of the new model (and of the current best model, if any) on the test split.

    Writes ``<run>/eval/`` (and ``<run>/eval/best/``); logs the scores as Metrics for the KFP compare view.
    The new model becomes a Model artifact (its metrics.json; metadata: where the .nemo is, WER/CER with
    intervals) made from the ``dataset`` artifact. Returns whether it replaces the best model: the paired
    bootstrap rule of habla.evaluation.verdict, whose numbers go into run.json and this step's Markdown. With
    ``init_from`` the checkpoint is scored zero-shot too (``<run>/eval/baseline/``): baseline → fine-tuned.
    """
    from habla.core.errors import pipeline_step

    with pipeline_step("evaluate-models"):
        import json

        from habla.core import render
        from habla.runs.evaluate import evaluate_run

        result = evaluate_run(run_dir, dataset_uri, model_uri, output_uri, promotion_margin, init_from, overlap_with)
        for key, value in result.ui_metrics().items():
            scores.log_metric(key, value)
        with open(report.path, "w", encoding="utf-8") as f:
            f.write(result.report)
        with open(plots.path, "w", encoding="utf-8") as f:
            f.write(render.png_html(result.plot, "WER by group"))
        with open(candidate.path, "w", encoding="utf-8") as f:
            json.dump(result.metrics, f, indent=2, ensure_ascii=False)
        candidate.metadata.update(result.model_metadata(model_uri, dataset.metadata.get("uri", dataset_uri)))
        return result.decision.promote


@dsl.component(base_image=DEFAULT_TRAIN_IMAGE, install_kfp_package=False)
def package_model(
    run_dir: str,
    dataset_uri: str,
    model_uri: str,
    output_uri: str,
    candidate: Input[Model],
    card: Output[Markdown],
    packaged: Output[Model],
) -> str:
    """Before promotion: the model card (README.md, Hugging Face model-index) and the ONNX export, verified
    against the .nemo with onnxruntime on the test split, under ``<output_uri>/models/<run>/``. The Model
    artifact holds the card; its metadata says where the .nemo and the ONNX file are. Returns the card's URI."""
    from habla.core.errors import pipeline_step

    with pipeline_step("package-model"):
        from habla.core import storage
        from habla.evaluation.package import package

        done = package(run_dir, dataset_uri, model_uri, output_uri)
        text = storage.read_text(done["card"])
        for path in (card.path, packaged.path):
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        packaged.metadata.update(
            {"uri": done["model"], "onnx": done["onnx"] or "", "onnx_verified": done["verified"],
             "card": done["card"], "evaluated_as": candidate.metadata.get("uri", model_uri)}
        )  # fmt: skip
        print(f"model card {done['card']}; ONNX {'verified: ' + done['onnx'] if done['verified'] else 'not published'}")
        return done["card"]


@dsl.component(base_image=DEFAULT_PREP_IMAGE, install_kfp_package=False)
def promote_model(output_uri: str, run_dir: str, model_uri: str) -> str:
    """Copy the model under ``<output_uri>/models/<run>/`` and record it in ``models/best.json`` (compare-and-swap:
    if another run was promoted meanwhile, compare again; the outcome is in ``<run>/eval/promotion.json``)."""
    from habla.core.errors import pipeline_step

    with pipeline_step("promote-model"):
        from habla.runs.registry import promote_run

        outcome = promote_run(output_uri, run_dir, model_uri)
        best = outcome.best or {}
        if outcome.promoted:
            print(f"promoted {best['model']} (WER {best['metrics']['wer']:.4f})")
        else:
            print(f"not promoted: {outcome.reason}")
        return best.get("model", "")
