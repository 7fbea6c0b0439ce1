#!/usr/bin/env bash
# Runs the guest tier (tests/guest.rs) with real Linux guests, directly on
# hardware KVM or inside the nested test host, and reports how many ran.
#
# In the nested test host, tests share a test host a few at a time (the
# ones that stress it get one each), bounded in time. QEMU's emulated SVM
# occasionally freezes the whole test host (seen as soft lockups), and
# under load it sometimes makes a guest triple-fault or stall without a
# word: QEMU's own guests there do it as often as ours
# (scripts/nested-control.py, docs/TESTING.md), and many concurrent guests
# have made the test host's own kernel panic. A test that hangs, whose
# guest dies that way (with no sign in its stall report that the VMM is at
# fault), or whose test host dies, is run again, up to four attempts in
# all; every retry is reported, and more passes-on-retry than a small
# budget fail the run. A test that fails otherwise is never retried.
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
    echo "guest: ${passed:-0} passed, ${failed:-0} failed, 0 only on a retry"
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
shown() { printf '%s\n' "$1" | grep -vE '^running [0-9]+ tests?$|^$' || true; }

# Tests share a nested test host, a few at a time, one after another in
# one test process: a test host costs seconds to start. These stress the
# test host, or count the process's threads and descriptors, so each gets
# one of its own.
solo="twenty_sequential_boots_leak_nothing
hostile::a_frozen_fork_is_reported_and_the_others_finish
snapshot::twenty_forks_share_memory_and_keep_their_disk_writes_apart"
group_size=${CAPSULE_GUEST_GROUP:-4}
# Retries across the whole run: a regression that hangs every test must
# not cost three time limits per test.
retry_budget=6
# Passing only on a retry is the nested test host's doing only so often;
# more than this in one run fails it (a stall of ours retried to green
# would hide).
pass_on_retry_budget=${CAPSULE_PASS_ON_RETRY_BUDGET:-3}
# A whole-test-host freeze (its heartbeat stops: both of its CPUs
# soft-locked, kernel threads included) stops everything in it, not one
# guest: no user-space VMM can do that to a kernel, so such retries are
# counted apart, against their own budget, not against the one above,
# which stays for failures that could be ours (a guest stalled or reset
# while its test host ran on).
freeze_budget=${CAPSULE_FREEZE_BUDGET:-8}

# The queue: "attempt|test test ...".
queue=(); batch=()
for t in $tests; do
    if grep -qxF "$t" <<< "$solo"; then
        queue+=("1|$t")
    else
        batch+=("$t")
        if [ "${#batch[@]}" -ge "$group_size" ]; then queue+=("1|${batch[*]}"); batch=(); fi
    fi
done
[ "${#batch[@]}" -eq 0 ] || queue+=("1|${batch[*]}")

passed=0; failed=0; retried=(); passed_on_retry=(); passed_after_freeze=(); failures=(); hosts=0
freezes=0
# Tests retried at least once for something other than a freeze.
declare -A retried_for_cause=()
n=0
while [ "$n" -lt "${#queue[@]}" ]; do
    entry=${queue[$n]}; n=$((n + 1))
    attempt=${entry%%|*}; names=${entry#*|}
    hosts=$((hosts + 1))
    set +e
    # shellcheck disable=SC2086 # one filter per test name
    out=$(testhost/run.sh --timeout $((300 * $(wc -w <<< "$names"))) \
        --env CAPSULE_KERNEL --env CAPSULE_INITRAMFS --env CAPSULE_ROOTFS --env CAPSULE_BZIMAGE --env CAPSULE_VMM \
        -- "$bin" --exact $names --test-threads=1 --color never 2>&1)
    rc=$?
    set -e
    shown "$out"
    if [ "$rc" != 0 ]; then
        mkdir -p "$failures_dir"
        printf '%s\n' "$out" > "$failures_dir/$(printf '%s' "${names%% *}" | tr ':' '-').$attempt.log"
    fi
    # 124: the test host stopped responding; 125: the test host died (its
    # kernel panicked); 3: the guest stopped answering (the test's
    # watchdog fired, or a request timed out while the VM ran with nothing
    # on its console and no sign of the VMM at fault); 4: the guest reset
    # mid-command with nothing on its console. The test that was running
    # then is run again, up to four attempts; the ones after it had not
    # started and just run again. A test that fails an assertion is never
    # retried.
    culprit=
    for t in $(tr ' ' '\n' <<< "$names" | sort); do
        if grep -qxF "test $t ... ok" <<< "$out"; then
            passed=$((passed + 1))
            if [ "$attempt" != 1 ]; then
                if [ -n "${retried_for_cause[$t]:-}" ]; then
                    passed_on_retry+=("$t")
                else
                    passed_after_freeze+=("$t")
                fi
            fi
        elif grep -qxF "test $t ... FAILED" <<< "$out"; then
            failed=$((failed + 1))
            echo "test-guest: $t FAILED (exit $rc)" >&2
            failures+=("$t (exit $rc); its last lines:
$(shown "$out" | tail -n 15 | sed 's/^/  | /')")
        elif [ -z "$culprit" ]; then
            culprit=$t
            frozen=
            if [ "$rc" = 124 ] && grep -q "testhost: the test host stopped responding (no heartbeat" <<< "$out"; then
                frozen=1
            fi
            over_budget=
            if [ -n "$frozen" ]; then
                [ "$freezes" -lt "$freeze_budget" ] || over_budget=1
            else
                [ "$(( ${#retried[@]} - freezes ))" -lt "$retry_budget" ] || over_budget=1
            fi
            # Freezes come in bursts (three in a row on one test, twice
            # seen): a test that only ever met freezes gets five attempts;
            # one the test host also reset or crashed gets four (the
            # 128 MiB transfer met a freeze and two resets in one run).
            max_attempts=4
            if [ -n "$frozen" ] && [ -z "${retried_for_cause[$t]:-}" ]; then
                max_attempts=5
            fi
            case "$rc" in
                124|125|3|4)
                    if [ "$attempt" -ge "$max_attempts" ] || [ -n "$over_budget" ]; then
                        echo "test-guest: $t: gave up after the nested test host failed it (last exit $rc, attempt $attempt; $freezes freezes retried of $freeze_budget, $(( ${#retried[@]} - freezes )) other retries of $retry_budget)" >&2
                        failed=$((failed + 1))
                        failures+=("$t (exit $rc, the nested test host)")
                    else
                        echo "test-guest: $t: the nested test host failed it (exit $rc, attempt $attempt of $max_attempts; all of its output in $failures_dir); running it again; it said:" >&2
                        shown "$out" | tail -n 12 | sed 's/^/  | /' >&2
                        retried+=("$t")
                        if [ -n "$frozen" ]; then
                            freezes=$((freezes + 1))
                        else
                            retried_for_cause[$t]=1
                        fi
                        queue+=("$((attempt + 1))|$t")
                    fi ;;
                *)
                    failed=$((failed + 1))
                    echo "test-guest: $t FAILED (exit $rc)" >&2
                    failures+=("$t (exit $rc); its last lines:
$(shown "$out" | tail -n 15 | sed 's/^/  | /')") ;;
            esac
        else
            # It never started: the test before it ended the process.
            queue+=("$attempt|$t")
        fi
    done
done
[ ${#retried[@]} -eq 0 ] || echo "guest tier: retried after the nested test host hung or crashed the guest: ${retried[*]}"
# CI shows only the end of the log: name what failed here too.
[ ${#failures[@]} -eq 0 ] || printf 'guest tier: failed: %s\n' "${failures[@]}"
echo "guest tier: $passed real-guest tests passed, $failed failed, in $hosts nested test hosts"
echo "guest tier: the test host froze $freezes times (heartbeat lost; at most $freeze_budget retried); ${#passed_after_freeze[@]} tests passed only on a retry after a freeze${passed_after_freeze[*]:+: ${passed_after_freeze[*]}}"
echo "guest tier: ${#passed_on_retry[@]} passed only on a retry for another reason${passed_on_retry[*]:+: ${passed_on_retry[*]}} (at most $pass_on_retry_budget may)"
echo "guest: $passed passed, $failed failed, $(( ${#passed_on_retry[@]} + ${#passed_after_freeze[@]} )) only on a retry (${#passed_after_freeze[@]} after a test-host freeze)"
if [ "${#passed_on_retry[@]}" -gt "$pass_on_retry_budget" ]; then
    echo "guest tier: FAILED: more tests passed only on a retry than the nested test host explains" >&2
    exit 1
fi
[ "$failed" = 0 ] && [ "$passed" -gt 0 ] || { echo "guest tier: FAILED" >&2; exit 1; }
