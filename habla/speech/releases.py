"""Common Voice release names: ``cv-corpus-<version>[-delta]-<date>[-<locale>][.tar.gz]``, parsed and ordered by
version, and the label a release location is shown under."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from habla.core import storage

_RELEASE_RE = re.compile(
    r"cv-corpus-(?P<version>\d+(?:\.\d+)*)(?P<delta>-delta)?-(?P<date>\d{4}-\d{2}-\d{2})(?:-(?P<locale>[A-Za-z]{2,3}(?:-[A-Za-z0-9]+)*))?"
    r"(?P<ext>\.tar\.gz|\.tgz)?$"
)


@dataclass(frozen=True, order=True)
class ReleaseName:
    """A parsed ``cv-corpus-<version>[-delta]-<date>-<locale>[.tar.gz]`` name; orders by version."""

    version: tuple[int, ...]
    date: str
    locale: str
    delta: bool = False
    archive: bool = False

    @property
    def version_str(self) -> str:
        return ".".join(map(str, self.version))

    @property
    def name(self) -> str:
        delta = "-delta" if self.delta else ""
        return f"cv-corpus-{self.version_str}{delta}-{self.date}-{self.locale}"


def parse_release_name(text: str) -> ReleaseName | None:
    """Parse a release name from a file or folder name (or the last component of a path/URI)."""
    match = _RELEASE_RE.search(storage.name(text))
    if not match:
        return None
    return ReleaseName(
        version=tuple(int(p) for p in match["version"].split(".")),
        date=match["date"],
        locale=match["locale"] or "",  # an extracted corpus folder has no locale suffix: it is the subfolder
        delta=bool(match["delta"]),
        archive=bool(match["ext"]),
    )


def release_label(uri: str) -> str:
    """A human label for a release location: its cv-corpus name if one appears in the path, else the path."""
    parts = [p for p in str(uri).rstrip("/").replace("\\", "/").split("/") if p]
    for i in range(len(parts) - 1, -1, -1):
        parsed = parse_release_name(parts[i])
        if parsed and not parsed.locale and i + 1 < len(parts):  # cv-corpus-8.0-2022-01-19/es
            parsed = dataclasses.replace(parsed, locale=parts[i + 1])
        if parsed:
            return parsed.name
    return "/".join(parts[-2:]) if parts else str(uri)


# What the data's licence is when a release names none: Common Voice releases are CC0-1.0.
COMMON_VOICE_LICENSE = "cc0-1.0"
LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENCE")


def release_license(uri: str) -> tuple[str, str]:
    """A release's data licence: ``(id, text)``. A ``LICENSE`` file in the release's locale folder (its first line
    the licence's Hugging Face / SPDX id in lower case, e.g. ``cc-by-sa-3.0``, the rest its attribution) wins;
    else a Common Voice release (a ``cv-corpus-*`` name) is CC0-1.0; else ``other`` (unknown)."""
    from habla.core import storage

    for name in LICENSE_FILES:
        try:
            text = storage.read_text(storage.join(uri, name)) if uri else ""
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError, UnicodeDecodeError):
            continue
        except Exception:  # noqa: BLE001 - an unreadable store: the licence stays unknown, never a crash
            continue
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if lines:
            return lines[0].lower(), "\n".join(lines[1:])
    if uri and any(parse_release_name(part) for part in uri.rstrip("/").split("/")):
        return COMMON_VOICE_LICENSE, "Common Voice (Mozilla), CC0-1.0."
    return "other", ""
