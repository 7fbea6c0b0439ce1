#!/usr/bin/env bash
# Runs scripts/bench-daemon.py (the manager's create latency from a warm
# pool and from a template, 50 concurrent creates, the daemon's memory)
# where guests can run: directly on hardware KVM or inside the nested test
# host (whose figures mean something only next to each other).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(scripts/kvm-mode.sh)" = nested ]; then
    echo "bench-daemon: running inside the nested test host" >&2
    exec testhost/run.sh --timeout 3000 --env CAPSULE_KERNEL --env CAPSULE_INITRAMFS \
        --env ROUNDS --env CONCURRENT -- python3 scripts/bench-daemon.py
fi
exec python3 scripts/bench-daemon.py
