#!/usr/bin/env bash
# Runs scripts/compare-qemu.py (boot and first command), with --snapshot
# scripts/compare-qemu-snapshot.py (save, restore, fork), or with --block
# scripts/compare-qemu-block.py (disk throughput, requests, small files) where
# guests can run: directly on hardware KVM (loading vhost_vsock for QEMU),
# or inside the nested test host.
set -euo pipefail
cd "$(dirname "$0")/.."
script=scripts/compare-qemu.py
[ "${1:-}" = --snapshot ] && script=scripts/compare-qemu-snapshot.py
[ "${1:-}" = --block ] && script=scripts/compare-qemu-block.py
mode=$(scripts/kvm-mode.sh)
if [ "$mode" = nested ] && [ -z "${CAPSULE_IN_TESTHOST:-}" ]; then
    echo "compare-qemu: running inside the nested test host (figures are only meaningful as ratios)" >&2
    exec testhost/run.sh --timeout 3000 --env CAPSULE_KERNEL --env CAPSULE_INITRAMFS \
        --env ROUNDS --env FORKS -- scripts/compare-qemu.sh "$@"
fi
[ -e /dev/vhost-vsock ] || modprobe vhost_vsock
exec python3 "$script"
