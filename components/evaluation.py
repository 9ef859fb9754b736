"""Evaluation and promotion: score the new model and the current best on the same test set."""

from habla.components import PREP_IMAGE, TRAIN_IMAGE
from kfp import dsl
from kfp.dsl import HTML, Markdown, Metrics, Output


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
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
    from habla import runs, storage
    from habla.evaluate import evaluate
    from habla.report import png_html

    test_manifest = runs.dataset_report(dataset_uri)["manifests"]["test"]
    eval_dir = storage.join(run_dir, "eval")
    new = evaluate(model_uri, test_manifest, eval_dir)
    best = runs.read_best(output_uri)
    best_scores = evaluate(best["model"], test_manifest, storage.join(eval_dir, "best")) if best else None
    for key in ("wer", "cer", "utterances", "hours"):
        scores.log_metric(key, new[key])
    if best_scores:
        scores.log_metric("best_model_wer", best_scores["wer"])
    promote = runs.beats(new["wer"], best_scores["wer"] if best_scores else None, promotion_margin)

    text = storage.read_text(storage.join(eval_dir, "report.md"))
    if best_scores:
        verdict = "promoted" if promote else "kept"
        text += (
            f"\n\n## Against the current best model\n\n| model | WER | CER |\n|---|---|---|\n"
            f"| this run | {new['wer']:.4f} | {new['cer']:.4f} |\n"
            f"| best ({best['run']}) | {best_scores['wer']:.4f} | {best_scores['cer']:.4f} |\n\n"
            f"Margin {promotion_margin}: the best model is **{verdict}**.\n"
        )
    else:
        text += "\n\nNo model has been promoted yet: this one becomes the best.\n"
    with open(report.path, "w", encoding="utf-8") as f:
        f.write(text)
    with open(plots.path, "w", encoding="utf-8") as f:
        f.write(png_html(storage.read_bytes(storage.join(eval_dir, "wer_by_group.png")), "WER by group"))
    return promote


@dsl.component(base_image=PREP_IMAGE, install_kfp_package=False)
def promote_model(output_uri: str, run_dir: str, model_uri: str) -> str:
    """Copy the model under ``<output_uri>/models/<run>/`` and record it in ``models/best.json``."""
    import json

    from habla import runs, storage

    run = json.loads(storage.read_text(storage.join(run_dir, "run.json")))
    metrics = json.loads(storage.read_text(storage.join(run_dir, "eval", "metrics.json")))
    record = {
        "release": run["release"],
        "release_uri": run["release_uri"],
        "config": run["config"],
        "config_overrides": run["config_overrides"],
        "run_dir": run["run_dir"],
        "metrics": {k: metrics[k] for k in ("wer", "cer", "utterances", "hours")},
    }
    best = runs.promote(output_uri, model_uri, run["run_name"], record)
    print(f"promoted {best['model']} (WER {metrics['wer']:.4f})")
    return best["model"]
