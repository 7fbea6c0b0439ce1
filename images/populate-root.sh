#!/usr/bin/env bash
# Fills a directory with a minimal busybox userland: the shared part of the
# initramfs and the test ext4 root filesystem.
# usage: images/populate-root.sh DIR
set -euo pipefail
root="$1"
busybox=$(command -v busybox)
chmod 0755 "$root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,run,root,home/user,var/tmp,mnt}
chmod 1777 "$root/tmp" "$root/var/tmp"
install -m 0755 "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list-full); do
    [ "$applet" = bin/busybox ] && continue
    mkdir -p "$root/$(dirname "$applet")"
    ln -sf /bin/busybox "$root/$applet"
done
cat > "$root/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/bin/sh
user:x:1000:1000:user:/home/user:/bin/sh
nobody:x:65534:65534:nobody:/:/bin/false
PASSWD
cat > "$root/etc/group" <<'GROUP'
root:x:0:
user:x:1000:
nogroup:x:65534:
GROUP
chown 1000:1000 "$root/home/user"
echo "capsule" > "$root/etc/hostname"
cat > "$root/etc/os-release" <<'OS'
NAME="Capsule test userland"
ID=capsule-busybox
PRETTY_NAME="Capsule busybox userland"
OS
