"""Where ``.nemo`` models come from: a local path, an ``s3://`` URI, or a name in a model store; and the local
cache that downloaded models and audio are kept in between runs.

The model store (``HABLA_MODEL_STORE``: a local folder or an ``s3://`` prefix) lets offline clusters pre-stage
published checkpoints: ``stt_es_fastconformer_hybrid_large_pc`` resolves to
``$HABLA_MODEL_STORE/stt_es_fastconformer_hybrid_large_pc.nemo`` (or ``…/<name>/<name>.nemo``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from habla.core import state, storage
from habla.core.errors import HablaError, one_line
from habla.core.layout import OutputLayout, RunLayout

log = logging.getLogger(__name__)

STORE_ENV = "HABLA_MODEL_STORE"


def cache_root() -> Path:
    """Where downloaded audio and models are kept between runs (``$HABLA_CACHE``, default ``~/.cache/habla``)."""
    return Path(os.environ.get("HABLA_CACHE") or Path.home() / ".cache" / "habla")


def resolve_model(name_or_uri: str, what: str = "--init-from") -> str:
    """A ``.nemo`` location: a path or URI as given, else ``name`` looked up in the model store."""
    looks_like_location = storage.is_s3(name_or_uri) or name_or_uri.endswith(".nemo") or "/" in name_or_uri
    if looks_like_location or os.path.exists(name_or_uri):
        return name_or_uri
    store = os.environ.get(STORE_ENV, "").strip()
    if not store:
        raise HablaError(
            f"{what} {name_or_uri}: no such file, and no model store to look it up in "
            f"(set {STORE_ENV} to a folder or s3:// prefix holding <name>.nemo files)"
        )
    candidates = [storage.join(store, f"{name_or_uri}.nemo"), storage.join(store, name_or_uri, f"{name_or_uri}.nemo")]
    for candidate in candidates:
        if storage.exists(candidate):
            log.info("%s: %s is %s", what, name_or_uri, candidate)
            return candidate
    raise HablaError(f"{what} {name_or_uri}: not in the model store (looked for {' and '.join(candidates)})")


def fetch_model(uri: str, what: str = "model") -> Path:
    """A local copy of a ``.nemo`` file (downloaded into the cache when it is in object storage)."""
    if not storage.is_s3(uri):
        if not Path(uri).is_file():
            raise HablaError(f"{what} {uri}: no such file")
        return Path(uri)
    bucket, key = storage.split_s3(uri)
    local = cache_root() / "models" / bucket / key
    try:
        storage.download_file(uri, local)
    except FileNotFoundError:
        raise HablaError(f"{what} {uri}: not found") from None
    except Exception as exc:
        raise HablaError(f"{what} {uri}: cannot download ({one_line(exc, with_type=True)})") from None
    return local


def model_in_folder(uri: str, what: str = "--model") -> str:
    """``uri`` itself when it names a file; for a folder, the model it holds: a pipeline's output folder its best
    model (``models/best.json``), a run folder its trained model (``model/model.nemo``), a training output or
    a promoted model's folder its ``model.nemo``. HablaError when a folder holds none of them."""
    if uri.endswith(".nemo") or (not storage.is_s3(uri) and not os.path.isdir(uri)):
        return uri
    best = state.read(OutputLayout(uri).best, ("model",), remedy="it is models/best.json of a pipeline's output")
    if best is not None:
        log.info("%s %s: its best model, %s", what, uri, best["model"])
        return best["model"]
    for candidate in (RunLayout(uri).train.model, storage.join(uri, "model.nemo")):
        if storage.exists(candidate):
            return candidate
    raise HablaError(f"{what} {uri}: a folder without a model (no models/best.json, model/model.nemo or model.nemo)")
