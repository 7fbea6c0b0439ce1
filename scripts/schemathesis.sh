#!/usr/bin/env bash
# Runs schemathesis (PyPI; a client nobody here wrote) against a live
# `capsule serve`, from the checked-in OpenAPI document (a host test checks
# that it is the one the daemon serves): no 5xx, every response in the
# schema, bad input refused with a 4xx. Host tier: the daemon's kernel is a
# stand-in and --max-sandboxes 0 refuses every create (429 host_full) after
# it has been checked, so nothing boots; the guest tier covers boots.
# The event stream never ends, so it is left out here (tests/api.rs and
# the guest tests read it). Then Prometheus's Python client parses /metrics.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v schemathesis >/dev/null || {
    echo "schemathesis: installing it from PyPI" >&2
    pip install -q schemathesis >&2
}
# Prometheus's own client library parses the daemon's /metrics below.
python3 -c 'import prometheus_client' 2>/dev/null || pip install -q prometheus_client >&2
bin=$(scripts/cargo-exe.sh capsule build -p capsule --bin capsule)
[ -n "$bin" ] || { echo "schemathesis: could not build capsule" >&2; exit 1; }
work=$(mktemp -d)
daemon=
cleanup() {
    [ -z "$daemon" ] || kill "$daemon" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
printf 'not a kernel' > "$work/vmlinux"
printf 'not an initramfs' > "$work/initramfs.cpio"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
CAPSULE_HOME="$work/home" "$bin" serve --listen "127.0.0.1:$port" --token-file "$work/token" \
    --max-sandboxes 0 --kernel "$work/vmlinux" --initramfs "$work/initramfs.cpio" 2> "$work/daemon.log" &
daemon=$!
for _ in $(seq 100); do
    [ -s "$work/token" ] && curl -s -o /dev/null "http://127.0.0.1:$port/" && break
    sleep 0.1
done
token=$(cat "$work/token")
set +e
schemathesis run docs/openapi.json --url "http://127.0.0.1:$port" \
    -H "Authorization: Bearer $token" \
    --exclude-operation-id stream_events \
    --checks all --max-examples "${SCHEMATHESIS_EXAMPLES:-40}" --workers 1 \
    --generation-allow-x00 false \
    --seed "${SCHEMATHESIS_SEED:-7}" --no-color
rc=$?
set -e
if [ "$rc" != 0 ]; then
    echo "schemathesis: FAILED (exit $rc); the daemon's log:" >&2
    tail -n 50 "$work/daemon.log" >&2
    exit 1
fi
kill -0 "$daemon" || { echo "schemathesis: the daemon died" >&2; exit 1; }
echo "schemathesis: passed against the live daemon"
# /metrics as Prometheus reads it: OpenMetrics text its parser accepts,
# with the series docs/API.md lists.
curl -sf -H "Authorization: Bearer $token" "http://127.0.0.1:$port/metrics" | python3 -c '
import sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
names = {f.name for f in text_string_to_metric_families(sys.stdin.read())}
want = {"capsule_sandboxes", "capsule_sandbox_create_seconds", "capsule_sandbox_suspend_seconds",
        "capsule_sandbox_resume_seconds"}
missing = want - names
if missing:
    sys.exit(f"metrics: missing {sorted(missing)} (have {sorted(names)})")
print(f"metrics: /metrics parses as OpenMetrics ({len(names)} families)")
' || { echo "metrics: FAILED" >&2; exit 1; }
