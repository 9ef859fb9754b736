"""Operations: running the pipeline (here or on KFP), the release watcher and its schedule, the Mozilla Data
Collective client, run records and the model registry, and run comparison."""
