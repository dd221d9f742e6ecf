#!/bin/sh
# Guest init for the virtio-fs end-to-end tests (tests/e2e_upstream.rs): a virtio-fs
# device whose queues an upstream vhost-user daemon (virtiofsd) runs on a host
# directory. The driver (built in) must read the tag the host chose (kernel argument
# unidev.tag=TAG) from the device's config space; the guest mounts it, reads the file the
# host wrote (host.txt), writes one (guest.txt) that the host reads afterwards, and
# unmounts (which flushes it).
# shellcheck disable=SC1091  # exists in the guest (tests/e2e/guest-common.sh)
. /lib/unidev-e2e/guest-common.sh

tag=$(sed -n 's/.*unidev\.tag=\([^ ]*\).*/\1/p' /proc/cmdline)
has_tag() { cat /sys/fs/virtiofs/*/tag 2>/dev/null | grep -qx "$tag"; }
if e2e_wait_for 20 has_tag; then e2e_pass fs-tag; else
    e2e_fail fs-tag "no virtio-fs device with tag '$tag': $(cat /sys/fs/virtiofs/*/tag 2>&1)"
    ls /sys/bus/virtio/devices/; dmesg | tail -n 30; e2e_finish
fi

mkdir -p /mnt
if mount -t virtiofs "$tag" /mnt; then e2e_pass fs-mount; else
    e2e_fail fs-mount "mount -t virtiofs $tag failed"; dmesg | tail -n 20; e2e_finish
fi
got=$(cat /mnt/host.txt 2>&1)
if [ "$got" = "UNIDEV-HOST-FILE 0123456789" ]; then e2e_pass host-file-read; else
    e2e_fail host-file-read "read '$got'"
fi
if echo UNIDEV-GUEST-FILE >/mnt/guest.txt && sync && [ "$(cat /mnt/guest.txt)" = UNIDEV-GUEST-FILE ]; then
    e2e_pass guest-file-written
else
    e2e_fail guest-file-written "cannot write /mnt/guest.txt"
fi
e2e_check fs-umount umount /mnt
e2e_finish
