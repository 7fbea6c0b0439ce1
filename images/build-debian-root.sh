#!/usr/bin/env bash
# Builds a Debian bookworm root filesystem with python3 as an ext4 image,
# for the realistic-workload side by side (scripts/compare-qemu-debian.py).
# Cached per machine: prints the image's path, building it only once.
# The guest agent stays in the initramfs and switches into this root, so
# the image holds no Capsule code.
# usage: images/build-debian-root.sh   (needs root and debootstrap)
set -euo pipefail
cache="${XDG_CACHE_HOME:-$HOME/.cache}/capsule"
out="$cache/debian-bookworm-python3.ext4"
size_mib=1024
if [ -f "$out" ]; then echo "$out"; exit 0; fi
command -v debootstrap >/dev/null || {
    echo "build-debian-root: installing debootstrap" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap >&2
}
mkdir -p "$cache"
stage=$(mktemp -d)
trap 'rm -rf "$stage" "$out.tmp"' EXIT
echo "build-debian-root: debootstrap bookworm (minbase + python3) into $stage" >&2
debootstrap --variant=minbase --include=python3 bookworm "$stage" http://deb.debian.org/debian >&2
rm -rf "$stage"/var/cache/apt/archives/*.deb "$stage"/var/lib/apt/lists/*
echo "capsule" > "$stage/etc/hostname"
truncate -s "${size_mib}M" "$out.tmp"
mkfs.ext4 -q -F -L debian-root -d "$stage" "$out.tmp"
mv "$out.tmp" "$out"
echo "$out"
