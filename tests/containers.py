"""Real images for the tests: habla-prep and habla-train built from infra/ with rootful podman
(infra/podman/build-local.sh), podman's Docker-compatible API for ``kfp.local.DockerRunner``, and the one
adapter kfp's runner needs on podman 4.3 (:func:`keep_containers_until_waited`).

Container tests carry the ``containers`` mark. Without podman (a laptop) they are skipped with a message
saying how to run them; with ``HABLA_REQUIRE_CONTAINERS=1`` (set by .ci/run) a missing podman fails them,
and the session fails unless every one of them ran and none was skipped (tests/conftest.py).
"""

from __future__ import annotations

import builtins
import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import stop_process

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "infra" / "podman" / "build-local.sh"
CONTAINERS_CONF = ROOT / "infra" / "podman" / "containers.conf"
REQUIRE = "HABLA_REQUIRE_CONTAINERS"
# Images of this checkout only: sessions of two checkouts on one machine never run each other's images.
TAG = "test-" + hashlib.sha256(str(ROOT).encode()).hexdigest()[:10]
HOW_TO_RUN = (
    "to run them: as root, apt-get install -y podman runc debootstrap, then pytest -m containers "
    "(.ci/run does this and sets HABLA_REQUIRE_CONTAINERS=1, which fails instead of skipping)"
)
CONTAINER_UID = 1000  # the images' USER (infra/Dockerfile.*)


def required() -> bool:
    return os.environ.get(REQUIRE) == "1"


def env() -> dict[str, str]:
    """The environment of every podman command here: the project's podman settings (never /etc's)."""
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


def why_unavailable() -> str | None:
    """Why podman cannot build and run images here, or None when it can."""
    for tool in ("podman", "runc", "debootstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if os.geteuid() != 0:
        return "rootful podman needs root"
    probe = subprocess.run(["podman", "info", "--format", "{{.Host.OCIRuntime.Name}}"], env=env(),
                           capture_output=True, text=True, check=False, timeout=120)  # fmt: skip
    if probe.returncode != 0:
        return f"podman info failed: {probe.stderr.strip()[-300:]}"
    return None


def need_podman() -> None:
    """Skip (or, under HABLA_REQUIRE_CONTAINERS=1, fail) when podman is not usable here."""
    reason = why_unavailable()
    if reason is None:
        return
    if required():
        pytest.fail(f"container tests are required ({REQUIRE}=1) but {reason}", pytrace=False)
    pytest.skip(f"container tests skipped: {reason}; {HOW_TO_RUN}")


def podman(*args: str, timeout: float = 600, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(["podman", *args], env=env(), capture_output=True, text=True, timeout=timeout,
                            check=False, **kwargs)  # fmt: skip
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


@dataclass(frozen=True)
class Built:
    image: str
    seconds: float  # how long the build took (a layer-cache hit is quick)
    size_mb: float


def build(target: str, log_dir: Path) -> Built:
    """Build ``prep`` or ``train`` (and the base image, once) with infra/podman/build-local.sh."""
    need_podman()
    log = log_dir / f"build-{target}.log"
    started = time.monotonic()
    with log.open("w") as out:
        result = subprocess.run([str(BUILD), target], env={**env(), "TAG": TAG}, stdout=out,
                                stderr=subprocess.STDOUT, timeout=3600, check=False)  # fmt: skip
    if result.returncode != 0:
        pytest.fail(f"{BUILD.relative_to(ROOT)} {target} failed:\n{log.read_text()[-4000:]}", pytrace=False)
    image = f"localhost/habla-{target}:{TAG}"
    size = int(podman("image", "inspect", "--format", "{{.Size}}", image).stdout.strip())
    return Built(image, time.monotonic() - started, size / 1e6)


def run_in(image: str, *command: str, volumes: dict[Path, str] | None = None, timeout: float = 900,
           workdir: str | None = None) -> subprocess.CompletedProcess:  # fmt: skip
    """``podman run --rm`` as the image's own user, with host folders mounted (made writable for it)."""
    args = ["run", "--rm"]
    for host, inside in (volumes or {}).items():
        args += ["-v", f"{host}:{inside}"]
    if workdir:
        args += ["-w", workdir]
    return podman(*args, image, *command, timeout=timeout, check=False)


def shared_folder(path: Path) -> Path:
    """A host folder the images' non-root user may write into (world-writable, sticky, like /tmp)."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o1777)
    return path


# ------------------------------------------------------------------------- podman's Docker-compatible API


@contextmanager
def docker_api(folder: Path) -> Iterator[str]:
    """``podman system service`` on a private socket; yields its ``DOCKER_HOST`` URL."""
    socket, log_path = folder / "podman.sock", folder / "podman-service.log"
    log = log_path.open("w")
    proc = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{socket}"], env=env(),
                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not socket.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"podman system service did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.2)
        yield f"unix://{socket}"
    finally:
        stop_process(proc, grace=30)
        log.close()


@dataclass
class StartedContainers:
    """What :func:`keep_containers_until_waited` saw: (image, container id) of every container started."""

    started: list[tuple[str, str]] = field(default_factory=list)


@contextmanager
def keep_containers_until_waited(monkeypatch) -> Iterator[StartedContainers]:
    """The adapter kfp.local's DockerRunner needs on podman 4.3.

    The runner starts each task with ``containers.run(..., auto_remove=True)``, streams its log, then asks for
    the exit code with ``container.wait()``. The container may be gone by then, or even by the time docker-py
    inspects it right after starting it, and podman 4.3's API answers 500 (kfp raises ``APIError``), 404
    (kfp assumes exit code 0) or 200 with ``StatusCode: 0`` and an error message. Measured here: a step that
    exits 3 was reported as a success in 2 of 4 runs and as an APIError in the others. Here every container
    is started with ``auto_remove=False`` instead, so ``wait`` always reports the real exit code, and the
    containers are removed when the block ends. kfp's runner itself is unchanged; only docker-py's
    ``ContainerCollection.run`` is wrapped, for this block.

    It also puts back ``builtins.print``: kfp.local indents task logs by swapping it
    (``kfp.local.logging_utils.indented_print``), and tasks of a ParallelFor running in threads can leave a
    swapped one behind, which then breaks later code in the same process (numba, under NeMo, cannot type it).
    """
    from docker.models.containers import ContainerCollection

    seen = StartedContainers()
    real_run, real_print = ContainerCollection.run, builtins.print

    def run_kept(self, image, command=None, **kwargs):
        kwargs["auto_remove"] = False
        container = real_run(self, image, command, **kwargs)
        seen.started.append((image, container.id))
        return container

    monkeypatch.setattr(ContainerCollection, "run", run_kept)
    try:
        yield seen
    finally:
        monkeypatch.setattr(ContainerCollection, "run", real_run)
        builtins.print = real_print
        ids = [cid for _, cid in seen.started]
        if ids:
            podman("rm", "--force", "--ignore", *ids, check=False)


@contextmanager
def kfp_docker_runner(pipeline_root: Path, scratch: Path) -> Iterator[StartedContainers]:
    """``kfp.local`` with its DockerRunner against podman's Docker-compatible API (a socket under ``scratch``),
    through :func:`keep_containers_until_waited`; yields what it started. Undone when the block ends."""
    from kfp import local

    monkeypatch = pytest.MonkeyPatch()
    try:
        with docker_api(scratch) as docker_host, keep_containers_until_waited(monkeypatch) as seen:
            monkeypatch.setenv("DOCKER_HOST", docker_host)
            local.init(runner=local.DockerRunner(), pipeline_root=str(pipeline_root), raise_on_error=True)
            yield seen
    finally:
        monkeypatch.undo()
