#!/bin/sh
# A Python 3.11 base image from Debian packages, for Docker hosts that reach no image
# registry (only a Debian mirror): debootstrap a minimal bookworm with python3 and its venv
# module, then `docker import` it. Needs root (debootstrap chroots) and debootstrap.
#
#   images/base-image.sh TAG [MIRROR]      # make base-image (images/README.md)
#
# Debian's interpreter is `python3` only (no `python`), bookworm's 3.11, the minor version
# requirements.lock is resolved for; the Dockerfiles create their venv with `python3 -m venv`.
set -eu
tag=${1:?usage: images/base-image.sh TAG [MIRROR]}
mirror=${2:-http://deb.debian.org/debian}
docker=${DOCKER:-docker}
root=$(mktemp -d "${TMPDIR:-/tmp}/npo-base-image.XXXXXX")
trap 'rm -rf "$root"' EXIT INT TERM
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$root" "$mirror"
# What a container never reads: the package cache and lists, documentation, locales.
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/* \
    "$root"/usr/share/info/* "$root"/usr/share/locale/* "$root"/var/cache/debconf/*-old \
    "$root"/var/log/*.log
tar --numeric-owner -C "$root" -c . | "$docker" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --message "debootstrap bookworm minbase + python3 (images/base-image.sh)" \
    - "$tag"
"$docker" run --rm --network none "$tag" python3 -c "import sys, venv; print(sys.version)"
