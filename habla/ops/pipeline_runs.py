"""Run the training pipeline: here, through ``kfp.local`` (``habla pipeline run-local``), or on a Kubeflow
Pipelines endpoint (``habla pipeline submit``).

Settings are ``key=value`` strings: a key without a dot is a pipeline parameter (``num_shards=4``), typed
by the pipeline's signature; a dotted key is a training config override (``trainer.max_steps=300``),
appended to the ``config_overrides`` parameter.

``run-local`` keeps the console to one line per step (:class:`StepConsole`): everything the steps print
(KFP's executor input and warnings, NeMo's and Lightning's logs) goes to ``runs/<run>/logs/`` instead, one
file per step plus ``pipeline.log`` with all of it, by redirecting this process's stdout and stderr (the
steps are its subprocesses) into a pipe that a thread reads.
"""

from __future__ import annotations

import builtins
import inspect
import json
import os
import re
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from habla.core import storage
from habla.core.errors import HablaError
from habla.core.layout import DatasetLayout, OutputLayout
from habla.core.settings import split_pair
from habla.data.commonvoice import release_label
from habla.data.options import BUNDLED_RELEASE
from habla.kubeflow.compile import CompileOptions

# What run-local changes from the cluster defaults: CPU training inside the pipeline, a small model.
LOCAL_DEFAULTS = {
    "launcher": "local",
    "gpus_per_node": "0",
    "nodes": 1,
    "num_shards": 2,
    "workers_per_shard": os.cpu_count() or 1,
    "audio_format": "wav",
    "config": "tiny_ctc_char",
}


def parse_settings(settings: list[str], pipeline_func) -> dict:
    """``key=value`` settings as pipeline arguments: parameters typed by the pipeline's signature, dotted
    config overrides appended to ``config_overrides``."""
    known = inspect.signature(pipeline_func.pipeline_func).parameters
    params: dict = {}
    overrides: list[str] = []
    for item in settings:
        key, value = split_pair(item, "a pipeline setting")
        if "." in key:
            overrides.append(item)
            continue
        if key not in known:
            raise HablaError(f"unknown pipeline parameter {key!r} (known: {', '.join(sorted(known))})")
        kind = known[key].annotation
        kind = {"int": int, "float": float, "str": str}.get(kind, kind) if isinstance(kind, str) else kind
        try:
            params[key] = kind(value) if kind in (int, float) else value
        except ValueError:
            raise HablaError(f"pipeline parameter {key} needs a {kind.__name__}, got {value!r}") from None
    if overrides:
        params["config_overrides"] = " ".join(filter(None, [params.get("config_overrides", ""), *overrides]))
    return params


def run_local(
    out: str,
    settings: list[str] = (),
    *,
    release: str | None = None,
    config: str | None = None,
    run_name: str | None = None,
    pipeline_defaults: bool = False,
    quiet: bool = False,
) -> dict:
    """Run the whole pipeline here through ``kfp.local`` (each step a subprocess of this Python).

    The parameters start from LOCAL_DEFAULTS, or with ``pipeline_defaults`` from the compiled pipeline's own
    defaults (what a cluster run gets: tar shards, fastconformer_ctc_bpe, the config's budget; ``launcher=local``
    is still needed to train here). Prints one line per step (``quiet``: none). Returns ``{"run_dir", "metrics",
    "promotion", "reports", "steps"}``: the run's folder, its evaluation metrics, the promotion decision
    (run.json), the reports by name, and each step's status and duration.
    """
    from kfp import local

    from habla.pipelines.training_pipeline import build_pipeline

    pipeline = build_pipeline(CompileOptions())
    params = parse_settings(list(settings), pipeline)
    run_name = run_name or time.strftime("local-%Y%m%d-%H%M%S")
    arguments = {**({} if pipeline_defaults else LOCAL_DEFAULTS), **({"config": config} if config else {}), **params}
    arguments.update(release_uri=release or BUNDLED_RELEASE, output_uri=storage.absolute(out), run_name=run_name)
    storage.check_writable_root(out)
    if storage.exists(OutputLayout(out).run(run_name).record):  # start_run would refuse it after the data steps
        raise HablaError(f"{OutputLayout(out).run(run_name).root} belongs to an earlier run: choose another --run-name")
    if storage.is_s3(out):
        pipeline_root = tempfile.mkdtemp(prefix="habla-kfp-")
    else:
        pipeline_root = str(Path(out, "kfp-local").resolve())
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=pipeline_root, raise_on_error=False)
    run = OutputLayout(out).run(run_name)
    log_dir = Path(run.logs) if not storage.is_s3(out) else Path(tempfile.mkdtemp(prefix="habla-logs-"))
    console = StepConsole(log_dir, quiet=quiet)
    print_ = builtins.print
    with console.capturing():
        try:
            pipeline(**arguments)
        finally:  # kfp.local indents print() while a step runs; parallel steps can leave it indented
            builtins.print = print_
    if storage.is_s3(out):
        for path in sorted(log_dir.iterdir()):
            storage.upload_file(path, storage.join(run.logs, path.name))
    try:
        metrics = json.loads(storage.read_text(run.eval.metrics))
    except FileNotFoundError:
        failed = ", ".join(console.failed) or "a step"
        raise HablaError(f"the pipeline did not finish: {failed} failed (its log: {run.logs}/)") from None
    record = json.loads(storage.read_text(run.record))
    return {"run_dir": storage.absolute(run.root), "metrics": metrics, "promotion": record.get("promotion"),
            "reports": reports(out, run_name), "steps": console.steps}  # fmt: skip


def reports(out: str, run_name: str) -> dict[str, str]:
    """Every report of a run that exists, by what it is: dataset report, evaluation, model card, logs."""
    output = OutputLayout(out)
    run = output.run(run_name)
    candidates = {}
    try:  # the dataset the run was evaluated on: <dataset>/manifests/test.json
        manifest = json.loads(storage.read_text(run.eval.metrics)).get("manifest", "")
        dataset = DatasetLayout(manifest.rsplit("/", 2)[0]) if manifest else None
    except FileNotFoundError:
        dataset = None
    if dataset is not None:
        candidates.update({"dataset report": dataset.report_md, "dataset plot": dataset.report_png})
    candidates.update({
        "evaluation report": run.eval.report,
        "WER by group plot": run.eval.plot,
        "predictions (NeMo manifest)": run.eval.predictions,
        "run record": run.record,
        "model card": output.package(run_name).card,
        "ONNX export": output.package(run_name).onnx,
        "step logs": run.logs,
    })  # fmt: skip
    return {what: uri for what, uri in candidates.items() if storage.exists(uri)}


# ------------------------------------------------------------------------------------------------ console

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STARTED = re.compile(r"Executing task '([^']+)'")
_FINISHED = re.compile(r"Task '([^']+)' finished with status (\w+)")
_SKIPPED = re.compile(r"Skipping (?:conditional )?task '?([\w.-]+)'?")
_PROGRESS = re.compile(r"\b(?:step )?(\d+)/(\d+)\b")


_HABLA_ERROR = re.compile(r"habla [\w-]+: error: .*")


def _why(log: Path, lines: int = 6) -> list[str]:
    """What to show of a failed step's log: habla's own one-line errors if it printed any, else its last lines."""
    text = log.read_text(encoding="utf-8", errors="replace").splitlines()
    errors = list(dict.fromkeys(m[0] for line in text if (m := _HABLA_ERROR.search(line))))
    return errors[-3:] if errors else [line.strip() for line in text[-lines:]]


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds // 60:.0f} min {seconds % 60:02.0f} s"


class StepConsole:
    """One console line per pipeline step; the steps' full output in files (see the module doc)."""

    PROGRESS_EVERY = 30.0  # seconds between progress lines of a long step when the console is not a terminal
    LONG_STEP = 60.0  # seconds after which a step is long enough for progress lines (not on a terminal)

    def __init__(self, log_dir: Path, quiet: bool = False) -> None:
        self.log_dir = log_dir
        self.quiet = quiet
        self.steps: list[dict] = []
        self.failed: list[str] = []
        self._task: str | None = None
        self._started = 0.0
        self._last_progress = 0.0
        self._files: dict[str, object] = {}

    # What the user sees.
    def _say(self, text: str, live: bool = False) -> None:
        if self.quiet:
            return
        if self._tty:
            self._out.write("\r\x1b[K" + text + ("" if live else "\n"))
        elif not live:
            self._out.write(text + "\n")
        self._out.flush()

    def _progress(self, line: str) -> None:
        match = _PROGRESS.search(line)
        if not match or self._task is None:
            return
        done, total = int(match[1]), int(match[2])
        elapsed = time.monotonic() - self._started
        if total <= 0 or done <= 0 or done > total:
            return
        eta = elapsed * (total - done) / done
        text = f"  … {self._task}: {done}/{total} ({100 * done / total:.0f} %), {_duration(elapsed)}"
        text += f", ETA {_duration(eta)}"
        now = time.monotonic()
        if self._tty:
            self._say(text, live=True)
        elif elapsed > self.LONG_STEP and now - self._last_progress > self.PROGRESS_EVERY:
            self._last_progress = now
            self._say(text)

    def _line(self, raw: str) -> None:
        line = _ANSI.sub("", raw)
        self._files["pipeline"].write(line)
        started, finished, skipped = _STARTED.search(line), _FINISHED.search(line), _SKIPPED.search(line)
        if started:
            self._task, self._started, self._last_progress = started[1], time.monotonic(), time.monotonic()
            if started[1] not in self._files:
                self._files[started[1]] = open(self.log_dir / f"{started[1]}.log", "a", encoding="utf-8")
            self._say(f"  … {started[1]}", live=True)
        if self._task is not None:
            self._files[self._task].write(line)
            if not (started or finished):
                self._progress(line)
        if finished:
            name, state = finished[1], finished[2]
            seconds = time.monotonic() - self._started
            self.steps.append({"step": name, "status": state, "seconds": round(seconds, 1)})
            mark = "✓" if state == "SUCCESS" else "✗"
            self._say(f"{mark} {name:<28} {state:<8} {_duration(seconds):>12}   log: {self.log_dir / name}.log")
            if state != "SUCCESS":
                if name not in self.failed:
                    self.failed.append(name)
                self._files[name].flush()
                for text in _why(self.log_dir / f"{name}.log"):
                    self._say(f"    | {text}")
            self._task = None
        elif skipped and self._task is None:  # a branch not taken (its KFP name, condition-N, says little)
            self.steps.append({"step": skipped[1], "status": "SKIPPED", "seconds": 0.0})

    @contextmanager
    def capturing(self):
        """Send this process's stdout/stderr (and so its subprocesses') through :meth:`_line` meanwhile."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._files["pipeline"] = open(self.log_dir / "pipeline.log", "a", encoding="utf-8")
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        self._out = os.fdopen(os.dup(saved[0]), "w", encoding="utf-8", errors="replace")
        self._tty = self._out.isatty()
        read_end, write_end = os.pipe()
        reader = threading.Thread(target=self._read, args=(read_end,), daemon=True)
        reader.start()
        os.dup2(write_end, 1)
        os.dup2(write_end, 2)
        os.close(write_end)
        try:
            yield self
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            reader.join(timeout=30)
            for f in self._files.values():
                f.close()
            self._out.close()

    def _read(self, fd: int) -> None:
        with os.fdopen(fd, "r", encoding="utf-8", errors="replace") as pipe:
            for raw in pipe:
                try:
                    self._line(raw)
                except Exception:  # noqa: BLE001 - the console must never stop the pipeline
                    pass


def submit(
    host: str,
    release: str,
    out: str,
    settings: list[str] = (),
    *,
    experiment: str = "habla",
    run_name: str | None = None,
    compile_options: CompileOptions | None = None,
    service_account: str | None = None,
):
    """Compile the pipeline with ``compile_options`` and submit one run of it, its steps running as
    ``service_account`` (default: kfp_api.PIPELINE_SERVICE_ACCOUNT); returns its RunRef."""
    from habla.kubeflow import kfp_api
    from habla.pipelines import training_pipeline

    options = compile_options or CompileOptions()
    params = parse_settings(list(settings), training_pipeline.build_pipeline(options))
    params.update(release_uri=release, output_uri=out)
    run_name = run_name or f"habla-{release_label(release)}-{time.strftime('%Y%m%d-%H%M%S')}"
    with tempfile.TemporaryDirectory() as tmp:
        package = training_pipeline.compile_pipeline(str(Path(tmp, "habla-train.yaml")), options)
        account = kfp_api.PIPELINE_SERVICE_ACCOUNT if service_account is None else service_account
        return kfp_api.submit_run(host, package, params, experiment, run_name, service_account=account)
