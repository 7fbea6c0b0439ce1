#!/usr/bin/env bash
# Runs scripts/compare-qemu.py (boot and first command), with --snapshot
# scripts/compare-qemu-snapshot.py (save, restore, fork), or with --block
# scripts/compare-qemu-block.py (disk throughput, requests, small files), or
# with --debian scripts/compare-qemu-debian.py (boot with an ext4 root and
# Python workloads in a Debian root) where
# guests can run: directly on hardware KVM (loading vhost_vsock for QEMU),
# or inside the nested test host.
set -euo pipefail
cd "$(dirname "$0")/.."
script=scripts/compare-qemu.py
[ "${1:-}" = --snapshot ] && script=scripts/compare-qemu-snapshot.py
[ "${1:-}" = --block ] && script=scripts/compare-qemu-block.py
if [ "${1:-}" = --debian ]; then
    script=scripts/compare-qemu-debian.py
    # Built (once per machine) out here: it needs root and Debian's mirror.
    [ -n "${DEBIAN_ROOT:-}" ] || DEBIAN_ROOT=$(images/build-debian-root.sh)
    export DEBIAN_ROOT
    if [ "$(scripts/kvm-mode.sh)" = nested ] && [ -z "${CAPSULE_IN_TESTHOST:-}" ]; then
        # One test host per side, each tried twice: a test host that locks
        # up under this load costs one side's figures, not the run.
        logs=()
        for side in capsule qemu; do
            log=$(mktemp); logs+=("$log")
            for attempt in 1 2; do
                echo "compare-qemu: the $side side in the nested test host (attempt $attempt)" >&2
                if SIDES=$side testhost/run.sh --timeout 3000 --env CAPSULE_KERNEL --env CAPSULE_INITRAMFS \
                    --env ROUNDS --env DEBIAN_ROOT --env SIDES -- python3 "$script" 2>&1 | tee "$log"; then
                    break
                fi
            done
        done
        python3 "$script" --combine "${logs[@]}"
        rm -f "${logs[@]}"
        exit 0
    fi
fi
mode=$(scripts/kvm-mode.sh)
if [ "$mode" = nested ] && [ -z "${CAPSULE_IN_TESTHOST:-}" ]; then
    echo "compare-qemu: running inside the nested test host (figures are only meaningful as ratios)" >&2
    exec testhost/run.sh --timeout 3000 --env CAPSULE_KERNEL --env CAPSULE_INITRAMFS \
        --env ROUNDS --env FORKS --env DEBIAN_ROOT -- scripts/compare-qemu.sh "$@"
fi
[ -e /dev/vhost-vsock ] || modprobe vhost_vsock
exec python3 "$script"
