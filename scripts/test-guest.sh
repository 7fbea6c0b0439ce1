#!/usr/bin/env bash
# Runs the guest tier (tests/guest.rs) with real Linux guests, directly on
# hardware KVM or inside the nested test host, and reports how many ran.
#
# In the nested test host each test gets its own test host, bounded in
# time. QEMU's emulated SVM occasionally freezes the whole test host (seen
# as soft lockups), and under load it sometimes makes a guest triple-fault
# or stall without a word: QEMU's own guests there do it as often as ours
# (scripts/nested-control.py, docs/TESTING.md), and many concurrent guests
# have made the test host's own kernel panic. A test that hangs, whose
# guest dies that way, or whose test host dies, is run again, up to three
# attempts in all, and every retry is reported. A test that fails
# otherwise is never retried.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=$(scripts/kvm-mode.sh)
bin=$(scripts/cargo-exe.sh guest test --release --test guest)
[ -n "$bin" ] || { echo "test-guest: could not build the guest test binary" >&2; exit 1; }
# The child each kept sandbox runs in, found by the capsule CLI.
CAPSULE_VMM=$(scripts/cargo-exe.sh capsule-vmm build --release -p capsule-vmm)
[ -n "$CAPSULE_VMM" ] || { echo "test-guest: could not build capsule-vmm" >&2; exit 1; }
export CAPSULE_VMM

if [ "$mode" = direct ]; then
    log=$(mktemp)
    trap 'rm -f "$log"' EXIT
    set +e
    "$bin" --test-threads=1 --color never 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    set -e
    passed=$(sed -n 's/^test result: .* \([0-9][0-9]*\) passed; .*/\1/p' "$log" | tail -n 1)
    failed=$(sed -n 's/^test result: .* \([0-9][0-9]*\) failed;.*/\1/p' "$log" | tail -n 1)
    echo "guest tier: ${passed:-0} real-guest tests passed, ${failed:-?} failed, on this host's KVM"
    echo "guest: ${passed:-0} passed, ${failed:-0} failed"
    [ "$rc" = 0 ] && [ "${passed:-0}" -gt 0 ] || { echo "guest tier: FAILED" >&2; exit 1; }
    exit 0
fi

tests=$("$bin" --list --format terse | sed -n 's/: test$//p')
[ -n "$tests" ] || { echo "test-guest: no guest tests found" >&2; exit 1; }
# CAPSULE_GUEST_TESTS="name ..." runs only those (exact names).
if [ -n "${CAPSULE_GUEST_TESTS:-}" ]; then
    for t in $CAPSULE_GUEST_TESTS; do
        grep -qxF "$t" <<< "$tests" || { echo "test-guest: no guest test named $t" >&2; exit 1; }
    done
    tests=$CAPSULE_GUEST_TESTS
fi
# Every failed attempt's whole output is kept here; the log shows its end.
failures_dir=target/guest-failures
rm -rf "$failures_dir"
# A test's output without the harness's filler lines.
shown() { printf '%s\n' "$1" | grep -vE '^running 1 test$|^$' || true; }
passed=0; failed=0; retried=(); failures=()
# Retries across the whole run: a regression that hangs every test must
# not cost three time limits per test.
retry_budget=6
for t in $tests; do
    for attempt in 1 2 3; do
        set +e
        out=$(testhost/run.sh --timeout 300 \
            --env CAPSULE_KERNEL --env CAPSULE_INITRAMFS --env CAPSULE_ROOTFS --env CAPSULE_BZIMAGE --env CAPSULE_VMM \
            -- "$bin" --exact "$t" --test-threads=1 --color never 2>&1)
        rc=$?
        set -e
        # 124: the test host stopped responding; 125: the test host died
        # (its kernel panicked); 3: the guest stopped answering (the test's
        # watchdog fired, or a request timed out while the VM ran with
        # nothing on its console); 4: the guest reset mid-command with
        # nothing on its console. Retried and reported; a test that fails
        # an assertion is never retried.
        if [ "$rc" != 0 ]; then
            mkdir -p "$failures_dir"
            printf '%s\n' "$out" > "$failures_dir/${t//::/-}.$attempt.log"
        fi
        case "$rc" in 124|125|3|4) ;; *) break ;; esac
        [ "$attempt" -lt 3 ] || break
        if [ "${#retried[@]}" -ge "$retry_budget" ]; then
            echo "test-guest: $t: the nested test host failed it (exit $rc), and the run has used its $retry_budget retries" >&2
            break
        fi
        echo "test-guest: $t: the nested test host failed it (exit $rc, attempt $attempt of 3; all of its output in $failures_dir); running it again; it said:" >&2
        shown "$out" | tail -n 12 | sed 's/^/  | /' >&2
        retried+=("$t")
    done
    case "$rc" in 124|125|3|4) echo "test-guest: $t: gave up after the nested test host failed it (last exit $rc)" >&2 ;; esac
    shown "$out"
    if [ "$rc" = 0 ] && grep -q '^test result: ok. 1 passed' <<< "$out"; then
        passed=$((passed + 1))
    else
        failed=$((failed + 1))
        echo "test-guest: $t FAILED (exit $rc)" >&2
        failures+=("$t (exit $rc); its last lines:
$(shown "$out" | tail -n 15 | sed 's/^/  | /')")
    fi
done
[ ${#retried[@]} -eq 0 ] || echo "guest tier: retried after the nested test host hung or crashed the guest: ${retried[*]}"
# CI shows only the end of the log: name what failed here too.
[ ${#failures[@]} -eq 0 ] || printf 'guest tier: failed: %s\n' "${failures[@]}"
echo "guest tier: $passed real-guest tests passed, $failed failed, each inside its own nested test host"
echo "guest: $passed passed, $failed failed"
[ "$failed" = 0 ] && [ "$passed" -gt 0 ] || { echo "guest tier: FAILED" >&2; exit 1; }
