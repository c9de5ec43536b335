#!/bin/sh
# A base image built from Debian packages with debootstrap: Python 3.11 with venv and the CA
# certificates, what the Containerfile needs of its BASE. For machines that cannot pull public
# images (the development machines); `make image-test` builds the image on it.
#
#   image/debian-base.sh IMAGE [SUITE] [MIRROR]     (root; PODMAN may carry podman's options)
#
# An IMAGE already present is kept: delete it (podman rmi IMAGE) to build it again.
set -eu
image=${1:?usage: image/debian-base.sh IMAGE [SUITE] [MIRROR]}
suite=${2:-bookworm}
mirror=${3:-http://deb.debian.org/debian}
podman=${PODMAN:-podman}

if $podman image exists "$image"; then
    echo "base image $image: present (podman rmi $image to build it again)"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "image/debian-base.sh: debootstrap needs root" >&2
    exit 1
fi
if ! command -v debootstrap >/dev/null; then
    echo "image/debian-base.sh: debootstrap is missing: apt-get install debootstrap" >&2
    exit 1
fi
root=$(mktemp -d "${TMPDIR:-/tmp}/cotmon-base.XXXXXX")
trap 'rm -rf "$root"' EXIT
echo "building base image $image: debootstrap $suite from $mirror (about a minute) ..."
if ! debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$suite" "$root" "$mirror" \
    >"$root.log" 2>&1; then
    tail -n 20 "$root.log" >&2
    echo "image/debian-base.sh: debootstrap failed (whole log: $root.log)" >&2
    exit 1
fi
rm -f "$root.log"
# Package caches and documentation: not needed to run Python (about 130 MB).
rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/* \
    "$root"/usr/share/locale/*
tar -C "$root" -c . | $podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    - "$image"
