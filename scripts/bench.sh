#!/usr/bin/env bash
# Runs the criterion benchmarks (benches/boot.rs) where guests can run:
# directly on hardware KVM or inside the nested test host.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=$(scripts/kvm-mode.sh)
bin=$(scripts/cargo-exe.sh boot bench --bench boot)
[ -n "$bin" ] || { echo "bench: could not build the benchmark" >&2; exit 1; }
if [ "$mode" = direct ]; then
    exec "$bin" --bench
fi
echo "bench: running inside the nested test host (compare figures only as ratios)" >&2
# The checkout is read-only inside; criterion keeps its data in scratch.
exec testhost/run.sh --timeout 1800 --env CAPSULE_KERNEL --env CAPSULE_INITRAMFS -- \
    sh -c 'CRITERION_HOME="$CAPSULE_SCRATCH/criterion" exec "$0" --bench' "$bin"
