"""``habla download``: fetch a Common Voice release from the Mozilla Data Collective, resumed and verified.

Exit codes (habla.data.mdc): 0 done; 1 the Data Collective kept failing after the retries, answered nonsense
or sent an archive that does not match its checksum (run again: the download resumes); 2 bad input (the key,
the version, the locale, MDC_API_URL).
"""

from __future__ import annotations

import argparse
import json

HELP = "download a Common Voice release from the Mozilla Data Collective into a folder or s3:// (resumes, verifies)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="DST", help="folder or s3:// prefix (e.g. the watcher's inbox)")
    parser.add_argument("--locale", default="es", help="Common Voice locale (default es)")
    parser.add_argument("--version", help="release version, e.g. 25.0 (default: the newest listed)")
    parser.add_argument("--attempts", type=int, help="tries of each request, with backoff; each try of the download "
                        "resumes on a new session (default 4)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from habla.core.errors import HablaError
    from habla.data import downloads, mdc

    if args.attempts is not None and args.attempts < 1:
        raise HablaError("--attempts must be >= 1")
    backoff = mdc.BACKOFF if args.attempts is None else dataclasses.replace(mdc.BACKOFF, attempts=args.attempts)
    release = mdc.find_release(args.locale, args.version, backoff=backoff)
    done = downloads.fetch(release, args.out, backoff=backoff)
    print(json.dumps({"release": release.name.name, "uri": done.uri, "bytes": done.size, "sha256": done.sha256 or None,
                      "verified": done.verified, "resumed_from": done.resumed_from,
                      "already_there": done.already_there}))  # fmt: skip
    return 0
