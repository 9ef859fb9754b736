"""Evaluation: transcribe a manifest with a model, score WER/CER overall and by group, report and plot."""
