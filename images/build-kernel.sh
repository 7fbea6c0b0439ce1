#!/usr/bin/env bash
# Builds the Capsule guest kernel from Debian's linux-source-6.1 package:
# `make tinyconfig` plus images/guest-kernel.config. The result is cached
# per machine by (source package version, fragment hash), so the ~4 minute
# build happens once. Prints the path of the cached vmlinux on stdout.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
fragment="$here/guest-kernel.config"
cache_root="${XDG_CACHE_HOME:-$HOME/.cache}/capsule"

log() { echo "build-kernel: $*" >&2; }

tarball=$(ls /usr/src/linux-source-6.1.tar.xz 2>/dev/null || true)
if [ -z "$tarball" ]; then
    log "linux-source-6.1 is not installed; run 'make deps' (or apt-get install linux-source-6.1)"
    exit 1
fi
src_version=$(dpkg-query -W -f='${Version}' linux-source-6.1)
frag_hash=$(cat "$fragment" "$0" | sha256sum | cut -c1-16)
out="$cache_root/kernel/6.1-${src_version}-${frag_hash}"
if [ -f "$out/vmlinux" ]; then
    echo "$out/vmlinux"
    exit 0
fi

work="$cache_root/kernel/build-$$"
rm -rf "$work"
mkdir -p "$work"
trap 'rm -rf "$work"' EXIT
log "unpacking $tarball (source $src_version)"
tar -C "$work" -xf "$tarball"
cd "$work"/linux-source-6.1
log "configuring: tinyconfig + $(basename "$fragment")"
make -s tinyconfig >&2
scripts/kconfig/merge_config.sh -m .config "$fragment" >&2
make -s olddefconfig >&2
# Every line of the fragment must have survived olddefconfig, or the kernel
# silently lacks something the VMM or agent relies on.
missing=0
while IFS= read -r line; do
    case "$line" in ''|'#'*) continue ;; esac
    key=${line%%=*}; want=${line#*=}
    if [ "$want" = n ]; then
        grep -q "^$key=" .config && { log "option $key should be off"; missing=1; }
    else
        grep -qx "$line" .config || { log "option $line did not stick"; missing=1; }
    fi
done < "$fragment"
[ "$missing" = 0 ] || { log "kernel config fragment not honoured"; exit 1; }
log "building vmlinux and bzImage with $(nproc) jobs (about 4 minutes on 2 cores)"
make -s -j"$(nproc)" vmlinux bzImage >&2
mkdir -p "$out.tmp"
cp vmlinux "$out.tmp/vmlinux"
cp arch/x86/boot/bzImage "$out.tmp/bzImage"
cp .config "$out.tmp/config"
rm -rf "$out"
mv "$out.tmp" "$out"
log "cached in $out"
echo "$out/vmlinux"
