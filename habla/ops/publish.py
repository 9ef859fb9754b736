"""Hand a promoted model on: ``habla publish`` uploads its package (``model.nemo``, the model card ``README.md``,
the verified ``model.onnx`` and ``onnx_check.json``) to a Hugging Face-style hub as one commit, with
``huggingface_hub``'s client (the Hugging Face Hub, or a self-hosted one at ``--endpoint``)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from habla.core import state, storage
from habla.core.errors import Fault, HablaError, one_line
from habla.core.layout import OutputLayout

log = logging.getLogger(__name__)

#: What a model package holds and the hub gets (layout.ModelPackage); the card is the repository's README.md.
FILES = ("README.md", "model.nemo", "model.onnx", "onnx_check.json")
REQUIRED = ("README.md", "model.nemo")


def package_folder(source: str) -> str:
    """The promoted model's folder ``OUT/models/<run>/`` that ``source`` names: that folder itself, or a
    pipeline's output ``OUT`` (its current best model's folder)."""
    if not storage.is_s3(source) and not os.path.isdir(source):
        raise HablaError(f"{source}: no such folder (give a pipeline's output folder or OUT/models/<run>/)")
    best = state.read(OutputLayout(source).best, ("model",), remedy="it is a pipeline's models/best.json")
    folder = str(best["model"]).rstrip("/").rsplit("/", 1)[0] if best else source
    missing = [name for name in REQUIRED if not storage.exists(storage.join(folder, name))]
    if missing:
        raise HablaError(f"{folder}: not a promoted model's folder (no {', '.join(missing)}); promoted models are in "
                         "OUT/models/<run>/")  # fmt: skip
    return folder


def publish(
    source: str,
    repo_id: str,
    *,
    endpoint: str | None = None,
    token: str | None = None,
    private: bool = False,
    message: str | None = None,
) -> dict:
    """Create ``repo_id`` on the hub if needed and upload the package as one commit. Returns ``{"repo", "url",
    "commit", "files"}``. HablaError for a bad source, repository name or token; Fault when the hub fails."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise HablaError(f"--repo {repo_id!r}: not a hub repository id ({one_line(exc, first_line=True)})") from None
    folder = package_folder(source)
    present = [name for name in FILES if storage.exists(storage.join(folder, name))]
    local = Path(folder) if not storage.is_s3(folder) else _download(folder, present)
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            repo_type="model",
            folder_path=str(local),
            allow_patterns=present,
            commit_message=message or f"habla: {storage.name(folder)}",
        )
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        text = f"the hub refused the upload ({one_line(exc, first_line=True)})"
        raise (HablaError(text) if status in (400, 401, 403, 404, 409, 422) else Fault(text)) from None
    except Exception as exc:
        transport = type(exc).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "requests")
        if not (transport or isinstance(exc, OSError)):  # connection refused, DNS, TLS, a timeout
            raise
        raise Fault(f"cannot reach the hub at {api.endpoint}: {one_line(exc, with_type=True)}") from None
    return {"repo": repo_id, "url": f"{api.endpoint.rstrip('/')}/{repo_id}", "commit": commit.oid, "files": present}


def _download(folder: str, names: list[str]) -> Path:
    import tempfile

    target = Path(tempfile.mkdtemp(prefix="habla-publish-"))
    for name in names:
        storage.download_file(storage.join(folder, name), target / name)
    return target
