"""Errors users see, and the one way habla turns any exception into one line.

Exit codes of every ``habla`` command (the CLI maps exceptions to them):

- ``0``: done;
- ``2``: bad input or usage (:class:`HablaError`, argparse): the message says what to change;
- ``1``: a storage, network or OS fault that survived the retries (an unreachable endpoint, a full disk);
- ``130``: interrupted.
"""

from __future__ import annotations

import json

EXIT_OK = 0
EXIT_FAULT = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class HablaError(Exception):
    """A problem with the user's input or environment, explained in one line (exit code 2)."""


def _http_detail(exc: BaseException) -> str | None:
    """``HTTP 403 Forbidden: <message>`` for a Kubernetes/KFP ``ApiException`` (its JSON ``Status`` body)."""
    status = getattr(exc, "status", None)
    if not isinstance(status, int):
        return None
    message = ""
    body = getattr(exc, "body", None)
    if body:
        try:
            parsed = json.loads(body)
            message = str(parsed.get("message") or parsed.get("error") or "") if isinstance(parsed, dict) else ""
        except (TypeError, ValueError):
            message = str(body)
    reason = str(getattr(exc, "reason", "") or "")
    return f"HTTP {status} {reason}".rstrip() + (f": {message}" if message else "")


def _s3_detail(exc: BaseException) -> str | None:
    """``Code: Message`` of a botocore ``ClientError`` (never the request, so never a credential)."""
    response = getattr(exc, "response", None)
    error = response.get("Error") or {} if isinstance(response, dict) else {}
    code = error.get("Code", "")
    if not code:
        return None
    return f"{code}: {error.get('Message', '')}".rstrip(": ")


def one_line(exc: BaseException, *, with_type: bool = False, first_line: bool = False, limit: int = 300) -> str:
    """An exception as one line: an S3 error's code and message, an API server's status and message, or the
    exception's text with its lines joined (NeMo and Hydra put the useful part on the second line).

    ``with_type`` prefixes a plain exception's text with its type name (for errors that are not habla's own);
    ``first_line`` keeps only its first line (OmegaConf and the Kubernetes client add context lines after it).
    """
    text = _s3_detail(exc) or _http_detail(exc)
    if text is None:
        text = str(exc).strip()
        if first_line:
            text = text.split("\n", 1)[0]
        text = " ".join(text.split())
        if with_type or not text:
            text = f"{type(exc).__name__}: {text}".rstrip(": ")
    return text if len(text) <= limit else text[: limit - 1] + "…"
