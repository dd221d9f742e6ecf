#!/bin/sh
# Guest init for the vhost-user reconnect end-to-end tests (tests/e2e_vhost_user_reconnect.rs).
# Parameters come from the kernel command line:
#
#   unidev.rc_base_kib=K   the region starts K KiB into /dev/vda (a multiple of the chunk)
#   unidev.rc_chunks=N     the region is N chunks long
#   unidev.rc_chunk_kib=C  chunk size in KiB
#   unidev.rc_expect=TAG   first check the region holds pattern TAG (written by an earlier
#                          guest through an earlier frontend)
#   unidev.rc_write=TAG    then write pattern TAG over the region, one O_DIRECT write per
#                          chunk, printing "UNIDEV-RC-CHUNK i" after chunk i completes
#   unidev.rc_pause_us=U   sleep U microseconds between chunks (0: none)
#   unidev.rc_max_kib=M    cap the block layer's request size at M KiB (max_sectors_kb),
#                          so that one chunk is several requests in the ring at once
#
# The pattern of TAG is one 512-byte record per sector: "unidev-TAG-off-" and the
# sector's 12-digit byte offset on the disk, space-padded to 511 bytes, then a newline
# (the host test builds the same bytes). After writing, the guest reads the region back
# with O_DIRECT and compares its md5 with the pattern's. Lastly no block or virtio-ring
# error may be in the kernel log (a request completed twice trips virtio_ring's checks).
# shellcheck disable=SC1091  # exists in the guest (tests/e2e/guest-common.sh)
. /lib/unidev-e2e/guest-common.sh

arg() { sed -n "s/.* unidev\.$1=\([A-Za-z0-9_]*\).*/\1/p" /proc/cmdline; }
base_kib=$(arg rc_base_kib)
chunks=$(arg rc_chunks)
chunk_kib=$(arg rc_chunk_kib)
expect=$(arg rc_expect)
write=$(arg rc_write)
pause=$(arg rc_pause_us)
max_kib=$(arg rc_max_kib)
: "${pause:=0}"
if [ -z "$base_kib" ] || [ -z "$chunks" ] || [ -z "$chunk_kib" ] ||
    [ $((base_kib % chunk_kib)) -ne 0 ]; then
    e2e_fail params "bad parameters: $(cat /proc/cmdline)"
    e2e_finish
fi
first=$((base_kib / chunk_kib))
sectors=$((chunks * chunk_kib * 2))

# pattern TAG > FILE
pattern() {
    awk -v tag="$1" -v base=$((base_kib * 1024)) -v n="$sectors" 'BEGIN {
        for (i = 0; i < n; i++)
            printf "%-511s\n", sprintf("unidev-%s-off-%012d", tag, base + i * 512)
    }'
}

# The region as read through the device now (O_DIRECT: from the backend, not the cache).
region_md5() {
    dd if=/dev/vda bs="${chunk_kib}k" skip="$first" count="$chunks" iflag=direct 2>/dev/null |
        md5sum | cut -d' ' -f1
}

if e2e_wait_for 20 test -b /dev/vda; then e2e_pass vda-present; else
    e2e_fail vda-present "no /dev/vda"; dmesg | tail -n 30; e2e_finish
fi
q=/sys/block/vda/queue
if [ -n "$max_kib" ] && ! echo "$max_kib" >$q/max_sectors_kb; then
    e2e_fail params "cannot set max_sectors_kb to $max_kib"
fi
e2e_log "vda: max_sectors_kb $(cat $q/max_sectors_kb) max_segments $(cat $q/max_segments)" \
    "max_segment_size $(cat $q/max_segment_size) nr_requests $(cat $q/nr_requests)"

if [ -n "$expect" ]; then
    want=$(pattern "$expect" | md5sum | cut -d' ' -f1)
    got=$(region_md5)
    if [ "$got" = "$want" ]; then e2e_pass expected-read; else
        e2e_fail expected-read "region md5 $got, pattern $expect has $want"
    fi
fi

if [ -n "$write" ]; then
    pattern "$write" >/tmp/pattern
    want=$(md5sum </tmp/pattern | cut -d' ' -f1)
    e2e_log "writing $chunks x ${chunk_kib} KiB of pattern $write (md5 $want)"
    i=0
    ok=1
    while [ "$i" -lt "$chunks" ]; do
        if ! dd if=/tmp/pattern of=/dev/vda bs="${chunk_kib}k" skip="$i" seek=$((first + i)) \
            count=1 oflag=direct 2>/tmp/dd.err; then
            e2e_fail chunks-written "chunk $i: $(cat /tmp/dd.err)"
            ok=0
            break
        fi
        echo "UNIDEV-RC-CHUNK $i"
        i=$((i + 1))
        [ "$pause" -eq 0 ] || usleep "$pause"
    done
    [ "$ok" -eq 0 ] || e2e_pass chunks-written
    got=$(region_md5)
    if [ "$got" = "$want" ]; then e2e_pass written-read-back; else
        e2e_fail written-read-back "region md5 $got, pattern $write has $want"
    fi
fi

if dmesg | grep -E 'I/O error|not a head|virtio.*(broken|BUG)|Buffer I/O'; then
    e2e_fail kernel-log "block or virtio errors in the kernel log"
else
    e2e_pass kernel-log
fi
e2e_finish
