#!/bin/sh
# A stand-in for python:3.11-slim where no image registry is reachable but Debian's apt mirror is: Debian
# bookworm's own Python 3.11, imported as local/python:3.11-slim. Run as root with debootstrap and docker:
#
#   sh deploy/build_local_base.sh
#   docker build -f deploy/Dockerfile --build-arg PYTHON_IMAGE=local/python:3.11-slim ... .
#
# It is not the official image: Python is Debian's python3.11 (3.11.2, in /usr/bin, pip 23 in a venv) where
# python:3.11-slim has python.org's latest 3.11 in /usr/local/bin. The Dockerfile relies only on `python`
# on PATH and `python -m venv`, which both give. EXTRA_CA_DIR: a folder of extra CA certificates (*.crt) to
# trust inside (a TLS-intercepting proxy between the build and PyPI); they stay in the image built on it.
set -eu
TAG=${TAG:-local/python:3.11-slim}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY=${SECURITY:-http://deb.debian.org/debian-security}
ROOTFS=$(mktemp -d)
trap 'rm -rf "$ROOTFS"' EXIT

debootstrap --variant=minbase bookworm "$ROOTFS" "$MIRROR"
printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb %s bookworm-security main\n' \
    "$MIRROR" "$MIRROR" "$SECURITY" > "$ROOTFS/etc/apt/sources.list"
cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
if [ -n "${EXTRA_CA_DIR:-}" ]; then
    mkdir -p "$ROOTFS/usr/local/share/ca-certificates"
    cp "$EXTRA_CA_DIR"/*.crt "$ROOTFS/usr/local/share/ca-certificates/"
fi
chroot "$ROOTFS" sh -ec '
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends \
        python3.11 python3.11-venv python3-pip ca-certificates netbase tzdata
    update-ca-certificates
    ln -sf /usr/bin/python3.11 /usr/local/bin/python
    ln -sf /usr/bin/python3.11 /usr/local/bin/python3
    apt-get clean
    rm -rf /var/lib/apt/lists/*'
rm -f "$ROOTFS/etc/resolv.conf"

# docker import keeps no environment: give it the PATH and LANG the official image sets.
tar --numeric-owner -C "$ROOTFS" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$TAG"
