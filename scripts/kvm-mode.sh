#!/usr/bin/env bash
# Prints how guests can run on this machine: "direct" (hardware KVM),
# "nested" (PVM or no usable KVM: use the nested test host), or fails with
# the reason neither is possible.
set -euo pipefail
if [ -e /sys/module/kvm_intel ] || [ -e /sys/module/kvm_amd ]; then
    if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then echo direct; exit 0; fi
    echo "kvm-mode: /dev/kvm exists but is not accessible to $(id -un)" >&2
fi
if command -v qemu-system-x86_64 >/dev/null; then
    if [ -e /sys/module/kvm_pvm ]; then
        echo "kvm-mode: /dev/kvm is PVM (software); guests run inside the nested test host" >&2
    else
        echo "kvm-mode: no hardware KVM; guests run inside the nested test host" >&2
    fi
    echo nested
    exit 0
fi
echo "kvm-mode: no hardware KVM and no qemu-system-x86_64 for the nested test host: guests cannot run here" >&2
exit 1
