"""Evaluation and promotion: score the new model and the current best on the same test set."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output

from habla.kubeflow.compile import DEFAULT_PREP_IMAGE, DEFAULT_TRAIN_IMAGE


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
) -> bool:
    """WER/CER of the new model (and of the current best model, if any) on the test split.

    Writes ``<run>/eval/`` (and ``<run>/eval/best/``); logs the scores as Metrics for the KFP compare view.
    The new model becomes a Model artifact (its metrics.json; metadata: where the .nemo is, WER/CER with
    intervals) made from the ``dataset`` artifact. Returns whether it replaces the best model: the paired
    bootstrap rule of habla.ops.registry.verdict, whose numbers go into run.json and this step's Markdown.
    """
    from habla.core import jsonl, render, storage
    from habla.core.layout import RunLayout
    from habla.data.report import read_report
    from habla.evaluation.evaluate import evaluate
    from habla.ops import registry

    run = RunLayout(run_dir)
    test_manifest = read_report(dataset_uri)["manifests"]["test"]
    new = evaluate(model_uri, test_manifest, run.eval.root)
    best = registry.read_best(output_uri)
    best_scores = evaluate(best["model"], test_manifest, run.best_eval.root) if best else None
    for key in ("wer", "cer", "utterances", "hours", "rtfx"):
        scores.log_metric(key, new[key])
    scores.log_metric("wer_ci_low", new["wer_ci"][0])
    scores.log_metric("wer_ci_high", new["wer_ci"][1])
    if best_scores:
        scores.log_metric("best_model_wer", best_scores["wer"])
    rows = (
        [jsonl.loads(storage.read_text(layout.predictions)) for layout in (run.eval, run.best_eval)]
        if best
        else [None, None]
    )
    decision = registry.verdict(new, best, best_scores, promotion_margin, *rows)
    registry.record_decision(run_dir, decision)  # the decision and its numbers, in run.json
    registry.record_comparison(run_dir, best, test_manifest, decision)  # promote_model re-compares if best moves
    scores.log_metric("promoted", int(decision.promote))
    if "wer_improvement" in decision.record:
        scores.log_metric("wer_improvement", decision.record["wer_improvement"])
        scores.log_metric("wer_improvement_ci_low", decision.record["wer_improvement_ci"][0])
    png = storage.read_bytes(run.eval.plot)
    # The KFP UI cannot follow report.md's relative link to the plot: the artifact carries the image itself.
    markdown = storage.read_text(run.eval.report).replace(
        f"]({storage.name(run.eval.plot)})", f"]({render.png_data_uri(png)})"
    )
    with open(report.path, "w", encoding="utf-8") as f:
        f.write(markdown + "\n\n" + decision.markdown)
    with open(plots.path, "w", encoding="utf-8") as f:
        f.write(render.png_html(png, "WER by group"))
    with open(candidate.path, "w", encoding="utf-8") as f:
        f.write(storage.read_text(run.eval.metrics))
    candidate.metadata.update(
        {"uri": model_uri, "framework": "NeMo", "dataset": dataset.metadata.get("uri", dataset_uri), "wer": new["wer"],
         "wer_ci": new["wer_ci"], "cer": new["cer"], "cer_ci": new["cer_ci"], "promoted": decision.promote}
    )  # fmt: skip
    return decision.promote


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
    from habla.ops import registry

    outcome = registry.promote_run(output_uri, run_dir, model_uri)
    best = outcome.best or {}
    if outcome.promoted:
        print(f"promoted {best['model']} (WER {best['metrics']['wer']:.4f})")
    else:
        print(f"not promoted: {outcome.reason}")
    return best.get("model", "")
