"""``habla watch``: submit the training pipeline once for each new Common Voice release in an inbox.

How it decides
  * The complete releases of the locale in the inbox (habla.data.inbox) are taken by version (9.0 < 17.0 <
    25.0), never by upload time. Those newer than the last release processed for the locale are handled,
    oldest first; an older release that shows up late is ignored.
  * Delta releases (``-delta-``) hold only what changed since the previous release and are refused, once,
    with a message; the refusal is recorded so that later runs do not repeat it.

Exactly once, crash-safe (the state store is a local folder or ``s3://…``)
  ``STATE/releases/<release>/claim-0001.json``   the Nth attempt at submitting a release (habla.core.claims
                                                 .AttemptClaims, a conditional create): of two watchers
                                                 racing, one creates it and submits, the other skips. With
                                                 ``claims="lease"`` (or ``"auto"`` on a store whose
                                                 conditional writes fail the probe) the claim is a Kubernetes
                                                 Lease instead (habla.kubeflow.lease.choose_claims).
  ``STATE/releases/<release>/result.json``       written once the run exists: submitted (or refused), run id.
  ``STATE/summary.json``                         a summary of all results, rewritten after each run.
  ``STATE/arrivals/<release>.json``              an archive's size and mtime/ETag when first seen.
  A state file that is not valid JSON (or lacks its fields) is logged and treated as absent, never fatal.
  A claim carries a lease. A submission that fails marks its claim ``failed``: the next watcher run takes a
  new attempt (claim-0002 …). A watcher killed mid-way leaves its claim ``submitting``; once the lease has
  expired another attempt may start. Every attempt first looks for a run of the experiment with the release's
  run name (``habla-<release>``) and adopts it instead of submitting again, so a crash between "run created"
  and "result written" does not lead to a second run.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from habla.core import state as records
from habla.core import storage
from habla.core.claims import Claims
from habla.core.errors import Fault, HablaError, one_line
from habla.data.inbox import Release, archive_waiting, find_releases, mark_complete
from habla.kubeflow.lease import CLAIM_MODES, choose_claims
from habla.runs.parameters import RunParameters
from habla.speech.releases import ReleaseName, parse_release_name

log = logging.getLogger(__name__)

LEASE_SECONDS = 900  # how long a claim protects a submission in progress (compiling + 4 API calls)
DOWNLOAD_LEASE_SECONDS = 6 * 3600  # an MDC download of tens of GB
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


#: A compiled training pipeline (its path), or what compiles one into a folder and returns its path.
Package = str | Callable[[str], str]


# -------------------------------------------------------------------------------------- the state


def _release_dir(state: str, name: str) -> str:
    return storage.join(state, "releases", name)


#: A release's result while ``--resubmit`` submits it anew: names the run it replaces, never to be adopted.
RESUBMITTING = "resubmitting"


def read_results(state: str) -> dict[str, dict]:
    """Recorded outcomes by release name (``result.json`` of every release in the state store)."""
    results = {}
    for info in storage.list_files(storage.join(state, "releases")):
        if storage.name(info.uri) == "result.json":
            result = _result(info.uri)
            if result is not None:
                results[result["release"]] = result
    return results


def _result(uri: str) -> dict | None:
    return records.read(uri, {"release": str}, fallback="treated as absent")


@dataclass
class _ClaimChooser:
    """Picks the claims on first use (a poll with nothing to claim neither probes nor writes)."""

    state: str
    mode: str
    lease_namespace: str | None = None
    kube_client: Any = None
    chosen: Claims | None = None

    def get(self) -> Claims:
        if self.chosen is None:
            self.chosen = choose_claims(self.state, self.mode, self.lease_namespace, self.kube_client)
        return self.chosen


def last_processed(results: dict[str, dict], locale: str) -> ReleaseName | None:
    """The newest release of the locale that was submitted (refused deltas do not count)."""
    done = [parse_release_name(name) for name, r in results.items() if r.get("status") == "submitted"]
    done = [n for n in done if n is not None and n.locale == locale]
    return max(done, default=None)


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
    records.write(storage.join(state, "summary.json"), summary, indent=2)


def _release_order(result: dict) -> tuple:
    parsed = parse_release_name(result["release"])
    return (0, parsed, "") if parsed else (1, None, result["release"])  # an odd name last, never compared


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
    token_file: str | None
    experiment: str
    workdir: str  # where the training pipeline is compiled
    package: Package | None
    client: Any = None
    experiment_id: str | None = None

    def ready(self) -> None:
        from habla.kubeflow import kfp_api

        if self.client is None:
            self.client = kfp_api.connect(self.host, namespace=self.namespace, token_file=self.token_file)
        if self.package is None:
            raise HablaError("no training pipeline to submit: give a compiled package (--package)")
        if callable(self.package):
            self.package = self.package(self.workdir)
        if self.experiment_id is None:
            self.experiment_id = kfp_api.ensure_experiment(self.client, self.experiment)

    def submit(self, run_name: str, params: dict, *, adopt: bool = True, never: str | None = None) -> tuple[str, Any]:
        """("adopted", ref) if a run with this name exists already (and ``adopt``; the newest, unless it is the run
        ``never``), else ("submitted", ref)."""
        from habla.kubeflow import kfp_api

        found = kfp_api.find_run(self.client, self.experiment_id, run_name) if adopt else None
        if found and found.run_id != never:
            return "adopted", found
        ref = kfp_api.submit_run(self.host, self.package, params, self.experiment, run_name, client=self.client)
        return "submitted", ref


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
    package: Package | None = None,
    client: Any = None,
    claims: str = "auto",
    lease_namespace: str | None = None,
    kube_client: Any = None,
    token_file: str | None = None,
    resubmit: str | None = None,
) -> list[Decision]:
    """Look at the inbox once and submit the training pipeline for every new release (see module doc).

    Each training run gets ``release_uri`` (the archive or folder), ``output_uri`` = ``output_root`` (the
    pipeline keeps datasets/, runs/<run>/ and the model registry models/ under it, so a new release's model
    competes with the best one so far), ``run_name`` = ``habla-<release>``, ``locale`` and ``params``.
    ``package`` is the training pipeline: a compiled package, or a function compiling one into a folder (called
    once, when the first release is submitted; habla.pipelines.training_pipeline.compile_into). ``claims`` is how
    a release is claimed (habla.kubeflow.lease.choose_claims: ``s3``, ``lease`` or ``auto``; Leases in
    ``lease_namespace`` through ``kube_client``, default: the pod's or kubeconfig's). Returns one decision per
    release seen.
    """
    params = dict(params or {})
    RunParameters.for_each_release(params, output_root or "", locale)  # nothing is claimed with bad parameters
    if resubmit and (dry_run or mdc):
        raise HablaError("--resubmit submits one release anew: not with --dry-run or --mdc")
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

    if mdc:  # whatever the Data Collective does, one decision: the inbox is looked at all the same
        decisions.append(_fetch_from_mdc(inbox, state, locale, newest_done, owner, dry_run, chooser))

    with tempfile.TemporaryDirectory(prefix="habla-watch-") as workdir:
        submitter = _Submitter(host, namespace, token_file, experiment, workdir, package, client=client)
        releases = find_releases(inbox, locale)
        if resubmit:
            releases = [r for r in releases if r.name.name == resubmit]
            if not releases:
                raise HablaError(f"--resubmit {resubmit}: no such release of locale {locale} in {inbox}")
            submitter.ready()
            claims = chooser.get()
            decisions.append(
                _claim_and_submit(
                    releases[0],
                    state,
                    submitter,
                    owner,
                    lease_seconds,
                    output_root or "",
                    locale,
                    params,
                    claims,
                    anew=True,
                )  # fmt: skip
            )
            releases = []
        for release in releases:
            name = release.name.name
            if name in results and results[name].get("status") != RESUBMITTING:
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
    """Ask the Data Collective for the newest release; download it into the inbox if it is new.

    Any failure (an unreachable or broken service, nonsense, a download cut short) is one ``failed`` decision
    with a one-line detail, never an exception: the watcher goes on with the inbox, and the download's claim is
    marked failed so that the next poll tries again (resuming what arrived).
    """
    from habla.data import downloads, mdc

    claim = None
    try:
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
        uri = downloads.download(offer, inbox)
    except Exception as exc:  # the Data Collective must not hold up what is in the inbox
        detail = one_line(exc, with_type=not isinstance(exc, (HablaError, Fault)))
        log.warning("mdc:%s: %s", locale, detail)
        if claim is not None:
            claims.fail(claim, detail)
        return Decision(f"mdc:{locale}", "failed", detail)
    claims.finish(claim, "downloaded", uri=uri)
    mark_complete(state, name, uri)
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
    created = records.create(storage.join(_release_dir(state, name), "result.json"), record)
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
    claims: Claims,
    anew: bool = False,
) -> Decision:
    """Claim the release and submit its run (or adopt the run an earlier attempt made). ``anew`` (``--resubmit``):
    the recorded result is copied aside (``result-<time>.json``) and replaced by a ``resubmitting`` one naming the
    run it replaces, then a new run is submitted into a run folder of its own (``habla-<release>-<n>``: the
    earlier run's folder is that run's). Until the new run's result is written, later polls submit it again and
    adopt a run of that name only if it is not the replaced one (a crash after the new run was created)."""
    name = release.name.name
    folder = _release_dir(state, name)
    claim, why = claims.take(folder, owner, lease)
    if claim is None:
        return Decision(name, "in-progress", why)
    result_uri = storage.join(folder, "result.json")
    earlier = _result(result_uri)
    resubmitting = earlier is not None and earlier.get("status") == RESUBMITTING
    if earlier is not None and not anew and not resubmitting:  # finished by another watcher since this one looked
        claims.drop(claim)
        return Decision(name, "known", "processed by another watcher meanwhile")
    display = run_name_for(release.name)
    folder_name = display
    replaced = earlier.get("replaces") if resubmitting else None
    try:
        if (anew and earlier is not None) or resubmitting:
            if not resubmitting:
                stamp = _now().strftime("%Y%m%dT%H%M%SZ")
                records.write(storage.join(folder, f"result-{stamp}.json"), earlier, indent=2)
                replaced = earlier.get("run_id")
            records.write(result_uri, {"release": name, "status": RESUBMITTING, "replaces": replaced}, indent=2)
        if anew or resubmitting:
            from habla.kubeflow import kfp_api

            runs = kfp_api.count_runs(submitter.client, submitter.experiment_id, display)
            folder_name = f"{display}-{runs + 1}" if runs else display
        arguments = {"release_uri": release.uri, "output_uri": output_root, "run_name": folder_name, "locale": locale,
                     **params}  # fmt: skip
        if not claims.still_ours(claim):
            raise HablaError("the claim's lease expired before the submission started")
        action, ref = submitter.submit(display, arguments, adopt=not anew or replaced is not None, never=replaced)
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
        **({"run_name": arguments["run_name"]} if action == "submitted" else {}),  # the run folder
        "submitted_at": _iso(_now()),
        "attempt": claim.attempt,
        "claims": claims.mode,
        "adopted": action == "adopted",
        "experiment": submitter.experiment,
    }
    if anew or resubmitting:
        records.write(result_uri, record, indent=2)  # the new run's result replaces the resubmitting one
    elif not records.create(result_uri, record):
        if _result(result_uri) is None:  # a damaged file, not another watcher's result
            records.write(result_uri, record, indent=2)
        else:
            log.warning("%s: a result was already recorded; keeping it", name)
    claims.finish(claim, "submitted", run_id=ref.run_id)
    return Decision(name, action, release.uri, ref.run_id, ref.url)
