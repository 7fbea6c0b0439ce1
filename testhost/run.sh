#!/usr/bin/env bash
# Runs a command inside the nested test host: a QEMU full-emulation VM
# (TCG, `-cpu max`, which emulates AMD SVM with nested paging) booting
# Debian's amd64 kernel with kvm_amd loaded, so /dev/kvm inside it is real
# hardware-virtualization KVM even when this machine's is not.
#
# The host's / is shared read-only over virtio-9p and the command runs
# chrooted into it, in the current directory, so the same binaries and
# tools work unchanged. $TMPDIR inside is a fresh tmpfs (under /run; /tmp
# is the host's, read-only). $CAPSULE_SCRATCH is a writable directory
# shared with the host.
#
# usage: testhost/run.sh [--timeout SECONDS] [--env NAME]... -- command [args...]
# Exits with the command's status; 124 if the test host timed out or its
# heartbeat (written every 5 s) stopped for CAPSULE_TESTHOST_STALL seconds
# (60): its kernel locked up, which QEMU's emulated SVM does now and then;
# 125 if the test host itself died before the command finished (its kernel
# panicked, or QEMU was killed).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/capsule/testhost"
timeout_s=3000
# A test host whose heartbeat stops this long has locked up.
stall_s="${CAPSULE_TESTHOST_STALL:-60}"
mem="${CAPSULE_TESTHOST_MEM:-6G}"
cpus="${CAPSULE_TESTHOST_CPUS:-2}"
pass_env=()
while [ $# -gt 0 ]; do
    case "$1" in
        --timeout) timeout_s="$2"; shift 2 ;;
        --env) pass_env+=("$2"); shift 2 ;;
        --) shift; break ;;
        *) echo "testhost: unknown option $1" >&2; exit 2 ;;
    esac
done
[ $# -gt 0 ] || { echo "usage: $0 [--timeout S] [--env NAME]... -- command..." >&2; exit 2; }

log() { echo "testhost: $*" >&2; }

command -v qemu-system-x86_64 >/dev/null || { log "qemu-system-x86_64 missing (apt-get install qemu-system-x86)"; exit 1; }
command -v busybox >/dev/null || { log "busybox missing (apt-get install busybox-static)"; exit 1; }

# 1. Debian's amd64 kernel, newest ABI available, unpacked once per machine.
pkg=$(apt-cache search --names-only '^linux-image-[0-9.]+-[0-9]+-amd64-unsigned$' | awk '{print $1}' | sort -V | tail -n 1)
if [ -z "$pkg" ]; then
    log "no linux-image-*-amd64-unsigned package found; run 'apt-get update'"
    exit 1
fi
kdir="$cache/$pkg"
if [ ! -f "$kdir/.complete" ]; then
    log "fetching $pkg for the test host"
    rm -rf "$kdir"; mkdir -p "$kdir"
    (cd "$kdir" && apt-get download "$pkg" >&2)
    dpkg-deb -x "$kdir"/*.deb "$kdir/root"
    rm -f "$kdir"/*.deb
    touch "$kdir/.complete"
fi
kver=$(ls "$kdir/root/lib/modules" | head -n 1)
vmlinuz="$kdir/root/boot/vmlinuz-$kver"

# 2. The test host's initramfs: busybox, the KVM and 9p modules, our init.
modules="irqbypass kvm ccp kvm-amd virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci netfs fscache 9pnet 9pnet_virtio 9p vsock vmw_vsock_virtio_transport_common vhost_iotlb vhost vhost_vsock"
initrd_key=$(cat "$here/init.sh" <(echo "$modules") <(busybox | head -n 1) | sha256sum | cut -c1-16)
initrd="$kdir/initrd-$initrd_key.cpio.gz"
if [ ! -f "$initrd" ]; then
    stage=$(mktemp -d)
    mkdir -p "$stage"/{bin,dev,proc,sys,host,scratch,modules}
    cp "$(command -v busybox)" "$stage/bin/busybox"
    cp "$here/init.sh" "$stage/init"
    chmod +x "$stage/init"
    for m in $modules; do
        f=$(find "$kdir/root/lib/modules/$kver" -name "$m.ko*" | head -n 1)
        [ -n "$f" ] || { log "module $m not found in $pkg"; exit 1; }
        case "$f" in
            *.ko.xz) xz -dc "$f" > "$stage/modules/$m.ko" ;;
            *.ko.zst) zstd -qdc "$f" > "$stage/modules/$m.ko" ;;
            *) cp "$f" "$stage/modules/$m.ko" ;;
        esac
    done
    echo "$modules" > "$stage/modules/order"
    (cd "$stage" && find . | cpio -o -H newc --quiet | gzip -1) > "$initrd.tmp"
    mv "$initrd.tmp" "$initrd"
    rm -rf "$stage"
fi

# 3. The command, written where the test host's init finds it.
runs="$cache/runs"
mkdir -p "$runs"
scratch=$(mktemp -d "$runs/run.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
{
    echo "export PATH='$PATH'"
    echo "export HOME='$HOME'"
    echo "export CAPSULE_SCRATCH='$scratch'"
    echo "export TMPDIR=/run/tmp"
    echo "export CAPSULE_IN_TESTHOST=1"
    for name in "${pass_env[@]}"; do
        if [ -n "${!name+x}" ]; then
            printf 'export %s=%q\n' "$name" "${!name}"
        fi
    done
    printf 'cd %q\n' "$PWD"
    printf '%q ' "$@"
    echo
} > "$scratch/cmd.sh"

# The guest's console is our stdout; the kernel stays quiet unless asked.
append="console=ttyS0 panic=-1 quiet capsule.scratch=$scratch"
[ -n "${CAPSULE_TESTHOST_VERBOSE:-}" ] && append="console=ttyS0 panic=-1 capsule.verbose capsule.scratch=$scratch"
# More words for the test host's kernel command line, for experiments
# (capsule.kvm_amd=opt=val,... loads kvm_amd with those options).
append="$append ${CAPSULE_TESTHOST_APPEND:-}"
# Watch the heartbeat the test host writes every 5 s; kill QEMU if it
# stops changing (checked against the host's clock, not the test host's).
(
    last="" seen=$(date +%s)
    while sleep 5; do
        beat=$(cat "$scratch/heartbeat" 2>/dev/null || true)
        now=$(date +%s)
        if [ "$beat" != "$last" ]; then
            last=$beat seen=$now
        elif [ -n "$last" ] && [ $((now - seen)) -ge "$stall_s" ]; then
            touch "$scratch/stalled"
            kill -KILL "$(cat "$scratch/qemu.pid")" 2>/dev/null
            break
        fi
    done
) &
watcher=$!
trap 'kill "$watcher" 2>/dev/null || true; rm -rf "$scratch"' EXIT
set +e
started=$(date +%s)
timeout --foreground -k 10 "$timeout_s" qemu-system-x86_64 \
    -accel tcg,thread=multi -M q35 -cpu max -smp "$cpus" -m "$mem" \
    -nographic -no-reboot -nic none -pidfile "$scratch/qemu.pid" \
    -kernel "$vmlinuz" -initrd "$initrd" -append "$append" \
    -virtfs "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap" \
    -virtfs "local,path=$scratch,mount_tag=scratch,security_model=none,multidevs=remap" \
    < /dev/null | sed -u -e 's/\r//g; s/\x1b\[[0-9;?]*[a-zA-Z]//g; s/\x1bc//g; s/\x1b(B//g; s/\x0f//g' -e '/^SeaBIOS (version/d; /^Booting from ROM/d; /^$/d' \
    | tee "$scratch/console"
qemu_rc=${PIPESTATUS[0]}
set -e
if [ -f "$scratch/stalled" ]; then
    log "the test host stopped responding (no heartbeat for ${stall_s}s); stopped it"
    exit 124
fi
# 137: QEMU ignored the time limit's TERM and got its KILL.
if [ "$qemu_rc" = 124 ] || { [ "$qemu_rc" = 137 ] && [ $(($(date +%s) - started)) -ge "$timeout_s" ]; }; then
    log "the test host timed out after ${timeout_s}s"
    exit 124
fi
if [ ! -f "$scratch/rc" ]; then
    # The test host's own kernel panicked (QEMU's emulated SVM has made it
    # do so under many concurrent guests, see docs/TESTING.md), or QEMU
    # was killed: the test host died, whatever the command was doing.
    # Its last lines: a guest's panic the test printed earlier is not it.
    panic=$(tail -n 60 "$scratch/console" | grep -m 1 'Kernel panic - not syncing' || true)
    if [ -n "$panic" ]; then
        log "the test host's kernel panicked: $panic"
        exit 125
    fi
    if [ "$qemu_rc" -gt 128 ]; then
        log "QEMU running the test host was killed by signal $((qemu_rc - 128))"
        exit 125
    fi
    log "the test host stopped without running the command (qemu exit $qemu_rc)"
    exit 1
fi
exit "$(cat "$scratch/rc")"
