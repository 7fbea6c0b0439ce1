#!/usr/bin/env bash
# Builds the guest initramfs: the static guest agent as /init, plus
# Debian's busybox-static with every applet linked, a minimal /etc.
# usage: images/build-initramfs.sh AGENT_BINARY OUT.cpio
set -euo pipefail
agent="$1"; out="$2"
here="$(cd "$(dirname "$0")" && pwd)"
busybox=$(command -v busybox) || { echo "busybox-static is not installed" >&2; exit 1; }
if ! file -L "$busybox" 2>/dev/null | grep -q "statically linked"; then
    ldd "$busybox" >/dev/null 2>&1 && { echo "$busybox is not static (install busybox-static)" >&2; exit 1; }
fi
stage=$(mktemp -d)
chmod 0755 "$stage"
trap 'rm -rf "$stage"' EXIT
"$here/populate-root.sh" "$stage"
install -m 0755 "$agent" "$stage/init"
mkdir -p "$(dirname "$out")"
(cd "$stage" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) > "$out.tmp"
mv "$out.tmp" "$out"
