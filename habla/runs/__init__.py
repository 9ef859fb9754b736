"""A pipeline run: its parameters, its record (run.json), the model registry (models/best.json) and promotion."""
