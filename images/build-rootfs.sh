#!/usr/bin/env bash
# Builds the test ext4 root filesystem (busybox userland) with mkfs.ext4 -d,
# so block-device boot is exercised too.
# usage: images/build-rootfs.sh OUT.ext4 [SIZE_MIB]
set -euo pipefail
out="$1"; size="${2:-64}"
here="$(cd "$(dirname "$0")" && pwd)"
stage=$(mktemp -d)
chmod 0755 "$stage"
trap 'rm -rf "$stage"' EXIT
"$here/populate-root.sh" "$stage"
sed -i 's/^NAME=.*/NAME="Capsule ext4 test root"/' "$stage/etc/os-release"
rm -f "$out.tmp"
truncate -s "${size}M" "$out.tmp"
mkfs.ext4 -q -F -L capsule-root -d "$stage" "$out.tmp"
mv "$out.tmp" "$out"
