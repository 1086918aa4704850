#!/usr/bin/env bash
# `make container-test`: builds the image from this repository's Dockerfile with podman
# and runs tests/container against it, as a user of the image would meet it.
# Installs podman with apt-get when it is missing (root on Debian/Ubuntu).
# Variables: PYTHON_IMAGE (base; default a local stand-in built by build_base.sh, since no
# registry may be reachable), TORCH_INDEX_URL (default PyPI, the index such machines
# reach), CLIP_TEST_IMAGE (tag to build), CLIP_TEST_MODEL_DIR (random ViT-B-32 to mount).
set -euo pipefail
cd "$(dirname "$0")/../.."
here=scripts/container
python=${PY:-.venv/bin/python}

if ! command -v podman >/dev/null || ! command -v mmdebstrap >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing podman, buildah, runc and mmdebstrap with apt-get"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends podman buildah runc mmdebstrap \
            netavark aardvark-dns slirp4netns uidmap fuse-overlayfs iptables \
            ca-certificates >/dev/null
    else
        echo "container test needs podman and mmdebstrap (apt-get install podman buildah runc mmdebstrap)" >&2
        exit 1
    fi
fi
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/$here/containers.conf}

base=${PYTHON_IMAGE:-localhost/python:3.11-local}
if [ -z "${PYTHON_IMAGE:-}" ]; then
    "$here/build_base.sh" "$base"
fi

image=${CLIP_TEST_IMAGE:-localhost/clip-reid:cpu}
start=$(date +%s)
# --format docker keeps the HEALTHCHECK (OCI images have no such field).
podman build --format docker --network host \
    --build-arg PYTHON_IMAGE="$base" \
    --build-arg VARIANT=cpu \
    --build-arg TORCH_INDEX_URL="${TORCH_INDEX_URL:-https://pypi.org/simple}" \
    -t "$image" . >"${CLIP_TEST_BUILD_LOG:-/tmp/clip-reid-build.log}" 2>&1 \
    || { tail -40 "${CLIP_TEST_BUILD_LOG:-/tmp/clip-reid-build.log}" >&2; echo "image build failed" >&2; exit 1; }
size=$(podman image inspect --format '{{.Size}}' "$image")
echo "image $image: built in $(( $(date +%s) - start )) s, $(( size / 1000000 )) MB"

export CLIP_TEST_IMAGE=$image
export CLIP_TEST_MODEL_DIR=${CLIP_TEST_MODEL_DIR:-$PWD/models/vit-b-32-random}
exec "$python" -m pytest tests/container -p no:cacheprovider "$@"
