#!/bin/sh
# Guest init for the virtio-vsock end-to-end test (tests/e2e_upstream.rs): a virtio-vsock
# device whose queues an upstream vhost-user daemon (vhost-device-vsock) runs.
#  * the driver binds and reads the guest CID the host chose (kernel argument
#    unidev.cid=N) from the device's config space;
#  * guest -> host: connect to the host (CID 2) port 5000, send a line, read the host's
#    answer;
#  * host -> guest: listen on port 6000, print UNIDEV-VSOCK-LISTENING, read the line the
#    host sends and answer it.
# /bin/vsock is tests/e2e/guest/vsock.c, built statically by the test.
# shellcheck disable=SC1091  # exists in the guest (tests/e2e/guest-common.sh)
. /lib/unidev-e2e/guest-common.sh

want_cid=$(sed -n 's/.*unidev\.cid=\([0-9]*\).*/\1/p' /proc/cmdline)
bound() { ls /sys/bus/virtio/drivers/vmw_vsock_virtio_transport/ 2>/dev/null | grep -q '^virtio'; }
if e2e_wait_for 20 bound; then e2e_pass vsock-bound; else
    e2e_fail vsock-bound "the virtio-vsock driver did not bind"
    ls /sys/bus/virtio/devices/; dmesg | tail -n 30; e2e_finish
fi

cid=$(vsock cid 2>&1)
if [ "$cid" = "vsock: cid $want_cid" ]; then e2e_pass guest-cid; else
    e2e_fail guest-cid "want cid $want_cid, got '$cid'"
fi

out=$(vsock connect 2 5000 UNIDEV-GUEST-TO-HOST 2>&1)
if [ "$out" = "vsock: got HOST-REPLY UNIDEV-GUEST-TO-HOST" ]; then e2e_pass guest-to-host; else
    e2e_fail guest-to-host "'$out'"
fi

vsock listen 6000 >/tmp/listen.out 2>&1 &
listener=$!
e2e_wait_for 10 grep -q listening /tmp/listen.out || e2e_log "listener: $(cat /tmp/listen.out)"
echo "UNIDEV-VSOCK-LISTENING 6000"
wait "$listener"
rc=$?
if [ "$rc" -eq 0 ] && grep -qx 'vsock: got UNIDEV-HOST-TO-GUEST' /tmp/listen.out; then
    e2e_pass host-to-guest
else
    e2e_fail host-to-guest "status $rc: $(tr '\n' ' ' </tmp/listen.out)"
fi
e2e_finish
