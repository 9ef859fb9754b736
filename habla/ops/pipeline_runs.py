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
import importlib.util
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from habla.core import state, storage
from habla.core.errors import BAD_INPUT_DIR_ENV, BAD_INPUT_MARK, Fault, HablaError
from habla.core.layout import DatasetLayout, OutputLayout
from habla.core.settings import split_pair
from habla.data.options import BUNDLED_RELEASE
from habla.kubeflow.compile import CompileOptions
from habla.runs import record
from habla.runs.parameters import RunParameters, typed
from habla.speech.releases import release_label


def parse_settings(settings: list[str]) -> dict:
    """``key=value`` settings as pipeline arguments: parameters typed as habla.runs.parameters.RunParameters
    declares them, dotted config overrides appended to ``config_overrides``."""
    params: dict = {}
    overrides: list[str] = []
    for item in settings:
        key, value = split_pair(item, "a pipeline setting")
        if "." in key:
            overrides.append(item)
            continue
        params[key] = typed(key, value)
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

    The parameters start from run-local's defaults (RunParameters.local_defaults: CPU training in the pipeline,
    a small model, WAV), or with ``pipeline_defaults`` from the compiled pipeline's own defaults (what a cluster
    run gets: tar shards, fastconformer_ctc_bpe, the config's budget; ``launcher=local`` is still needed to
    train here). Prints one line per step (``quiet``: none). Returns ``{"run_dir", "metrics",
    "promotion", "reports", "steps"}``: the run's folder, its evaluation metrics, the promotion decision
    (run.json), the reports by name, and each step's status and duration.
    """
    from kfp import local

    from habla.pipelines.training_pipeline import build_pipeline

    pipeline = build_pipeline(CompileOptions())
    params = parse_settings(list(settings))
    run_name = run_name or time.strftime("local-%Y%m%d-%H%M%S")
    defaults = {} if pipeline_defaults else RunParameters.local_defaults()
    arguments = {**defaults, **({"config": config} if config else {}), **params}
    arguments.update(release_uri=release or BUNDLED_RELEASE, output_uri=storage.absolute(out), run_name=run_name)
    checked = RunParameters(**arguments)  # every parameter checked before any step runs
    check_training_config(checked.config, checked.config_overrides)  # before the data steps, not after them
    storage.check_writable_root(out)
    run = OutputLayout(out).run(run_name)
    resuming = None
    if storage.exists(run.record):  # a failed or interrupted run with this name resumes; any other is refused
        resuming = record.mark_resume(run.root, checked)
    if storage.is_s3(out):
        pipeline_root = tempfile.mkdtemp(prefix="habla-kfp-")
    else:
        pipeline_root = str(Path(out, "kfp-local").resolve())
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=pipeline_root, raise_on_error=False)
    log_dir = Path(run.logs) if not storage.is_s3(out) else Path(tempfile.mkdtemp(prefix="habla-logs-"))
    console = StepConsole(log_dir, quiet=quiet)
    if resuming is not None and not quiet:
        print(f"resuming run {run_name} ({resuming.get('state')}"
              + (f" at step {resuming['failed_step']}" if resuming.get("failed_step") else "")
              + "): finished data steps and training checkpoints are reused", flush=True)  # fmt: skip
    print_ = builtins.print
    try:
        with console.capturing(), _no_retry_on_bad_input():
            try:
                pipeline(**arguments)
            finally:  # kfp.local indents print() while a step runs; parallel steps can leave it indented
                builtins.print = print_
    except KeyboardInterrupt:
        record.finish(run.root, record.INTERRUPTED, failed_step=console.current or "")
        _upload_logs(out, log_dir, run)
        if not quiet:
            print(f"habla pipeline: run {run_name} interrupted; the same command resumes it", file=sys.stderr)
        raise
    _upload_logs(out, log_dir, run)
    if console.failed:  # any failed step fails the run, whatever it left behind
        step = console.failed[0]
        bad_input, why = step_failure(console.logs.get(step, log_dir / f"{step}.log"))
        record.finish(run.root, record.FAILED, failed_step=step, error=why, bad_input=bad_input)
        log_name = console.logs.get(step, log_dir / f"{step}.log").name
        message = f"the pipeline failed at step {step}: {why} (its log: {storage.join(run.logs, log_name)})"
        if not bad_input:
            message += "; the same command resumes the run"
        raise HablaError(message) if bad_input else Fault(message)
    metrics = state.read(run.eval.metrics, ("wer",))
    if metrics is None:
        record.finish(run.root, record.FAILED, failed_step="", error="no model was evaluated", bad_input=False)
        raise Fault(f"the pipeline finished without evaluating a model (the step logs: {run.logs}/)")
    record.finish(run.root, record.SUCCEEDED)
    held = state.load(run.record, what="run record")
    return {"run_dir": storage.absolute(run.root), "metrics": metrics, "promotion": held.get("promotion"),
            "reports": reports(out, run_name), "steps": console.steps}  # fmt: skip


def _upload_logs(out: str, log_dir: Path, run) -> None:
    if storage.is_s3(out):
        for path in sorted(log_dir.iterdir()):
            storage.upload_file(path, storage.join(run.logs, path.name))


@contextmanager
def _no_retry_on_bad_input():
    """kfp.local retries a failed step as its retry policy says; a step that ended on bad input (it left a file in
    ``$HABLA_BAD_INPUT_DIR``: habla.core.errors.pipeline_step) is not tried again: it would fail the same way.

    kfp.local reports only SUCCESS or FAILURE of an attempt, so its retry loop is driven here: each attempt runs
    with the retry policy cleared, and the policy (count, backoff, factor, maximum) is applied between attempts
    only to faults."""
    from kfp.local import status
    from kfp.local.orchestrator import task_executor

    run_once = task_executor.execute_single_task
    folder = tempfile.mkdtemp(prefix="habla-bad-input-")

    def execute(task_name, task_spec, *args, **kwargs):
        policy = task_spec.retry_policy
        retries = max(policy.max_retry_count, 0)
        first = policy.backoff_duration.seconds if policy.HasField("backoff_duration") else 0
        factor = policy.backoff_factor if policy.backoff_factor > 0 else 2.0  # kfp.local's own default
        longest = policy.backoff_max_duration.seconds if policy.HasField("backoff_max_duration") else 3600
        spec = type(task_spec)()
        spec.CopyFrom(task_spec)
        spec.ClearField("retry_policy")
        for attempt in range(retries + 1):
            before = set(os.listdir(folder))
            outputs, outcome = run_once(task_name, spec, *args, **kwargs)
            if outcome == status.Status.SUCCESS or attempt == retries or set(os.listdir(folder)) - before:
                return outputs, outcome
            delay = min(first * factor**attempt, longest)
            print(f"Task {task_name!r} failed (attempt {attempt + 1} of {retries + 1}): a fault; retrying in "
                  f"{delay:.0f} s", flush=True)  # fmt: skip
            time.sleep(delay)
        return outputs, outcome

    saved = os.environ.get(BAD_INPUT_DIR_ENV)
    os.environ[BAD_INPUT_DIR_ENV] = folder
    task_executor.execute_single_task = execute
    try:
        yield
    finally:
        task_executor.execute_single_task = run_once
        if saved is None:
            os.environ.pop(BAD_INPUT_DIR_ENV, None)
        else:
            os.environ[BAD_INPUT_DIR_ENV] = saved
        shutil.rmtree(folder, ignore_errors=True)


def check_training_config(config: str, overrides: str) -> None:
    """The training config and its overrides, checked as `habla train` will (a typo'd key gets "did you mean");
    HablaError in one line."""
    from habla.training import config as training_config

    training_config.load(config, overrides.split())


def _config_here(config: str) -> bool:
    """Whether a config can be checked on this machine: a bundled name, or a file here (not a path in the image)."""
    from habla.training import configs

    return configs.find(config) is not None or Path(config).is_file()


def reports(out: str, run_name: str) -> dict[str, str]:
    """Every report of a run that exists, by what it is: dataset report, evaluation, model card, logs."""
    output = OutputLayout(out)
    run = output.run(run_name)
    candidates = {}
    # the dataset the run was evaluated on: <dataset>/manifests/test.json
    manifest = (state.read(run.eval.metrics) or {}).get("manifest", "")
    dataset = DatasetLayout(manifest.rsplit("/", 2)[0]) if manifest else None
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
_LOSS = re.compile(r"\bloss ([0-9.]+(?:e[-+]?\d+)?)\b")  # habla train's progress lines (habla.training.callbacks)
_VAL_WER = re.compile(r"validation at step \d+: WER ([0-9.]+)")


_HABLA_ERROR = re.compile(r"habla [\w-]+: error: .*")
_BAD_INPUT_LINE = re.compile(r"habla [\w-]+: error: (.*) " + re.escape(BAD_INPUT_MARK))
_BAD_INPUT_ERRORS = {"HablaError", "Corrupt"}  # habla.core.errors.HablaError and its kinds


def step_failure(log: Path) -> tuple[bool, str]:
    """Why a step failed, from its log: ``(bad input, one line)``. A step that ended on a HablaError (the last
    traceback's exception) was given bad input (exit 2 for the run); anything else is a fault or a bug (exit 1)."""
    lines = log.read_text(encoding="utf-8", errors="replace").splitlines() if log.is_file() else []
    marked = [m[1] for line in lines if (m := _BAD_INPUT_LINE.search(line))]
    if marked:  # the step's own verdict (habla.core.errors.pipeline_step): bad input, exit 2
        return True, marked[-1]
    ended = None
    for k, line in enumerate(lines):
        if line.strip() == "Traceback (most recent call last):":
            indent = len(line) - len(line.lstrip())
            after = (x for x in lines[k + 1 :] if x.strip() and len(x) - len(x.lstrip()) <= indent)
            ended = next(after, None)
    if ended is not None:
        name, _, message = ended.strip().partition(": ")
        kind = name.rsplit(".", 1)[-1]
        return kind in _BAD_INPUT_ERRORS, message.strip() or kind
    why = _why(log) if log.is_file() else []
    return False, (why[-1] if why else "no log")


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
    LONG_STEP = 30.0  # seconds after which a step is long enough for progress lines (not on a terminal)

    def __init__(self, log_dir: Path, quiet: bool = False) -> None:
        self.log_dir = log_dir
        self.quiet = quiet
        self.steps: list[dict] = []
        self.failed: list[str] = []
        self._task: str | None = None
        self._started = 0.0
        self._last_progress = 0.0
        self._files: dict[str, object] = {}
        self._first: tuple[float, int] | None = None  # (time, done) of the step's first progress line: the ETA's base
        self._detail = ""  # the last training loss / validation WER the step printed
        self.logs: dict[str, Path] = {}  # each step's log file (a step run again, as a fan-out's, gets -2, -3 …)
        self._seen: dict[str, int] = {}  # runs of each step started one after another (a retry, a resume)
        self._running: dict[str, int] = {}  # runs of each step going on now (kfp.local runs ParallelFor at once)

    @property
    def current(self) -> str | None:
        """The step running now (None between steps)."""
        return self._task

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
        if self._task is None:
            return
        loss, wer = _LOSS.search(line), _VAL_WER.search(line)
        if loss or wer:
            self._detail = f"loss {loss[1]}" if loss else f"validation WER {wer[1]}"
        match = _PROGRESS.search(line)
        if not match:
            return
        done, total = int(match[1]), int(match[2])
        now = time.monotonic()
        elapsed = now - self._started
        if total <= 0 or done <= 0 or done > total:
            return
        text = f"  … {self._task}: {done}/{total} ({100 * done / total:.0f} %), {_duration(elapsed)}"
        # the rate since the first progress line: what came before it (imports, loading data) is not work done
        if self._first is None or done <= self._first[1]:
            self._first = (now, done) if self._first is None else self._first
        else:
            rate = (done - self._first[1]) / max(now - self._first[0], 1e-6)
            text += f", ETA {_duration((total - done) / rate)}"
        if self._detail:
            text += f", {self._detail}"
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
            self._first, self._detail = None, ""
            name = started[1]
            # Iterations of a fan-out running at once interleave their lines: they share one log file.
            if not self._running.get(name):
                count = self._seen[name] = self._seen.get(name, 0) + 1
                self.logs[name] = self.log_dir / (f"{name}.log" if count == 1 else f"{name}-{count}.log")
                previous = self._files.get(name)
                if previous is not None and count > 1:
                    previous.close()
                if count > 1 or previous is None:
                    self._files[name] = open(self.logs[name], "a", encoding="utf-8")
            self._running[name] = self._running.get(name, 0) + 1
            self._say(f"  … {started[1]}", live=True)
        if self._task is not None:
            self._files[self._task].write(line)
            if not (started or finished):
                self._progress(line)
        if finished:
            name, state = finished[1], finished[2]
            self._running[name] = max(0, self._running.get(name, 0) - 1)
            seconds = time.monotonic() - self._started
            self.steps.append({"step": name, "status": state, "seconds": round(seconds, 1)})
            mark = "✓" if state == "SUCCESS" else "✗"
            log_file = self.logs.get(name, self.log_dir / f"{name}.log")
            self._say(f"{mark} {name:<28} {state:<8} {_duration(seconds):>12}   log: {log_file}")
            if state != "SUCCESS":
                if name not in self.failed:
                    self.failed.append(name)
                self._files[name].flush()
                for text in _why(log_file):
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
    namespace: str | None = None,
    token_file: str | None = None,
):
    """Compile the pipeline with ``compile_options`` and submit one run of it, its steps running as
    ``service_account`` (default: kfp_api.PIPELINE_SERVICE_ACCOUNT); returns its RunRef."""
    from habla.kubeflow import kfp_api
    from habla.pipelines import training_pipeline

    options = compile_options or CompileOptions()
    params = parse_settings(list(settings))
    params.update(release_uri=release, output_uri=out)
    checked = RunParameters(**params)  # every parameter checked before anything is submitted
    if importlib.util.find_spec("omegaconf") is not None and _config_here(checked.config):
        check_training_config(checked.config, checked.config_overrides)  # not after the cluster's data steps
    run_name = run_name or f"habla-{release_label(release)}-{time.strftime('%Y%m%d-%H%M%S')}"
    with tempfile.TemporaryDirectory() as tmp:
        package = training_pipeline.compile_pipeline(str(Path(tmp, "habla-train.yaml")), options)
        account = kfp_api.PIPELINE_SERVICE_ACCOUNT if service_account is None else service_account
        return kfp_api.submit_run(host, package, params, experiment, run_name, service_account=account,
                                  namespace=namespace, token_file=token_file)  # fmt: skip
