#!/usr/bin/env bash
# Runs scripts/compare-qemu.py where guests can run: directly on hardware
# KVM (loading vhost_vsock for QEMU), or inside the nested test host.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=$(scripts/kvm-mode.sh)
if [ "$mode" = nested ] && [ -z "${CAPSULE_IN_TESTHOST:-}" ]; then
    echo "compare-qemu: running inside the nested test host (figures are only meaningful as ratios)" >&2
    exec testhost/run.sh --timeout 1800 --env CAPSULE_KERNEL --env CAPSULE_INITRAMFS --env ROUNDS -- scripts/compare-qemu.sh
fi
[ -e /dev/vhost-vsock ] || modprobe vhost_vsock
exec python3 scripts/compare-qemu.py
