"""``habla watch``: find new Common Voice releases in an inbox and submit the training pipeline once for each.

How it decides
  * The inbox (a local folder or ``s3://bucket/prefix``) is listed one level deep. A release is an archive
    ``cv-corpus-<ver>[-delta]-<date>-<locale>.tar.gz`` or an extracted folder ``cv-corpus-<ver>-<date>[-<locale>]/``
    that already holds ``validated.tsv`` or ``train.tsv`` (here or under ``<locale>/``; an extracted folder
    still being copied is skipped until its TSVs are there). Other locales and other names are ignored.
  * Releases are ordered by version (9.0 < 17.0 < 25.0), never by upload time. Those newer than the last
    release processed for the locale are handled, oldest first; an older release that shows up late is
    ignored.
  * Delta releases (``-delta-``) hold only what changed since the previous release and are refused, once,
    with a message; the refusal is recorded so that later runs do not repeat it.

Exactly once, crash-safe (the state store is a local folder or ``s3://…``)
  ``STATE/releases/<release>/claim-0001.json``   the Nth attempt at submitting a release, created with a
                                                 conditional write (``storage.create_exclusive``): of two
                                                 watchers racing, one creates it and submits, the other skips.
                                                 With ``claims="lease"`` (or ``"auto"`` on a store whose
                                                 conditional writes fail the probe) the claim is a Kubernetes
                                                 Lease instead (:mod:`habla.kubeflow.lease`); see choose_claims.
  ``STATE/releases/<release>/result.json``       written once the run exists: submitted (or refused), run id.
  ``STATE/summary.json``                         a summary of all results, rewritten after each run.
  ``STATE/arrivals/<release>.json``              an archive's size and mtime/ETag when first seen (below).
  A state file that is not valid JSON (or lacks its fields) is logged and treated as absent, never fatal.
  A claim carries a lease. A submission that fails marks its claim ``failed``: the next watcher run takes a
  new attempt (claim-0002 …). A watcher killed mid-way leaves its claim ``submitting``; once the lease has
  expired another attempt may start. Every attempt first looks for a run of the experiment with the release's
  run name (``habla-<release>``) and adopts it instead of submitting again, so a crash between "run created"
  and "result written" does not lead to a second run.

Complete archives only
  An archive is submitted only once it is complete: a ``<archive>.sha256`` sidecar exists (an uploader
  writes it last), or its size and mtime/ETag held from one poll to the next and it reads to tar's
  end-of-archive blocks (for ``.tar.gz``, one streaming read of the whole archive per version of it). Until
  then the decision is ``waiting``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import re
import socket
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from habla.core import jsonl, storage
from habla.core.errors import HablaError, one_line
from habla.data import commonvoice
from habla.data.commonvoice import ReleaseName, parse_release_name
from habla.kubeflow.compile import CompileOptions

log = logging.getLogger(__name__)

LEASE_SECONDS = 900  # how long a claim protects a submission in progress (compiling + 4 API calls)
DOWNLOAD_LEASE_SECONDS = 6 * 3600  # an MDC download of tens of GB
TSV_MARKERS = ("validated.tsv", "train.tsv")
# Decisions worth printing; "known" (processed before) and "older" are only logged.
REPORTED = (
    "submitted",
    "adopted",
    "refused",
    "failed",
    "in-progress",
    "would-submit",
    "would-refuse",
    "downloaded",
    "would-download",
    "waiting",
)


@dataclass(frozen=True)
class Release:
    """A release found in the inbox: its parsed name and where it is (archive or extracted folder)."""

    name: ReleaseName
    uri: str


@dataclass
class Decision:
    """What the watcher did (or, with --dry-run, would do) about one release."""

    release: str
    action: str
    detail: str = ""
    run_id: str = ""
    url: str = ""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _iso(t: dt.datetime) -> str:
    return t.isoformat(timespec="seconds")


def _json(value: Any) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8")


# -------------------------------------------------------------------------------------- the inbox


def _children(folder: str) -> list[tuple[str, bool]]:
    """The entries directly in a folder / under a key prefix: ``(uri, is_folder)``."""
    if not storage.is_s3(folder):
        if not os.path.isdir(folder):
            raise HablaError(f"{folder}: no such folder")
        with os.scandir(folder) as it:
            return sorted((os.path.join(folder, e.name), e.is_dir()) for e in it)
    bucket, key = storage.split_s3(folder)
    prefix = key.rstrip("/") + "/" if key else ""
    out = []
    try:
        pages = (
            storage.s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
        )
        for page in pages:
            out += [(f"s3://{bucket}/{p['Prefix'].rstrip('/')}", True) for p in page.get("CommonPrefixes", [])]
            out += [(f"s3://{bucket}/{o['Key']}", False) for o in page.get("Contents", []) if o["Key"] != prefix]
    except Exception as exc:  # noqa: BLE001 - botocore ClientError, EndpointConnectionError …
        raise HablaError(f"cannot list {folder}: {one_line(exc, with_type=True)}") from None
    return sorted(out)


def _has_tsvs(folder: str, locale: str) -> bool:
    return any(
        storage.exists(storage.join(base, tsv))
        for base in (folder, storage.join(folder, locale))
        for tsv in TSV_MARKERS
    )


def find_releases(inbox: str, locale: str) -> list[Release]:
    """The releases of ``locale`` in the inbox, by version; an extracted folder wins over its archive."""
    found: dict[str, Release] = {}
    for uri, is_folder in _children(inbox):
        base = storage.name(uri)
        # An archive extracts to cv-corpus-<ver>-<date>/<locale>/: the folder name carries no locale.
        parsed = parse_release_name(base)
        if parsed is not None and is_folder and not parsed.locale:
            parsed = dataclasses.replace(parsed, locale=locale)
        if parsed is None or parsed.locale != locale or parsed.archive == is_folder:
            continue
        if is_folder and not _has_tsvs(uri, locale):
            log.info("%s: no %s yet (still being copied?), skipped this time", uri, " or ".join(TSV_MARKERS))
            continue
        if is_folder or parsed.name not in found:
            found[parsed.name] = Release(parsed, uri)
    return sorted(found.values(), key=lambda r: r.name)


# -------------------------------------------------------------------------------------- the state


def _release_dir(state: str, name: str) -> str:
    return storage.join(state, "releases", name)


def read_results(state: str) -> dict[str, dict]:
    """Recorded outcomes by release name (``result.json`` of every release in the state store)."""
    results = {}
    for info in storage.list_files(storage.join(state, "releases")):
        if storage.name(info.uri) == "result.json":
            result = read_state(info.uri, ("release",))
            if result is not None:
                results[result["release"]] = result
    return results


def read_state(uri: str, required: tuple[str, ...] = ()) -> dict | None:
    """A state file's JSON object; None if it is absent or corrupt (not JSON, not an object, a ``required``
    field missing or not a string). A corrupt file is logged and treated as absent: one damaged file must
    not stop every later poll."""
    try:
        value = jsonl.read_object(uri)
    except ValueError as exc:
        log.warning("%s: corrupt state file, treated as absent (%s)", uri, exc)
        return None
    missing = [k for k in required if value is not None and not isinstance(value.get(k), str)]
    if missing:
        log.warning("%s: corrupt state file, treated as absent (no %s)", uri, ", ".join(missing))
        return None
    return value


def _live_claim(uri: str, now: dt.datetime) -> dict | None:
    """The claim at ``uri`` if it is a submission in progress whose lease has not expired."""
    claim = read_state(uri, ("status", "expires_at"))
    try:
        live = (
            claim is not None
            and claim["status"] == "submitting"
            and dt.datetime.fromisoformat(claim["expires_at"]) > now
        )
    except (TypeError, ValueError):  # a date that does not parse, or one without a time zone
        log.warning("%s: corrupt state file, treated as absent (expires_at %r)", uri, claim["expires_at"])
        live = False
    return claim if live else None


def last_processed(results: dict[str, dict], locale: str) -> ReleaseName | None:
    """The newest release of the locale that was submitted (refused deltas do not count)."""
    done = [parse_release_name(name) for name, r in results.items() if r.get("status") == "submitted"]
    done = [n for n in done if n is not None and n.locale == locale]
    return max(done, default=None)


def _claim(folder: str, owner: str, lease: float) -> tuple[str | None, str]:
    """Take the next attempt in ``folder`` (claim-0001.json, claim-0002.json …) with a conditional create.

    Returns ``(claim_uri, "")``, or ``(None, why)`` when another watcher holds a live claim or won the race.
    """
    now = _now()
    claims = sorted(i.uri for i in storage.list_files(folder) if re.fullmatch(r"claim-\d+\.json", storage.name(i.uri)))
    attempt = 1
    if claims:
        last = _live_claim(claims[-1], now)
        if last:
            return None, f"in progress by {last.get('owner')} until {last['expires_at']}"
        attempt = int(storage.name(claims[-1])[len("claim-") : -len(".json")]) + 1
    uri = storage.join(folder, f"claim-{attempt:04d}.json")
    claim = {
        "attempt": attempt,
        "owner": owner,
        "status": "submitting",
        "started_at": _iso(now),
        "expires_at": _iso(now + dt.timedelta(seconds=lease)),
    }
    if not storage.create_exclusive(uri, _json(claim)):
        return None, "claimed by another watcher at the same moment"
    return uri, ""


def _update_claim(claim_uri: str, **fields: Any) -> None:
    claim = read_state(claim_uri) or {}
    claim.update(fields, updated_at=_iso(_now()))
    storage.write_bytes(claim_uri, _json(claim))


def _release_claim(claim_uri: str, error: str) -> None:
    """Mark an attempt failed: the next watcher run may start a new one at once."""
    _update_claim(claim_uri, status="failed", error=error)


@dataclass
class Claim:
    """One attempt at a release (or a download) that this watcher holds until ``expires``."""

    attempt: int
    expires: dt.datetime
    uri: str = ""  # a claim file (store claims)
    held: Any = None  # a habla.kubeflow.lease.Held (Lease claims)
    annotations: dict = dataclasses.field(default_factory=dict)


class _StoreClaims:
    """Claims as files created with a conditional write in the state store (S3 If-None-Match, local link)."""

    mode = "s3"

    def take(self, folder: str, owner: str, lease: float) -> tuple[Claim | None, str]:
        uri, why = _claim(folder, owner, lease)
        if uri is None:
            return None, why
        record = json.loads(storage.read_text(uri))
        return Claim(record["attempt"], dt.datetime.fromisoformat(record["expires_at"]), uri=uri), ""

    def still_ours(self, claim: Claim) -> bool:
        return _now() < claim.expires

    def finish(self, claim: Claim, status: str, **fields: Any) -> None:
        if status != "submitted":  # a submitted release is known by its result.json; its claim stays as it is
            _update_claim(claim.uri, status=status, **fields)

    def fail(self, claim: Claim, error: str) -> None:
        _release_claim(claim.uri, error)

    def drop(self, claim: Claim) -> None:
        storage.delete(claim.uri)


class _LeaseClaims:
    """Claims as Kubernetes Leases, one per release (or download) and state store: habla.kubeflow.lease."""

    mode = "lease"

    def __init__(self, state: str, namespace: str | None, api_client: Any) -> None:
        from habla.kubeflow.lease import LeaseClaims

        self.state = state
        self.leases = LeaseClaims(namespace, api_client)

    def take(self, folder: str, owner: str, lease: float) -> tuple[Claim | None, str]:
        from habla.kubeflow.lease import lease_name

        kind, name = folder.rstrip("/").split("/")[-2:]  # STATE/releases/<name>, STATE/downloads/<name>
        annotations = {"state": self.state, "release": name, "status": "submitting"}
        held, why = self.leases.acquire(lease_name(self.state, kind, name), owner, lease, annotations)
        if held is None:
            return None, why
        return Claim(held.transitions + 1, held.expires, held=held, annotations=annotations), ""

    def still_ours(self, claim: Claim) -> bool:
        renewed = self.leases.renew(claim.held, claim.annotations)
        if renewed is None:
            return False
        claim.held, claim.expires = renewed, renewed.expires
        return True

    def finish(self, claim: Claim, status: str, **fields: Any) -> None:
        self.leases.release(claim.held, {**claim.annotations, "status": status, **fields})

    def fail(self, claim: Claim, error: str) -> None:
        self.leases.release(claim.held, {**claim.annotations, "status": "failed", "error": error[:1000]})

    def drop(self, claim: Claim) -> None:
        """Give back a claim that found the work done: the Lease keeps the outcome its last holder wrote."""
        self.leases.release(claim.held, claim.held.previous or claim.annotations)


CLAIM_MODES = ("s3", "lease", "auto")


@dataclass
class _ClaimChooser:
    """Picks the claim store on first use (a poll with nothing to claim neither probes nor writes)."""

    state: str
    mode: str
    lease_namespace: str | None = None
    kube_client: Any = None
    chosen: Any = None

    def get(self) -> _StoreClaims | _LeaseClaims:
        if self.chosen is None:
            self.chosen = choose_claims(self.state, self.mode, self.lease_namespace, self.kube_client)
        return self.chosen


def choose_claims(state: str, mode: str, lease_namespace: str | None = None, kube_client: Any = None):
    """The claim store for ``--claims`` ``s3`` (the state store's conditional writes, refused unless the probe
    passes), ``lease`` (a Kubernetes Lease) or ``auto`` (s3 when the probe passes, else the Lease)."""
    if mode not in CLAIM_MODES:
        raise HablaError(f"--claims {mode!r}: expected one of {', '.join(CLAIM_MODES)}")
    if mode == "lease":
        return _LeaseClaims(state, lease_namespace, kube_client)
    probe = storage.probe_conditional_writes(state)
    if probe.ok:
        log.info("claims: conditional writes on %s (%s)", probe.store, probe.detail)
        return _StoreClaims()
    refusal = (
        f"the state store {probe.store} does not enforce conditional writes: {probe.detail}; two watchers could "
        "both submit a release"
    )
    if mode == "s3":
        raise HablaError(
            f"{refusal}: use --claims lease (a Kubernetes Lease, in a cluster) or a store that enforces them "
            "(docs/operations.md, 'Object stores')"
        )
    try:
        claims = _LeaseClaims(state, lease_namespace, kube_client)
    except HablaError as exc:
        raise HablaError(f"{refusal}, and --claims auto found no Kubernetes API for a Lease: {exc}") from None
    log.warning("%s; claiming through Kubernetes Leases in namespace %s instead", refusal, claims.leases.namespace)
    return claims


def _write_summary(state: str, locale: str) -> None:
    # Rebuilt from the result files (the source of truth) by every run, so concurrent writers converge.
    results = read_results(state)
    newest = last_processed(results, locale)
    ordered = sorted(results.values(), key=_release_order)
    summary = {
        "updated_at": _iso(_now()),
        "last_processed": {locale: newest.name if newest else None},
        "releases": ordered,
    }
    storage.write_bytes(storage.join(state, "summary.json"), _json(summary))


def _release_order(result: dict) -> tuple:
    parsed = parse_release_name(result["release"])
    return (0, parsed, "") if parsed else (1, None, result["release"])  # an odd name last, never compared


def _arrival_uri(state: str, name: str) -> str:
    return storage.join(state, "arrivals", f"{name}.json")


def archive_waiting(release: Release, state: str, record: bool = True) -> str | None:
    """None when ``release`` may be submitted; else why it is waiting (see the module doc).

    A folder is complete once its TSVs are there (find_releases). An archive needs a ``.sha256`` sidecar,
    or the same size and mtime/ETag as at the previous poll (recorded in ``STATE/arrivals/``, when
    ``record``) plus a readable end of archive; the end is read once per archive version (an incomplete one
    waits until it changes).
    """
    if not release.name.archive or storage.exists(release.uri + ".sha256"):
        return None
    try:
        stamp = storage.stamp(release.uri)
    except FileNotFoundError:
        return "gone since the inbox was listed"
    uri = _arrival_uri(state, release.name.name)
    seen = read_state(uri)
    if seen is None or seen.get("stamp") != stamp:
        if record:
            storage.write_bytes(uri, _json({"uri": release.uri, "stamp": stamp, "seen_at": _iso(_now())}))
        return f"{stamp['size']} bytes, new or still growing: submitted once it has not changed by the next poll"
    if seen.get("complete"):
        return None
    if isinstance(seen.get("incomplete"), str):  # this very version was read to its end before
        return f"not a complete archive: {seen['incomplete']}"
    problem = commonvoice.check_archive_end(release.uri)
    if record:
        verdict = {"incomplete": problem} if problem else {"complete": True}
        storage.write_bytes(uri, _json({**seen, **verdict, "checked_at": _iso(_now())}))
    return f"not a complete archive: {problem}" if problem else None


def _mark_complete(state: str, release_name: str, uri: str) -> None:
    """An archive this watcher downloaded itself (whole, atomically) needs no arrival check."""
    record = {"uri": uri, "stamp": storage.stamp(uri), "seen_at": _iso(_now()), "complete": True}
    storage.write_bytes(_arrival_uri(state, release_name), _json(record))


def _check_state(state: str, dry_run: bool) -> None:
    """Fail in one line on a missing bucket or an unwritable folder (a fresh local state may not exist yet)."""
    if storage.is_s3(state):
        storage.check_readable_root(state)
    elif not dry_run:
        storage.check_writable_root(state)


# ----------------------------------------------------------------------------------------- watching


@dataclass
class _Submitter:
    """Connects to KFP and compiles the training pipeline on first use (dry runs and quiet polls need neither)."""

    host: str | None
    namespace: str | None
    experiment: str
    workdir: str  # where the training pipeline is compiled
    compile_options: CompileOptions
    client: Any = None
    package: str | None = None  # a compiled training pipeline; None: compile habla's own on first use
    experiment_id: str | None = None

    def ready(self) -> None:
        from habla.kubeflow import kfp_api

        if self.client is None:
            self.client = kfp_api.connect(self.host, namespace=self.namespace)
        if self.package is None:
            self.package = compile_training_pipeline(self.workdir, self.compile_options)
        if self.experiment_id is None:
            self.experiment_id = kfp_api.ensure_experiment(self.client, self.experiment)

    def submit(self, run_name: str, params: dict) -> tuple[str, Any]:
        """("adopted", ref) if a run with this name exists already, else ("submitted", ref)."""
        from habla.kubeflow import kfp_api

        found = kfp_api.find_run(self.client, self.experiment_id, run_name)
        if found:
            return "adopted", found
        ref = kfp_api.submit_run(self.host, self.package, params, self.experiment, run_name, client=self.client)
        return "submitted", ref


def compile_training_pipeline(out_dir: str, options: CompileOptions) -> str:
    """Compile habla's training pipeline with ``options`` into ``out_dir``; its path."""
    from habla.pipelines import training_pipeline

    return training_pipeline.compile_pipeline(str(Path(out_dir, "training_pipeline.yaml")), options)


def run_name_for(release: ReleaseName) -> str:
    """The KFP run name of a release's training run (also how a retry finds a run that got through)."""
    return f"habla-{release.name}"


def watch(
    inbox: str,
    state: str,
    *,
    output_root: str | None = None,
    host: str | None = None,
    namespace: str | None = None,
    experiment: str = "habla",
    locale: str = "es",
    params: dict[str, Any] | None = None,
    dry_run: bool = False,
    lease_seconds: float = LEASE_SECONDS,
    mdc: bool = False,
    package: str | None = None,
    compile_options: CompileOptions | None = None,
    client: Any = None,
    claims: str = "auto",
    lease_namespace: str | None = None,
    kube_client: Any = None,
) -> list[Decision]:
    """Look at the inbox once and submit the training pipeline for every new release (see module doc).

    Each training run gets ``release_uri`` (the archive or folder), ``output_uri`` = ``output_root`` (the
    pipeline keeps datasets/, runs/<run>/ and the model registry models/ under it, so a new release's model
    competes with the best one so far), ``run_name`` = ``habla-<release>``, ``locale`` and ``params``.
    ``package`` is a compiled training pipeline to submit instead of compiling habla's own with
    ``compile_options`` (images, conversion fan-out; default: CompileOptions()). ``claims`` is how a release is
    claimed (:func:`choose_claims`: ``s3``, ``lease`` or ``auto``; Leases in ``lease_namespace`` through
    ``kube_client``, default: the pod's or kubeconfig's). Returns one decision per release seen.
    """
    params = dict(params or {})
    reserved = sorted({"release_uri", "output_uri", "locale", "run_name"} & set(params))
    if reserved:
        raise HablaError(f"--param {', '.join(reserved)}: set by the watcher for each release")
    if not dry_run and not output_root:
        raise HablaError("--output-root is required (where each release's run writes its outputs)")
    if claims not in CLAIM_MODES:
        raise HablaError(f"--claims {claims!r}: expected one of {', '.join(CLAIM_MODES)}")
    storage.check_readable_root(inbox)
    _check_state(state, dry_run)
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    chooser = _ClaimChooser(state, claims, lease_namespace, kube_client)
    decisions: list[Decision] = []
    results = read_results(state)
    newest_done = last_processed(results, locale)

    if mdc:
        try:
            decisions.append(_fetch_from_mdc(inbox, state, locale, newest_done, owner, dry_run, chooser))
        except HablaError as exc:  # the Data Collective being down must not hold up what is in the inbox
            decisions.append(Decision(f"mdc:{locale}", "failed", str(exc)))

    with tempfile.TemporaryDirectory(prefix="habla-watch-") as workdir:
        options = compile_options or CompileOptions()
        submitter = _Submitter(host, namespace, experiment, workdir, options, client=client, package=package)
        for release in find_releases(inbox, locale):
            name = release.name.name
            if name in results:
                decisions.append(Decision(name, "known", results[name].get("status", "")))
            elif newest_done is not None and release.name.version <= newest_done.version:
                decisions.append(Decision(name, "older", f"not newer than {newest_done.name}, processed already"))
            elif release.name.delta:
                decisions.append(_refuse_delta(release, state, dry_run))
            elif (why := archive_waiting(release, state, record=not dry_run)) is not None:
                decisions.append(Decision(name, "waiting", why))
            elif dry_run:
                decisions.append(Decision(name, "would-submit", release.uri))
            else:
                submitter.ready()  # before claiming: an unreachable KFP or a broken pipeline leaves no claims
                decisions.append(
                    _claim_and_submit(
                        release, state, submitter, owner, lease_seconds, output_root, locale, params, chooser.get()
                    )
                )
    if not dry_run:
        _write_summary(state, locale)
    return decisions


def _fetch_from_mdc(
    inbox: str,
    state: str,
    locale: str,
    newest_done: ReleaseName | None,
    owner: str,
    dry_run: bool,
    chooser: _ClaimChooser,
) -> Decision:
    """Ask the Data Collective for the newest release; download it into the inbox if it is new."""
    from habla.ops import mdc

    offer = mdc.newest_release(locale)
    if offer is None:
        return Decision(f"mdc:{locale}", "known", "the Data Collective lists no release for this locale")
    name = offer.name.name
    here = [r.name for r in find_releases(inbox, locale) if not r.name.delta]
    newest_here = max(here + ([newest_done] if newest_done else []), default=None)
    if newest_here is not None and offer.name.version <= newest_here.version:
        return Decision(name, "known", f"newest on the Data Collective; {newest_here.name} is here already")
    if dry_run:
        return Decision(name, "would-download", f"dataset {offer.dataset_id} into {inbox}")
    claims = chooser.get()
    claim, why = claims.take(storage.join(state, "downloads", name), owner, DOWNLOAD_LEASE_SECONDS)
    if claim is None:
        return Decision(name, "in-progress", f"download {why}")
    try:
        uri = mdc.download(offer, inbox)
    except HablaError as exc:
        claims.fail(claim, str(exc))
        raise
    claims.finish(claim, "downloaded", uri=uri)
    _mark_complete(state, name, uri)
    return Decision(name, "downloaded", uri)


def _refuse_delta(release: Release, state: str, dry_run: bool) -> Decision:
    name = release.name.name
    message = (
        f"delta releases are not supported yet: {name} holds only the clips and rows added since the previous "
        "release; merge it into that full release (or wait for the next full release) and put the result in "
        "the inbox"
    )
    if dry_run:
        return Decision(name, "would-refuse", message)
    record = {"release": name, "status": "refused", "reason": message, "uri": release.uri, "recorded_at": _iso(_now())}
    created = storage.create_exclusive(storage.join(_release_dir(state, name), "result.json"), _json(record))
    return Decision(name, "refused" if created else "known", message if created else "refused")


def _claim_and_submit(
    release: Release,
    state: str,
    submitter: _Submitter,
    owner: str,
    lease: float,
    output_root: str,
    locale: str,
    params: dict,
    claims: _StoreClaims | _LeaseClaims,
) -> Decision:
    name = release.name.name
    folder = _release_dir(state, name)
    claim, why = claims.take(folder, owner, lease)
    if claim is None:
        return Decision(name, "in-progress", why)
    result_uri = storage.join(folder, "result.json")
    if read_state(result_uri, ("release",)) is not None:  # finished by another watcher since this one read the results
        claims.drop(claim)
        return Decision(name, "known", "processed by another watcher meanwhile")
    arguments = {
        "release_uri": release.uri,
        "output_uri": output_root,
        "run_name": run_name_for(release.name),
        "locale": locale,
        **params,
    }
    try:
        if not claims.still_ours(claim):
            raise HablaError("the claim's lease expired before the submission started")
        action, ref = submitter.submit(run_name_for(release.name), arguments)
    except Exception as exc:
        message = one_line(exc, first_line=True)
        claims.fail(claim, message)
        if not isinstance(exc, HablaError):
            raise
        return Decision(name, "failed", message)
    record = {
        "release": name,
        "status": "submitted",
        "run_id": ref.run_id,
        "url": ref.url,
        "uri": release.uri,
        "output_uri": arguments["output_uri"],
        "submitted_at": _iso(_now()),
        "attempt": claim.attempt,
        "claims": claims.mode,
        "adopted": action == "adopted",
        "experiment": submitter.experiment,
    }
    if not storage.create_exclusive(result_uri, _json(record)):
        if read_state(result_uri, ("release",)) is None:  # a damaged file, not another watcher's result
            storage.write_bytes(result_uri, _json(record))
        else:
            log.warning("%s: a result was already recorded; keeping it", name)
    claims.finish(claim, "submitted", run_id=ref.run_id)
    return Decision(name, action, release.uri, ref.run_id, ref.url)
