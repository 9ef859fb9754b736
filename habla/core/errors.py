"""Errors users see, and the one way habla turns any exception into one line.

Exit codes of every ``habla`` command (the CLI maps exceptions to them):

- ``0``: done;
- ``2``: bad input or usage (:class:`HablaError`, argparse): the message says what to change;
- ``1``: a storage, network or OS fault that survived the retries (an unreachable endpoint, a full disk; a
  :class:`Fault`, a botocore error or an OSError);
- ``130``: interrupted.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import uuid
from contextlib import contextmanager

EXIT_OK = 0
EXIT_FAULT = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class HablaError(Exception):
    """A problem with the user's input or environment, explained in one line (exit code 2)."""


class Fault(Exception):
    """A storage, network or service fault that survived the retries (an unreachable endpoint, a server that
    answers 5xx or nonsense), explained in one line (exit code 1): run again once it is fixed."""


# A URL's query string (a presigned URL's signature lives there) and its user:password; a bearer token.
_URL_SECRETS = re.compile(
    r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?:[^\s/@]+@)?(?P<rest>[^\s?#'\"<>]*)\?[^\s#'\"<>]*"
)
_URL_USER = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^\s/@]+@")
_BEARER = re.compile(
    r"(?i)\b(bearer\s+|[\w-]*(?:token|api[_-]?key|secret|password)(?:[_-][\w-]*)?\s*[=:]\s*)[^\s,;'\"]+"
)


def redact(text: str) -> str:
    """``text`` without secrets that URLs and headers carry: a URL's query string (``?…``) and user info
    (``user:password@``), and ``Bearer <token>`` / ``token=…``. For every line habla prints or stores."""
    text = _URL_SECRETS.sub(lambda m: f"{m['scheme']}{m['rest']}?…", text)
    text = _URL_USER.sub(lambda m: m["scheme"], text)
    return _BEARER.sub(lambda m: f"{m[1]}…", text)


class RedactingFilter(logging.Filter):
    """A logging filter that applies :func:`redact` to every record's formatted message."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


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
    text = redact(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# What a pipeline step prints when its input is bad (after its one-line error): habla pipeline run-local reads it
# from the step's log and does not retry the step.
BAD_INPUT_MARK = "(bad input: exit 2, not retried)"
# A folder that `habla pipeline run-local` gives its steps (their environment): a step that ends on bad input leaves
# a file there, which tells run-local's retry loop not to try it again.
BAD_INPUT_DIR_ENV = "HABLA_BAD_INPUT_DIR"


@contextmanager
def pipeline_step(name: str):
    """The body of a pipeline step (``with pipeline_step("plan-dataset"): ...``): bad input (:class:`HablaError`)
    ends the step with one line on stderr, ``habla <name>: error: <message> (bad input …)``, and exit code 2,
    never a traceback; anything else (a fault, a bug) propagates, exit code 1, and is what retries are for.

    Where ``$HABLA_BAD_INPUT_DIR`` names a folder (habla pipeline run-local), a file there records the bad input so
    that the step is not retried.
    """
    try:
        yield
    except HablaError as exc:
        line = redact(" ".join(str(exc).split()))
        print(f"habla {name}: error: {line} {BAD_INPUT_MARK}", file=sys.stderr, flush=True)
        folder = os.environ.get(BAD_INPUT_DIR_ENV)
        if folder and os.path.isdir(folder):
            with open(os.path.join(folder, f"{name}-{uuid.uuid4().hex}.txt"), "w", encoding="utf-8") as f:
                f.write(line + "\n")
        raise SystemExit(EXIT_BAD_INPUT) from None
