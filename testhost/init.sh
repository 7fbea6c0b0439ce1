#!/bin/busybox sh
# PID 1 of the nested test host: load KVM and 9p, mount the host's root
# read-only, run the command chrooted into it, record its status, power off.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
kvm_amd_opts=$(sed -n 's/.*capsule.kvm_amd=\([^ ]*\).*/\1/p' /proc/cmdline | tr , ' ')
for m in $(cat /modules/order); do
    opts=""; [ "$m" = kvm-amd ] && opts=$kvm_amd_opts
    insmod "/modules/$m.ko" $opts 2>/dev/null || echo "testhost: cannot load $m" >&2
done
scratch=$(sed -n 's/.*capsule.scratch=\([^ ]*\).*/\1/p' /proc/cmdline)
fail() { echo "testhost: $*" >&2; poweroff -f; }
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /host || fail "cannot mount the host's root"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 scratch /scratch || fail "cannot mount the scratch directory"
[ -c /dev/kvm ] || echo "testhost: /dev/kvm is missing inside the test host" >&2
mount -t proc proc /host/proc
mount -t sysfs sys /host/sys
mount --bind /dev /host/dev
# devtmpfs has no pts or shm directories of its own; terminals (tmux in
# the interactive-shell test) need devpts.
mkdir -p /host/dev/pts /host/dev/shm
mount -t devpts -o mode=0620,ptmxmode=0666 devpts /host/dev/pts || fail "cannot mount devpts"
mount -t tmpfs tmpfs /host/dev/shm 2>/dev/null
# Writable temporary space lives under /run (TMPDIR points there): /tmp
# stays the host's, read-only, because the checkout may live under it.
mount -t tmpfs -o mode=0755 tmpfs /host/run
mkdir -m 1777 /host/run/tmp
mount --bind /scratch "/host$scratch" || fail "cannot expose the scratch directory"
ip link set lo up 2>/dev/null
# KVM inside logs harmless notices (unhandled MSRs) that would interleave
# with the command's output.
grep -q capsule.verbose /proc/cmdline || dmesg -n 1
# A heartbeat the host watches: a test host whose kernel locks up (QEMU's
# emulated SVM does that now and then) is stopped at once, not at the
# time limit.
sh -c 'n=0; while :; do n=$((n + 1)); echo $n > /scratch/heartbeat; sleep 5; done' testhost-heartbeat &
chroot /host /bin/sh "$scratch/cmd.sh"
echo $? > /scratch/rc
sync
poweroff -f
