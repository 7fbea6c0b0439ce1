#!/usr/bin/env bash
# Runs the criterion benchmarks (benches/boot.rs, benches/snapshot.rs)
# where guests can run: directly on hardware KVM or inside the nested test
# host. BENCHES="snapshot" runs just one; extra arguments go to criterion
# (a filter, for instance).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=$(scripts/kvm-mode.sh)
for name in ${BENCHES:-boot snapshot}; do
    bin=$(scripts/cargo-exe.sh "$name" bench --bench "$name")
    [ -n "$bin" ] || { echo "bench: could not build the $name benchmark" >&2; exit 1; }
    if [ "$mode" = direct ]; then
        "$bin" --bench "$@"
        continue
    fi
    echo "bench: running $name inside the nested test host (compare figures only as ratios)" >&2
    # The checkout is read-only inside; criterion keeps its data in scratch.
    testhost/run.sh --timeout 3000 --env CAPSULE_KERNEL --env CAPSULE_INITRAMFS --env CAPSULE_LOG -- \
        sh -c 'CRITERION_HOME="$CAPSULE_SCRATCH/criterion" exec "$0" --bench "$@"' "$bin" "$@"
done
