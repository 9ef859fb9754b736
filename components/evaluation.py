"""Evaluation and promotion: score the new model and the current best on the same test set."""

from kfp import dsl
from kfp.dsl import HTML, Markdown, Metrics, Output

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
) -> bool:
    """WER/CER of the new model (and of the current best model, if any) on the test split.

    Writes ``<run>/eval/`` (and ``<run>/eval/best/``); logs the scores as Metrics for the KFP compare view.
    Returns whether the new model beats the best one by more than ``promotion_margin`` (absolute WER).
    """
    from habla.core import render, storage
    from habla.core.layout import RunLayout
    from habla.data.report import read_report
    from habla.evaluation.evaluate import evaluate
    from habla.ops import registry

    run = RunLayout(run_dir)
    test_manifest = read_report(dataset_uri)["manifests"]["test"]
    new = evaluate(model_uri, test_manifest, run.eval.root)
    best = registry.read_best(output_uri)
    best_scores = evaluate(best["model"], test_manifest, run.best_eval.root) if best else None
    for key in ("wer", "cer", "utterances", "hours"):
        scores.log_metric(key, new[key])
    if best_scores:
        scores.log_metric("best_model_wer", best_scores["wer"])
    decision = registry.verdict(new, best, best_scores, promotion_margin)
    registry.record_comparison(run_dir, best, test_manifest, decision)  # promote_model re-compares if best moves
    with open(report.path, "w", encoding="utf-8") as f:
        f.write(storage.read_text(run.eval.report) + "\n\n" + decision.markdown)
    with open(plots.path, "w", encoding="utf-8") as f:
        f.write(render.png_html(storage.read_bytes(run.eval.plot), "WER by group"))
    return decision.promote


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
