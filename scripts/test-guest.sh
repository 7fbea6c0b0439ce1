#!/usr/bin/env bash
# Runs the guest tier (tests/guest.rs) with real Linux guests, directly on
# hardware KVM or inside the nested test host, and reports how many ran.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=$(scripts/kvm-mode.sh)
bin=$(scripts/cargo-exe.sh guest test --release --test guest)
[ -n "$bin" ] || { echo "test-guest: could not build the guest test binary" >&2; exit 1; }
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
if [ "$mode" = direct ]; then
    "$bin" --test-threads=1 2>&1 | tee "$log"
else
    testhost/run.sh --timeout 2400 --env CAPSULE_KERNEL --env CAPSULE_INITRAMFS --env CAPSULE_ROOTFS --env CAPSULE_BZIMAGE \
        -- "$bin" --test-threads=1 2>&1 | tee "$log"
fi
rc=${PIPESTATUS[0]}
set -e
passed=$(sed -n 's/^test result: .* \([0-9][0-9]*\) passed; \([0-9][0-9]*\) failed.*/\1/p' "$log" | tail -n 1)
failed=$(sed -n 's/^test result: .* \([0-9][0-9]*\) passed; \([0-9][0-9]*\) failed.*/\2/p' "$log" | tail -n 1)
where=$([ "$mode" = direct ] && echo "on this host's KVM" || echo "inside the nested test host")
echo "guest tier: ${passed:-0} real-guest tests passed, ${failed:-?} failed, $where"
if [ "$rc" != 0 ] || [ -z "$passed" ] || [ "$passed" = 0 ]; then
    echo "guest tier: FAILED (exit $rc)" >&2
    exit 1
fi
