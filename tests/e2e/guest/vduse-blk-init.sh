#!/bin/sh
# Guest init for the VDUSE end-to-end test (tests/e2e/vduse.sh): unidev runs *inside*
# the guest (the kernel side of VDUSE is the guest kernel). Both vDPA bus drivers are
# loaded, so the attach must pick the requested one deterministically.
# * unidev.attach=virtio-vdpa (default): the guest's virtio_blk drives a two-queue disk
#   served by unidev; data in the image must be read back through /dev/vda, data
#   written through /dev/vda must land in the image.
# * unidev.attach=vhost-vdpa: the device must appear as /dev/vhost-vdpa-N instead.
# Either way SIGTERM must remove the vDPA device, then the VDUSE device, and exit 0.
# Needs /bin/unidev (static) and the modules vduse virtio_vdpa vhost_vdpa virtio_blk.
# shellcheck disable=SC1091  # exists in the guest (tests/e2e/guest-common.sh)
. /lib/unidev-e2e/guest-common.sh

e2e_check control-node test -c /dev/vduse/control

attach=virtio-vdpa
for arg in $(cat /proc/cmdline); do
    case $arg in unidev.attach=*) attach=${arg#unidev.attach=} ;; esac
done
e2e_log "attach $attach"

img=/tmp/disk.img
dd if=/dev/zero of=$img bs=1M count=32 2>/dev/null
printf 'UNIDEV-IMAGE-MARKER' | dd of=$img bs=512 seek=2048 conv=notrunc 2>/dev/null

RUST_LOG=${UNIDEV_LOG:-info} unidev serve --transport vduse --name vdb0 \
    --attach "$attach" virtio-blk --file $img --queues 2 >/tmp/unidev.log 2>&1 &
pid=$!

stop_daemon() {
    kill -TERM $pid
    if e2e_wait_for 30 sh -c "! kill -0 $pid"; then e2e_pass daemon-exits; else
        e2e_fail daemon-exits "still running"
    fi
    wait $pid
    rc=$?
    if [ $rc = 0 ]; then e2e_pass exit-status; else e2e_fail exit-status "status $rc"; fi
    e2e_check vdpa-device-gone test ! -e /sys/bus/vdpa/devices/vdb0
    e2e_check vduse-device-gone test ! -e /dev/vduse/vdb0
    echo "---- unidev log"
    cat /tmp/unidev.log
}

if [ "$attach" = vhost-vdpa ]; then
    if e2e_wait_for 30 sh -c 'test -c /dev/vhost-vdpa-*'; then e2e_pass vhost-vdpa-node; else
        e2e_fail vhost-vdpa-node "no /dev/vhost-vdpa-N"; cat /tmp/unidev.log; dmesg | tail -n 30
    fi
    drv=$(basename "$(readlink /sys/bus/vdpa/devices/vdb0/driver)")
    if [ "$drv" = vhost_vdpa ]; then e2e_pass bound-vhost-vdpa; else
        e2e_fail bound-vhost-vdpa "bound to '$drv'"
    fi
    e2e_check no-virtio-disk test ! -e /dev/vda
    e2e_check autoprobe-restored grep -qx 1 /sys/bus/vdpa/drivers_autoprobe
    stop_daemon
    e2e_check vhost-vdpa-node-gone sh -c '! test -e /dev/vhost-vdpa-*'
    e2e_finish
fi

if e2e_wait_for 60 test -b /dev/vda; then e2e_pass vda-present; else
    e2e_fail vda-present "no /dev/vda"
    cat /tmp/unidev.log; ls -l /sys/bus/vdpa/devices/ 2>&1; dmesg | tail -n 40
    e2e_finish
fi
drv=$(basename "$(readlink /sys/bus/vdpa/devices/vdb0/driver)")
if [ "$drv" = virtio_vdpa ]; then e2e_pass bound-virtio-vdpa; else
    e2e_fail bound-virtio-vdpa "bound to '$drv'"
fi
e2e_check autoprobe-restored grep -qx 1 /sys/bus/vdpa/drivers_autoprobe
size=$(cat /sys/block/vda/size)
e2e_check two-queues test -d /sys/block/vda/mq/1
if [ "$size" = 65536 ]; then e2e_pass capacity; else e2e_fail capacity "$size sectors"; fi

got=$(dd if=/dev/vda bs=512 skip=2048 count=1 iflag=direct 2>/dev/null | head -c 19)
if [ "$got" = UNIDEV-IMAGE-MARKER ]; then e2e_pass image-marker-read; else
    e2e_fail image-marker-read "read '$got'"
fi

printf 'UNIDEV-GUEST-MARKER' | dd of=/dev/vda bs=512 seek=4096 conv=notrunc,fsync 2>/dev/null
sync
got=$(dd if=$img bs=512 skip=4096 count=1 2>/dev/null | head -c 19)
if [ "$got" = UNIDEV-GUEST-MARKER ]; then e2e_pass guest-write-in-image; else
    e2e_fail guest-write-in-image "image has '$got'"
fi

a=$(dd if=/dev/vda bs=1M count=32 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
b=$(md5sum <$img | cut -d' ' -f1)
if [ "$a" = "$b" ]; then e2e_pass sequential-32m; else e2e_fail sequential-32m "$a != $b"; fi

stop_daemon
e2e_check vda-gone test ! -e /dev/vda
e2e_finish
