#!/usr/bin/env bash
# Build and push habla's two images from the repository root:
#   REPO/habla-train:TAG  CUDA + PyTorch + NeMo (training pods, evaluation)   infra/Dockerfile.train
#   REPO/habla-prep:TAG   slim CPU, no torch (preparation, pipeline steps)    infra/Dockerfile.prep
#
# Usage: infra/build.sh REPO [TAG]          e.g. infra/build.sh ghcr.io/acme/habla
#   TAG      default: <version in pyproject.toml>-<git short sha> (a new tag per commit: never ":latest")
#   BUILDER  docker (docker buildx) or podman; default: whichever is installed, docker first
#   PUSH     1 (default) pushes; 0 only builds (docker: loads into the local engine)
#   PLATFORM target platform, default linux/amd64 (CUDA wheels are x86_64 / aarch64 only)
#   IMAGES   which to build, default "train prep"
#   DRY_RUN  1 prints the commands instead of running them
# Then pass the images to the pipeline (see docs/operators.md) -- pin them by the digests printed at the end.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2; exit 2; }
[[ $# -ge 1 && $# -le 2 && "$1" != -* ]] || usage
repo="${1%/}"
cd "$(dirname "$0")/.."

version="$(sed -n 's/^version *= *"\(.*\)"/\1/p' pyproject.toml | head -n1)"
sha="$(git rev-parse --short HEAD 2>/dev/null || echo nogit)"
tag="${2:-${version}-${sha}}"
push="${PUSH:-1}"
platform="${PLATFORM:-linux/amd64}"
images="${IMAGES:-train prep}"

builder="${BUILDER:-}"
if [[ -z "$builder" ]]; then
  if command -v docker >/dev/null 2>&1; then builder=docker
  elif command -v podman >/dev/null 2>&1; then builder=podman
  elif [[ "${DRY_RUN:-0}" == 1 ]]; then builder=docker
  else echo "build.sh: neither docker nor podman is installed" >&2; exit 2
  fi
fi

run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

for name in $images; do
  dockerfile="infra/Dockerfile.${name}"
  [[ -f "$dockerfile" ]] || { echo "build.sh: no $dockerfile" >&2; exit 2; }
  ref="${repo}/habla-${name}:${tag}"
  echo "== ${ref} (${dockerfile}, ${platform}, ${builder})" >&2
  case "$builder" in
    docker)
      if [[ "$push" == 1 ]]; then out=--push; else out=--load; fi
      run docker buildx build --platform "$platform" -f "$dockerfile" -t "$ref" "$out" .
      ;;
    podman)
      run podman build --platform "$platform" -f "$dockerfile" -t "$ref" .
      if [[ "$push" == 1 ]]; then run podman push "$ref"; fi
      ;;
    *) echo "build.sh: BUILDER must be docker or podman, got $builder" >&2; exit 2 ;;
  esac
  if [[ "$push" == 1 && "${DRY_RUN:-0}" != 1 ]]; then
    case "$builder" in
      docker) digest="$(docker buildx imagetools inspect "$ref" --format '{{json .Manifest.Digest}}' | tr -d '"')" ;;
      podman) digest="$(podman image inspect "$ref" --format '{{.Digest}}')" ;;
    esac
    echo "pushed ${repo}/habla-${name}@${digest}"
  fi
done
