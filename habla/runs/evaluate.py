"""The pipeline's evaluation step: the run's new model and the current best one scored on the same test set,
the promotion verdict, and what the run records of it."""

from __future__ import annotations

from dataclasses import dataclass

from habla.core import render, state, storage
from habla.core.layout import RunLayout
from habla.evaluation.evaluate import evaluate
from habla.evaluation.verdict import Verdict, fine_tuning_gain, verdict
from habla.runs import record, registry
from habla.speech import models
from habla.speech.dataset import read_report, split_tars


@dataclass(frozen=True)
class RunEvaluation:
    """What :func:`evaluate_run` measured and decided."""

    metrics: dict  # the new model's metrics.json
    best_metrics: dict | None  # the current best model's, on the same test set (None: nothing promoted yet)
    decision: Verdict
    report: str  # the evaluation report (Markdown, its plot inlined) and the verdict's explanation
    plot: bytes  # WER by group (PNG)
    gain: dict | None = None  # with init_from: the checkpoint zero-shot -> fine-tuned (verdict.fine_tuning_gain)

    def ui_metrics(self) -> dict[str, float]:
        """The scalars the KFP UI shows and compares across runs."""
        new = self.metrics
        out = {key: new[key] for key in ("wer", "cer", "utterances", "hours", "rtfx")}
        out.update(wer_ci_low=new["wer_ci"][0], wer_ci_high=new["wer_ci"][1])
        if self.best_metrics:
            out["best_model_wer"] = self.best_metrics["wer"]
        if self.gain:
            out["baseline_wer"] = self.gain["baseline"]["wer"]
            out["fine_tuning_wer_improvement"] = self.gain["wer_improvement"]
            out["fine_tuning_wer_improvement_ci_low"] = self.gain["wer_improvement_ci"][0]
        out["promoted"] = int(self.decision.promote)
        if "wer_improvement" in self.decision.record:
            out["wer_improvement"] = self.decision.record["wer_improvement"]
            out["wer_improvement_ci_low"] = self.decision.record["wer_improvement_ci"][0]
        return out

    def model_metadata(self, model_uri: str, dataset: str) -> dict:
        """The evaluated model's metadata (the KFP Model artifact's): where it is, its scores, the verdict."""
        new = self.metrics
        return {"uri": model_uri, "framework": "NeMo", "dataset": dataset, "wer": new["wer"], "wer_ci": new["wer_ci"],
                "cer": new["cer"], "cer_ci": new["cer_ci"], "promoted": self.decision.promote}  # fmt: skip


def evaluate_run(
    run_dir: str,
    dataset_uri: str,
    model_uri: str,
    output_uri: str,
    margin: float,
    init_from: str = "",
    overlap_with: str = "",
) -> RunEvaluation:
    """Score the run's model (``<run>/eval/``) and the current best one (``<run>/eval/best/``) on the dataset's
    test split; decide whether the new one replaces the best (habla.evaluation.verdict) and record the decision
    in run.json and the comparison in ``eval/promotion.json``, which the promotion step re-checks.

    With ``init_from`` the checkpoint the run fine-tuned is scored zero-shot too (``<run>/eval/baseline/``): the
    report, its Markdown and the metrics show baseline → fine-tuned with the paired interval. Promotion is
    unchanged. ``overlap_with`` (the checkpoint's training data) adds ``overlap`` to both evaluations."""
    run = RunLayout(run_dir)
    dataset = read_report(dataset_uri)
    test_manifest = dataset["manifests"]["test"]
    tars = split_tars(dataset, "test")
    best = registry.read_best(output_uri)  # before the long evaluation: a corrupt best.json fails at once
    metrics = evaluate(model_uri, test_manifest, run.eval.root, overlap_with=overlap_with or None, tars=tars)
    best_metrics = evaluate(best["model"], test_manifest, run.best_eval.root, tars=tars) if best else None
    rows = [registry.scores(where)[1] for where in (run.eval, run.best_eval)] if best else [None, None]
    gain = None
    if init_from:
        baseline = evaluate(models.resolve_model(init_from), test_manifest, run.baseline_eval.root,
                            overlap_with=overlap_with or None, tars=tars)  # fmt: skip
        gain = fine_tuning_gain(baseline, registry.scores(run.baseline_eval)[1], metrics,
                                registry.scores(run.eval)[1], init_from)  # fmt: skip
        metrics["fine_tuning_gain"] = {k: v for k, v in gain.items() if k != "markdown"}
        state.write(run.eval.metrics, metrics, indent=2)
    decision = verdict(metrics, best, best_metrics, margin, *rows)
    record.record_decision(run_dir, decision)
    record.record_comparison(run_dir, best, test_manifest, decision)
    plot = storage.read_bytes(run.eval.plot)
    tail = (gain["markdown"] + "\n" if gain else "") + decision.markdown
    local = storage.read_text(run.eval.report)
    report = render.markdown_for_ui(local, storage.name(run.eval.plot), plot, tail=tail,
                                    where=run.eval.report)  # fmt: skip
    # The report people open in the run folder carries the verdict too (not only the KFP UI's copy).
    storage.write_text(run.eval.report, local.rstrip("\n") + "\n\n" + tail)
    return RunEvaluation(metrics, best_metrics, decision, report, plot, gain)
