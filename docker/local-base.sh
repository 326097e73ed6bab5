#!/usr/bin/env bash
# Build localhost/debian-base:bookworm from Debian's packages: the stand-in for
# python:3.11-slim-bookworm on machines that can pull no image (dev and CI sandboxes).
# It trusts the host's CA bundle, as the sandbox reaches package registries through a
# TLS-intercepting path. Usage: docker/local-base.sh [IMAGE]  (needs root and podman).
set -euo pipefail
image=${1:-localhost/debian-base:bookworm}
if podman image exists "$image"; then
  echo "$image exists"
  exit 0
fi
rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" >/dev/null
cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$rootfs/etc/pip.conf"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | podman import - "$image" >/dev/null
echo "built $image"
