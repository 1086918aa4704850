#!/usr/bin/env bash
# A local stand-in for python:3.11-slim, for machines that reach Debian's mirror but no
# container registry: Debian bookworm's own Python 3.11 from mmdebstrap, imported into
# podman, with this machine's CA certificates (pip goes through its proxy) and pip allowed
# to install into the system Python, as it is in python:3.11-slim.
# Usage: build_base.sh [TAG]   (does nothing when TAG already exists)
set -euo pipefail
tag=${1:-localhost/python:3.11-local}
if podman image exists "$tag"; then
    echo "base image $tag: present, reused"
    exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
start=$(date +%s)
mmdebstrap --quiet --variant=minbase \
    --include=python3,python3-pip,python3-venv,python-is-python3,ca-certificates \
    bookworm "$work/rootfs.tar"
podman import --quiet "$work/rootfs.tar" "$tag-raw" >/dev/null
mkdir "$work/context"
cp /usr/local/share/ca-certificates/*.crt "$work/context/" 2>/dev/null || true
cat >"$work/context/Containerfile" <<CONTAINERFILE
FROM $tag-raw
COPY . /usr/local/share/ca-certificates/
RUN rm -f /usr/local/share/ca-certificates/Containerfile && update-ca-certificates \
    && rm -f /usr/lib/python3.11/EXTERNALLY-MANAGED
ENV PIP_BREAK_SYSTEM_PACKAGES=1
CMD ["python3"]
CONTAINERFILE
podman build --quiet --network host -t "$tag" "$work/context" >/dev/null

echo "base image $tag: built in $(( $(date +%s) - start )) s"
