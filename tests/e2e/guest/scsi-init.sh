#!/bin/sh
# Guest init for the virtio-scsi end-to-end test (tests/e2e_upstream.rs): a virtio-scsi
# HBA whose queues an upstream vhost-user daemon (vhost-device-scsi) runs, with one LUN
# backed by the host's image file. The host wrote UNIDEV-HOST-MARKER at 1 MiB of the
# image; the guest must see the disk (/dev/sda, the size of the image), read the marker,
# write a pattern of its own at 2 MiB (synced, then read back bypassing the page cache)
# and report the md5 of the image's first 4 MiB as read from the disk.
# shellcheck disable=SC1091  # exists in the guest (tests/e2e/guest-common.sh)
. /lib/unidev-e2e/guest-common.sh

if e2e_wait_for 30 test -b /dev/sda; then e2e_pass sda-present; else
    e2e_fail sda-present "no /dev/sda"
    ls /sys/bus/virtio/devices/ /sys/block; dmesg | tail -n 40; e2e_finish
fi
e2e_log "sda: $(cat /sys/block/sda/device/vendor 2>/dev/null) $(cat /sys/block/sda/device/model 2>/dev/null)"
echo "UNIDEV-E2E-SECTORS $(cat /sys/block/sda/size)"

host=$(dd if=/dev/sda bs=512 skip=2048 count=1 iflag=direct 2>/dev/null | head -c 18)
if [ "$host" = "UNIDEV-HOST-MARKER" ]; then e2e_pass host-marker-read; else
    e2e_fail host-marker-read "read '$host'"
fi

# 64 KiB of a guest pattern: "UNIDEV-GUEST-SCSI-" and a block number, per 512-byte block.
i=0
while [ $i -lt 128 ]; do
    printf 'UNIDEV-GUEST-SCSI-%04d' $i | dd of=/tmp/pattern bs=512 seek=$i conv=notrunc,sync 2>/dev/null
    i=$((i + 1))
done
want=$(md5sum </tmp/pattern | cut -d' ' -f1)
if dd if=/tmp/pattern of=/dev/sda bs=64k seek=32 count=1 oflag=direct conv=notrunc,fsync 2>/dev/null; then
    sync
    back=$(dd if=/dev/sda bs=64k skip=32 count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
    if [ "$back" = "$want" ]; then e2e_pass guest-pattern-written; else
        e2e_fail guest-pattern-written "read back md5 $back, wrote $want"
    fi
else
    e2e_fail guest-pattern-written "dd to /dev/sda failed"; dmesg | tail -n 20
fi
echo "UNIDEV-E2E-PATTERN-MD5 $want"

sum=$(dd if=/dev/sda bs=1M count=4 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
echo "UNIDEV-E2E-MD5 $sum"
e2e_finish
