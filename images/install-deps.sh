#!/usr/bin/env bash
# Installs the Debian packages the build and the test tiers need, if any
# are missing. Safe to run repeatedly; does nothing when all are present.
set -euo pipefail
packages=(
    qemu-system-x86       # nested test host, QEMU microvm comparison
    linux-source-6.1      # guest kernel source
    busybox-static        # guest userland
    build-essential flex bison bc libelf-dev libssl-dev  # kernel build
    libclang-dev          # bindgen for userfaultfd-sys
    e2fsprogs cpio xz-utils zstd file
    tmux                  # the terminal the interactive-shell test drives
)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "install-deps: installing ${missing[*]}" >&2
    sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi
# The test host resolves Debian's newest amd64 kernel from the package lists.
if ! apt-cache search --names-only '^linux-image-[0-9.]+-[0-9]+-amd64-unsigned$' | grep -q .; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -q >&2
fi
command -v cargo-nextest >/dev/null || cargo install --locked cargo-nextest >&2
