#!/bin/sh
# Guest init for the virtio-rng end-to-end test: the hw_random core must pick the virtio
# device and /dev/hwrng must yield bytes.
# shellcheck disable=SC1091  # exists in the guest (tests/e2e/guest-common.sh)
. /lib/unidev-e2e/guest-common.sh

cur() { cat /sys/class/misc/hw_random/rng_current 2>/dev/null; }
virtio_current() { cur | grep -q virtio; }
if e2e_wait_for 20 virtio_current; then e2e_pass rng-current-virtio; else
    e2e_fail rng-current-virtio "rng_current is '$(cur)'"; dmesg | tail -n 20
fi
[ -c /dev/hwrng ] || mknod /dev/hwrng c 10 183
n=$(dd if=/dev/hwrng bs=64 count=4 2>/dev/null | wc -c)
if [ "$n" -eq 256 ]; then e2e_pass hwrng-bytes; else e2e_fail hwrng-bytes "got $n bytes"; fi
distinct=$(dd if=/dev/hwrng bs=64 count=1 2>/dev/null | od -An -tx1 -v | tr ' ' '\n' | grep -v '^$' | sort -u | wc -l)
if [ "$distinct" -gt 16 ]; then e2e_pass hwrng-random; else e2e_fail hwrng-random "only $distinct distinct bytes"; fi
e2e_finish
