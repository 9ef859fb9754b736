#!/usr/bin/env bash
# Build habla's images here with rootful podman and no container registry: the Dockerfiles in infra/ unchanged,
# only BASE_IMAGE overridden (and, for habla-train, pip pointed at a CPU torch wheel on local disk).
#
# Usage: infra/podman/build-local.sh [base] [prep] [train]     (default: all three; run as root)
#   base   localhost/habla-python:3.11-bookworm: debootstrap --variant=minbase bookworm, podman import, then
#          infra/podman/Containerfile.python: bookworm plus a source-built CPython 3.11 in /usr/local, like
#          python:3.11-slim-bookworm (the CPython of $PYTHON, see there why not Debian's). Built once.
#   prep   localhost/habla-prep:$TAG  from infra/Dockerfile.prep
#   train  localhost/habla-train:$TAG from infra/Dockerfile.train, torch from the CPU wheel in $WHEELS
# Environment:
#   TAG              image tag (default: local)
#   WHEELS           folder holding torch-<TORCH_VERSION>+cpu-*.whl (default: /opt/wheels; get one with
#                    pip download torch==2.13.0 --no-deps --index-url https://download.pytorch.org/whl/cpu -d DIR)
#   PYTHON           a source-built CPython 3.11 (>= 3.11.4) to put in the base (default: python3)
#   MIRROR           Debian mirror for debootstrap (default: the URIs: of /etc/apt/sources.list.d/debian.sources)
#   CONTAINERS_CONF  podman settings (default: infra/podman/containers.conf, see the comments there)
# Needs: apt-get install podman runc debootstrap. Prints each image's build time and size.
set -euo pipefail
cd "$(dirname "$0")/../.."

export CONTAINERS_CONF="${CONTAINERS_CONF:-$PWD/infra/podman/containers.conf}"
tag="${TAG:-local}"
wheels="${WHEELS:-/opt/wheels}"
debian_image=localhost/debian:bookworm-minbase
python_image=localhost/habla-python:3.11-bookworm
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(base prep train)
# One build at a time on this machine: a second caller waits, then finds the layers in podman's cache.
exec 9>"${TMPDIR:-/tmp}/habla-build-local.lock"
flock 9

log() { echo "build-local: $*" >&2; }
die() { log "$*"; exit 2; }
size() { podman image inspect --format '{{.Size}}' "$1" | awk '{ printf "%.0f MB", $1 / 1e6 }'; }
timed() {  # timed NAME IMAGE COMMAND...: run the build, then say how long it took and how big the image is
  local name="$1" image="$2" start=$SECONDS
  shift 2
  "$@"
  log "$name: $image built in $((SECONDS - start)) s, $(size "$image")"
}

mirror() {
  if [[ -n "${MIRROR:-}" ]]; then echo "$MIRROR"; return; fi
  local uri
  uri="$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)"
  echo "${uri:-http://deb.debian.org/debian}"
}

debootstrap_import() (  # a subshell: its EXIT trap removes the root file system whatever happens
  local root
  root="$(mktemp -d /var/tmp/habla-debootstrap.XXXXXX)"
  trap 'rm -rf "$root" "$root.log"' EXIT
  debootstrap --variant=minbase bookworm "$root" "$(mirror)" >"$root.log" 2>&1 || { tail -20 "$root.log" >&2; exit 1; }
  tar -C "$root" -c . | podman import --quiet - "$debian_image" >/dev/null
)

build_base() {
  if podman image exists "$python_image"; then
    log "base: $python_image exists ($(size "$python_image"))"
    return
  fi
  if ! podman image exists "$debian_image"; then
    command -v debootstrap >/dev/null || die "debootstrap is missing: apt-get install -y podman runc debootstrap"
    timed debian "$debian_image" debootstrap_import
  fi
  local home version
  home="$("${PYTHON:-python3}" -c 'import sys; print(sys.base_prefix)')"
  version="$("$home/bin/python3.11" -c 'import sys; print(*sys.version_info[:3], sep=".")' 2>/dev/null || true)"
  [[ "$version" =~ ^3\.11\.([4-9]|[1-9][0-9])$ ]] ||
    die "base: ${PYTHON:-python3} (prefix $home) is not a CPython >= 3.11.4 built from source (PYTHON=...)"
  timed base "$python_image" podman build --quiet --build-arg "DEBIAN_IMAGE=$debian_image" \
    -v "$home:/opt/host-python:ro" -f infra/podman/Containerfile.python -t "$python_image" infra/podman >/dev/null
}

# pip's site configuration inside the builds (mounted, so it stays out of the images): verify TLS with the
# host's CA bundle, as pip does on the host (CI's network re-signs TLS; pip's own bundle does not know that CA).
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/prep" "$work/train"
printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' | tee "$work/prep/pip.conf" >"$work/train/pip.conf"
common=(--build-arg "BASE_IMAGE=$python_image" -v /etc/ssl/certs:/etc/ssl/certs:ro)

build_prep() {
  timed prep "localhost/habla-prep:$tag" podman build "${common[@]}" -v "$work/prep/pip.conf:/etc/pip.conf:ro" \
    -f infra/Dockerfile.prep -t "localhost/habla-prep:$tag" .
}

build_train() {
  local torch wheel
  torch="$(sed -n 's/^ARG TORCH_VERSION=//p' infra/Dockerfile.train)"
  wheel="$(ls "$wheels"/torch-"$torch"+cpu-*.whl 2>/dev/null | head -n1 || true)"
  [[ -n "$wheel" ]] || die "no torch-$torch+cpu wheel in $wheels (WHEELS=...): refusing to let pip fetch the CUDA build"
  # The wheel folder as pip's find-links: torch==X matches X+cpu, and the local version sorts above PyPI's X,
  # so pip takes the CPU wheel; the check below makes sure it did.
  echo 'find-links = /wheels' >>"$work/train/pip.conf"
  timed train "localhost/habla-train:$tag" podman build "${common[@]}" -v "$work/train/pip.conf:/etc/pip.conf:ro" \
    -v "$(cd "$wheels" && pwd):/wheels:ro" -f infra/Dockerfile.train -t "localhost/habla-train:$tag" .
  podman run --rm "localhost/habla-train:$tag" python -c \
    "import torch; assert torch.version.cuda is None, torch.__version__; print('habla-train: torch', torch.__version__)"
}

for target in "${targets[@]}"; do
  case "$target" in
    base) build_base ;;
    prep) build_base; build_prep ;;
    train) build_base; build_train ;;
    *) die "unknown target $target (base, prep, train)" ;;
  esac
done
