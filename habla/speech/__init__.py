"""The speech contracts every stage shares: text normalisation, audio decoding, NeMo manifests, model files,
release names and the prepared dataset's report. Imports only habla.core."""
