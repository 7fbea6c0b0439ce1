#!/usr/bin/env bash
# `make demo`: boot sandboxes, run commands in them, print timings. Runs
# directly on hardware KVM, or inside the nested test host (and says so).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=$(scripts/kvm-mode.sh)
if [ "$mode" = nested ] && [ -z "${CAPSULE_IN_TESTHOST:-}" ]; then
    echo "demo: this machine's /dev/kvm is not hardware virtualization; running inside the nested test host" >&2
    echo "demo: (QEMU TCG emulating AMD SVM: expect everything to be 5-20x slower than on real hardware)" >&2
    exec testhost/run.sh --timeout 900 --env CAPSULE_KERNEL --env CAPSULE_INITRAMFS --env CAPSULE_ROOTFS -- scripts/demo.sh
fi
capsule=target/release/capsule
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }

step capsule run -- uname -a
$capsule run --timings -- uname -a

step "capsule run --cpus 2 --memory 512M --env A=1 --workdir /tmp -- sh -c 'echo \$A; pwd; nproc; free -m | head -2'"
$capsule run --timings --cpus 2 --memory 512M --env A=1 --workdir /tmp -- sh -c 'echo $A; pwd; nproc; free -m | head -2'

step "echo 'hello from the host' | capsule run -- sh -c 'tr a-z A-Z; exit 3'"
set +e
echo 'hello from the host' | $capsule run --timings -- sh -c 'tr a-z A-Z; exit 3'
echo "exit status: $?"
set -e

rootfs=$(mktemp -d)/root.ext4
cp "$CAPSULE_ROOTFS" "$rootfs"
step capsule run --rootfs root.ext4 -- cat /etc/os-release
$capsule run --timings --rootfs "$rootfs" -- cat /etc/os-release
rm -rf "$(dirname "$rootfs")"

step "capsule run --timeout 1 -- sleep 60"
set +e
$capsule run --timings --timeout 1 -- sleep 60
echo "exit status: $?"
set -e

# Snapshots and forks, with sandboxes kept under a private CAPSULE_HOME.
export CAPSULE_HOME
CAPSULE_HOME=$(mktemp -d)
snap="$CAPSULE_HOME/snaps/primed"
step "capsule run --keep --name base -- sh -c 'seq 1 100000 > /tmp/primed; echo primed'"
$capsule run --timings --keep --name base -- sh -c 'seq 1 100000 > /tmp/primed; echo primed'
step capsule snapshot base --to snaps/primed
$capsule snapshot base --to "$snap"
$capsule stop base
step "capsule restore snaps/primed -- wc -l /tmp/primed"
$capsule restore --timings "$snap" -- wc -l /tmp/primed
step "capsule fork snaps/primed --count 3 -- sh -c 'echo \$(hostname) \$(wc -l < /tmp/primed) \$(head -c4 /dev/urandom | od -An -tx1)'"
$capsule fork --timings "$snap" --count 3 -- sh -c 'echo $(hostname) $(wc -l < /tmp/primed) $(head -c4 /dev/urandom | od -An -tx1)'
rm -rf "$CAPSULE_HOME"
