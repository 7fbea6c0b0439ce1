#!/usr/bin/env bash
# The Python SDK's tests (sdk/python/tests, pytest) against a real daemon
# with real guests: the SDK pip-installed from the checkout as a user
# would, then pytest where guests run (directly on hardware KVM, or inside
# the nested test host, whose occasional hang is retried once and
# reported). Fails if no test ran.
set -euo pipefail
cd "$(dirname "$0")/.."
for v in CAPSULE_KERNEL CAPSULE_INITRAMFS; do
    [ -f "${!v:-}" ] || { echo "test-sdk: $v must name the guest artifact (make test-sdk sets it)" >&2; exit 1; }
done
# pytest and anyio for the tests, and the `mcp` package's client for
# `capsule mcp`: clients nobody here wrote.
python3 -c 'import pytest, anyio, pytest_rerunfailures; from mcp.shared.exceptions import MCPError' 2>/dev/null ||
    pip install -q pytest anyio pytest-rerunfailures 'mcp>=2.3,<3' >&2
# As a user installs it (a local path is always built and installed anew).
pip install -q ./sdk/python >&2
bin=$(scripts/cargo-exe.sh capsule build --release -p capsule --bin capsule)
[ -n "$bin" ] || { echo "test-sdk: could not build capsule" >&2; exit 1; }
vmm=$(scripts/cargo-exe.sh capsule-vmm build --release -p capsule-vmm)
[ -n "$vmm" ] || { echo "test-sdk: could not build capsule-vmm" >&2; exit 1; }
export CAPSULE_BIN=$bin CAPSULE_VMM=$vmm
# The checkout is read-only inside the test host: no cache, no bytecode.
# A test whose guest stopped answering (the nested test host stalls
# guests now and then, QEMU's as often as ours) runs once more; those are
# counted, and more than three fail the run.
pytest_cmd=(python3 -B -m pytest sdk/python/tests -p no:cacheprovider -q -rfER --color=no
    --reruns 1 --only-rerun "guest did not take the command|did not become ready|timed out waiting for the agent")
# CAPSULE_SDK_TESTS=EXPR runs only the tests pytest's -k selects (by hand).
[ -z "${CAPSULE_SDK_TESTS:-}" ] || pytest_cmd+=(-k "$CAPSULE_SDK_TESTS")
log=$(mktemp)
trap 'rm -f "$log"' EXIT
attempt=1 retried=""
while :; do
    set +e
    if [ "$(scripts/kvm-mode.sh)" = nested ]; then
        testhost/run.sh --timeout 1500 --env CAPSULE_KERNEL --env CAPSULE_INITRAMFS \
            --env CAPSULE_ROOTFS --env CAPSULE_BIN --env CAPSULE_VMM -- "${pytest_cmd[@]}" 2>&1 | tee "$log"
    else
        "${pytest_cmd[@]}" 2>&1 | tee "$log"
    fi
    rc=${PIPESTATUS[0]}
    set -e
    # 124: the test host hung (no heartbeat) or ran out of time.
    if [ "$rc" = 124 ] && [ "$attempt" = 1 ]; then
        echo "test-sdk: the nested test host hung; running the SDK tests once more" >&2
        attempt=2 retried=1
        continue
    fi
    break
done
count() { { grep -oE "[0-9]+ $1" "$log" || true; } | tail -n 1 | cut -d' ' -f1; }
passed=$(count passed)
failed=$(count failed)
reruns=$(count rerun)
echo "sdk: ${passed:-0} passed, ${failed:-0} failed, ${reruns:-0} run again after their guest stalled, against real guests${retried:+ (the whole run again after a test-host hang)}"
[ "$rc" = 0 ] && [ "${passed:-0}" -gt 0 ] || { echo "sdk: FAILED" >&2; exit 1; }
[ "${reruns:-0}" -le 3 ] || { echo "sdk: FAILED: more than 3 tests passed only on a rerun" >&2; exit 1; }
