#!/bin/sh
# Guest init for the virtio-blk end-to-end test. The host wrote a marker at 1 MiB of the
# image; the guest must read it through /dev/vda, write its own marker at 2 MiB (synced),
# read 16 MiB sequentially and report their md5 (the host compares with the image).
# shellcheck disable=SC1091  # exists in the guest (tests/e2e/guest-common.sh)
. /lib/unidev-e2e/guest-common.sh

if e2e_wait_for 20 test -b /dev/vda; then e2e_pass vda-present; else
    e2e_fail vda-present "no /dev/vda"; ls /sys/bus/virtio/devices /sys/block; dmesg | tail -n 30; e2e_finish
fi
e2e_log "size $(cat /sys/block/vda/size) sectors"

host=$(dd if=/dev/vda bs=512 skip=2048 count=1 2>/dev/null | head -c 18)
if [ "$host" = "UNIDEV-HOST-MARKER" ]; then e2e_pass host-marker-read; else
    e2e_fail host-marker-read "read '$host'"
fi

printf 'UNIDEV-GUEST-MARKER' | dd of=/dev/vda bs=512 seek=4096 conv=notrunc,fsync 2>/dev/null
sync
back=$(dd if=/dev/vda bs=512 skip=4096 count=1 iflag=direct 2>/dev/null | head -c 19)
if [ "$back" = "UNIDEV-GUEST-MARKER" ]; then e2e_pass guest-marker-written; else
    e2e_fail guest-marker-written "read back '$back'"
fi

sum=$(dd if=/dev/vda bs=1M count=16 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
echo "UNIDEV-E2E-MD5 $sum"
if [ -n "$sum" ]; then e2e_pass sequential-16m; else e2e_fail sequential-16m "dd failed"; fi
e2e_finish
