#!/usr/bin/env bash
# Runs schemathesis (PyPI; a client nobody here wrote) against a live
# `capsule serve`, from the checked-in OpenAPI document (a host test checks
# that it is the one the daemon serves): no 5xx, every response in the
# schema, bad input refused with a 4xx. Host tier: the daemon's kernel is a
# stand-in and --max-sandboxes 0 refuses every create (429 host_full) after
# it has been checked, so nothing boots; the guest tier covers boots.
# The event stream never ends, so it is left out here (tests/api.rs and
# the guest tests read it).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v schemathesis >/dev/null || {
    echo "schemathesis: installing it from PyPI" >&2
    pip install -q schemathesis >&2
}
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
