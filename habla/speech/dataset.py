"""A prepared dataset as the other stages read it: its ``report.json`` (manifests, tar shards, statistics) and
the order its speaker groups are shown in. habla.data writes it (docs/layout.md)."""

from __future__ import annotations

from habla.core import state
from habla.core.errors import HablaError
from habla.core.layout import DatasetLayout


def read_report(dataset_uri: str) -> dict:
    """``report.json`` of a prepared dataset (its manifests, tar shards, statistics)."""
    report = state.read(DatasetLayout(dataset_uri).report_json, {"manifests": dict}, remedy="prepare it again")
    if report is None:
        raise HablaError(f"{dataset_uri}: not a prepared dataset (no report.json)")
    return report


def split_tars(report: dict, split: str) -> str | None:
    """The ``_OP_0..N_CL_`` pattern of a split's tar shards (``--format tar``), or None: WAV files."""
    return (report.get("tarred") or {}).get(split, {}).get("tarred_audio_filepaths")


#: Common Voice's age groups, youngest first ("fourties" is Common Voice's spelling); others sort after them.
AGE_ORDER = ("teens", "twenties", "thirties", "fourties", "forties", "fifties", "sixties", "seventies", "eighties",
             "nineties")  # fmt: skip


def age_key(group: str) -> tuple[int, str]:
    """Sort key putting age groups in age order, then anything else (``unknown``) by name."""
    return (AGE_ORDER.index(group), "") if group in AGE_ORDER else (len(AGE_ORDER), group)
