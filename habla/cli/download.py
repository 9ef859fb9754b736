"""``habla download``: fetch a Common Voice release from the Mozilla Data Collective, resumed and verified."""

from __future__ import annotations

import argparse
import json

HELP = "download a Common Voice release from the Mozilla Data Collective into a folder or s3:// (resumes, verifies)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="DST", help="folder or s3:// prefix (e.g. the watcher's inbox)")
    parser.add_argument("--locale", default="es", help="Common Voice locale (default es)")
    parser.add_argument("--version", help="release version, e.g. 25.0 (default: the newest listed)")
    parser.add_argument("--attempts", type=int, default=3, help="download sessions to try, each resuming (default 3)")


def run(args: argparse.Namespace) -> int:
    from habla.core.errors import HablaError
    from habla.ops import mdc

    if args.attempts < 1:
        raise HablaError("--attempts must be >= 1")
    release = mdc.find_release(args.locale, args.version)
    done = mdc.fetch(release, args.out, attempts=args.attempts)
    print(json.dumps({"release": release.name.name, "uri": done.uri, "bytes": done.size, "sha256": done.sha256 or None,
                      "verified": done.verified, "resumed_from": done.resumed_from,
                      "already_there": done.already_there}))  # fmt: skip
    return 0
