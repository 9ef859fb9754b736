"""Data: Common Voice releases read (TSVs, durations, archives), Spanish text normalized, MP3 converted to
16 kHz WAV or NeMo tar shards, NeMo manifests assembled with a dataset report (``habla prepare``)."""
