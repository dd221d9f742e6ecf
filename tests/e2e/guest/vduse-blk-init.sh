#!/bin/sh
# Guest init of the VDUSE end-to-end tests (tests/e2e_vduse.rs). unidev runs *inside* the
# guest: the kernel side of VDUSE is the guest kernel. Both vDPA bus drivers are loaded,
# so every attach must pick the requested one. Kernel argument unidev.scenario= selects:
#
# * virtio-vdpa: unidev serves the host's image (a QEMU virtio disk with serial
#   "unidev-image", i.e. a block device here) as a two-queue VDUSE virtio-blk attached to
#   virtio_vdpa; this kernel's virtio_blk drives it. The host's marker is read through
#   it; a random 1 MiB pattern is written, synced, read back from the device (page cache
#   dropped) and its md5 printed for the host, which finds it in the image file after
#   the guest powered off. SIGTERM removes the vDPA device, then the VDUSE device.
# * vhost-vdpa: `unidev run devices.toml` (a vduse entry with attach = "vhost-vdpa") on a
#   tmpfs image; /dev/vhost-vdpa-N appears, and `unidev vdpa-info` (the vhost-vdpa
#   ioctls) must report the device id, features and config space unidev logged when it
#   created the device. Then the daemon is SIGKILLed; with no daemon, opening the node
#   sends the kernel's reset request, which times out after msg_timeout (lowered to 1 s)
#   and leaves the device broken; a new daemon removes the broken left-over from the vDPA
#   bus, creates the device again and attaches it.
# * kill: unidev serves the host's image attached to virtio_vdpa and is SIGKILLed. What
#   the 6.12 kernel does (checked here): the VDUSE and vDPA devices and the disk stay, and
#   I/O on the disk neither completes nor fails — the reader sleeps (state D) with its
#   request in the ring, as nothing in VDUSE or virtio_blk times it out — while the rest
#   of the kernel stays responsive. A new unidev with the same name takes the device over
#   and resumes the rings: the waiting read completes with the right data, new I/O works.
#   After a clean stop, a third unidev creates the device from scratch.
# Every daemon runs under seccomp policy unidev.seccomp= (default kill): its VDUSE thread
# and vring workers must show Seccomp: 2, and the kernel must log no violation.
# Needs /bin/unidev (static) and the modules vduse virtio_vdpa vhost_vdpa virtio_blk.
# shellcheck disable=SC1091  # exists in the guest (tests/e2e/guest-common.sh)
. /lib/unidev-e2e/guest-common.sh

NAME=vdb0
scenario=virtio-vdpa
# Every daemon runs its VDUSE thread and vring workers under this seccomp policy.
SECCOMP=kill
# shellcheck disable=SC2013  # the command line is one line of words
for arg in $(cat /proc/cmdline); do
    case $arg in
    unidev.scenario=*) scenario=${arg#unidev.scenario=} ;;
    unidev.seccomp=*) SECCOMP=${arg#unidev.seccomp=} ;;
    esac
done
e2e_log "scenario $scenario"
# Without auditd the kernel prints audit records through printk_ratelimit() (10 per 5 s):
# every seccomp record must reach the log.
echo 0 >/proc/sys/kernel/printk_ratelimit
e2e_check control-node test -c /dev/vduse/control

# The host's image: the QEMU virtio disk with serial "unidev-image".
host_disk() {
    for d in /sys/block/vd*; do
        [ "$(cat "$d/serial" 2>/dev/null)" = unidev-image ] || continue
        echo "/dev/${d##*/}"
        return 0
    done
    return 1
}

# The disk virtio_blk made of the VDUSE device (under the vDPA device in sysfs).
vduse_disk() {
    for d in "/sys/bus/vdpa/devices/$NAME"/virtio*/block/*; do
        [ -e "$d" ] || continue
        echo "/dev/${d##*/}"
        return 0
    done
    return 1
}

md5() { md5sum "$@" | cut -d' ' -f1; }
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

# start_serve LOG ARGS...: unidev serve of the VDUSE device in the background ($pid).
start_serve() {
    _log=$1
    shift
    RUST_LOG=${UNIDEV_LOG:-info} unidev serve --transport vduse --name $NAME \
        --seccomp "$SECCOMP" "$@" >"$_log" 2>&1 &
    pid=$!
}

# check_seccomp TAG [WORKERS]: the daemon's VDUSE thread (and, with WORKERS, its vring
# workers) run under a seccomp filter (Seccomp: 2 in /proc); its other threads do not.
check_seccomp() {
    _seen=
    _wrong=
    for _t in /proc/$pid/task/*; do
        _comm=$(cat "$_t/comm" 2>/dev/null) || continue
        _mode=$(sed -n 's/^Seccomp:[[:space:]]*//p' "$_t/status" 2>/dev/null)
        case $_comm in
        vduse-* | vring-worker-*) _want=2 _seen="$_seen $_comm" ;;
        *) _want=0 ;;
        esac
        [ "$_mode" = "$_want" ] || _wrong="$_wrong $_comm=$_mode"
    done
    _ok=1
    [ -z "$_wrong" ] || _ok=
    case $_seen in *vduse-$NAME*) ;; *) _ok= ;; esac
    if [ -n "$2" ]; then case $_seen in *vring-worker-*) ;; *) _ok= ;; esac; fi
    if [ -n "$_ok" ]; then e2e_pass "$1-seccomp"; else
        e2e_fail "$1-seccomp" "filtered threads:$_seen; wrong mode:$_wrong"
    fi
}

# check_no_seccomp_violations: the kernel logged no call outside an allow-list (audit
# records of type 1326; the guest boots with audit=1 so that they reach the kernel log).
check_no_seccomp_violations() {
    if dmesg | grep 'type=1326' >/tmp/seccomp-audit; then
        sed 's/^/UNIDEV-SECCOMP-AUDIT /' /tmp/seccomp-audit
        e2e_fail no-seccomp-violations "$(wc -l </tmp/seccomp-audit) audit record(s)"
    else
        e2e_pass no-seccomp-violations
    fi
}

# stop_daemon TAG LOG: SIGTERM must remove the vDPA device, then the VDUSE device, and
# exit 0.
stop_daemon() {
    kill -TERM $pid
    if e2e_wait_for 30 sh -c "! kill -0 $pid"; then e2e_pass "$1-daemon-exits"; else
        e2e_fail "$1-daemon-exits" "still running"
    fi
    wait $pid
    _rc=$?
    if [ $_rc = 0 ]; then e2e_pass "$1-exit-status"; else e2e_fail "$1-exit-status" "status $_rc"; fi
    e2e_check "$1-vdpa-device-gone" test ! -e /sys/bus/vdpa/devices/$NAME
    e2e_check "$1-vduse-device-gone" test ! -e /dev/vduse/$NAME
    echo "---- $2"
    cat "$2"
}

# wait_disk TAG LOG: wait for the VDUSE disk ($disk).
wait_disk() {
    if e2e_wait_for 60 vduse_disk; then
        disk=$(vduse_disk)
        e2e_pass "$1-disk-present"
        return 0
    fi
    e2e_fail "$1-disk-present" "no disk on vDPA device $NAME"
    cat "$2"
    ls -l /sys/bus/vdpa/devices/ 2>&1
    dmesg | tail -n 40
    e2e_finish
}

# write_pattern TAG OFFSET_MIB: 1 MiB of random data at OFFSET_MIB on $disk, synced, read
# back from the device; prints UNIDEV-E2E-PATTERN-TAG <md5> <offset MiB> for the host.
write_pattern() {
    dd if=/dev/urandom of="/tmp/pattern-$1" bs=64k count=16 2>/dev/null
    dd if="/tmp/pattern-$1" of="$disk" bs=64k seek=$(($2 * 16)) count=16 conv=notrunc,fsync \
        2>/dev/null
    sync
    drop_caches
    _want=$(md5 "/tmp/pattern-$1")
    _got=$(dd if="$disk" bs=64k skip=$(($2 * 16)) count=16 2>/dev/null | md5sum | cut -d' ' -f1)
    if [ "$_got" = "$_want" ]; then e2e_pass "pattern-$1-read-back"; else
        e2e_fail "pattern-$1-read-back" "wrote $_want, read $_got"
    fi
    echo "UNIDEV-E2E-PATTERN-$1 $_want $2"
}

scenario_virtio_vdpa() {
    img=$(host_disk) || { e2e_fail host-disk "no disk with serial unidev-image"; e2e_finish; }
    start_serve /tmp/unidev.log --attach virtio-vdpa virtio-blk --file "$img" --queues 2
    wait_disk vv /tmp/unidev.log
    check_seccomp vv workers
    drv=$(basename "$(readlink /sys/bus/vdpa/devices/$NAME/driver)")
    if [ "$drv" = virtio_vdpa ]; then e2e_pass bound-virtio-vdpa; else
        e2e_fail bound-virtio-vdpa "bound to '$drv'"
    fi
    e2e_check autoprobe-restored grep -qx 1 /sys/bus/vdpa/drivers_autoprobe
    e2e_check two-queues test -d "/sys/block/${disk##*/}/mq/1"
    want=$(cat "/sys/block/${img##*/}/size")
    got=$(cat "/sys/block/${disk##*/}/size")
    if [ "$got" = "$want" ]; then e2e_pass capacity; else
        e2e_fail capacity "$got sectors, the image has $want"
    fi
    got=$(dd if="$disk" bs=512 skip=2048 count=1 2>/dev/null | head -c 19)
    if [ "$got" = UNIDEV-IMAGE-MARKER ]; then e2e_pass image-marker-read; else
        e2e_fail image-marker-read "read '$got'"
    fi
    write_pattern A 4
    drop_caches
    a=$(md5 "$disk")
    b=$(md5 "$img")
    if [ "$a" = "$b" ]; then e2e_pass sequential-whole-disk; else
        e2e_fail sequential-whole-disk "$a != $b"
    fi
    check_seccomp vv-after-io workers
    stop_daemon vv /tmp/unidev.log
    e2e_check vv-disk-gone test ! -e "$disk"
}

# check_vdpa_info TAG NODE: unidev vdpa-info must report what unidev logged at creation.
check_vdpa_info() {
    if ! unidev vdpa-info "$2" >/tmp/info 2>&1; then
        e2e_fail "$1-vdpa-info" "$(cat /tmp/info)"
        return
    fi
    sed 's/^/UNIDEV-VDPA-INFO /' /tmp/info
    # "VDUSE device vdb0 created (type 2, features 0x..., ..., config HEX)"
    created=$(sed -n 's/.*VDUSE device '$NAME' created (type \([0-9]*\), features \(0x[0-9a-f]*\),.* config \([0-9a-f]*\)).*/\1 \2 \3/p' /tmp/unidev.log | tail -n 1)
    # shellcheck disable=SC2086  # split into type, features, config
    set -- "$1" $created
    e2e_check "$1-device-id" grep -qx "device_id $2 (virtio-blk)" /tmp/info
    e2e_check "$1-features" grep -qx "features $3" /tmp/info
    e2e_check "$1-config-space" grep -qx "config $4" /tmp/info
    e2e_check "$1-capacity" grep -qx "blk.capacity 98304" /tmp/info
    e2e_check "$1-num-queues" grep -qx "blk.num_queues 2" /tmp/info
    e2e_check "$1-vqs" grep -qx "vqs 2" /tmp/info
}

scenario_vhost_vdpa() {
    dd if=/dev/zero of=/tmp/disk.img bs=1M count=48 2>/dev/null
    cat >/tmp/devices.toml <<EOF
seccomp = "$SECCOMP"

[[device]]
name = "$NAME"
type = "virtio-blk"
transport = "vduse"
attach = "vhost-vdpa"
file = "/tmp/disk.img"
queues = 2
EOF
    RUST_LOG=info unidev run /tmp/devices.toml >/tmp/unidev.log 2>&1 &
    pid=$!
    if e2e_wait_for 30 sh -c 'test -c /dev/vhost-vdpa-*'; then e2e_pass vhost-vdpa-node; else
        e2e_fail vhost-vdpa-node "no /dev/vhost-vdpa-N"
        cat /tmp/unidev.log
        dmesg | tail -n 30
        e2e_finish
    fi
    node=$(ls /dev/vhost-vdpa-*)
    check_seccomp vh
    drv=$(basename "$(readlink /sys/bus/vdpa/devices/$NAME/driver)")
    if [ "$drv" = vhost_vdpa ]; then e2e_pass bound-vhost-vdpa; else
        e2e_fail bound-vhost-vdpa "bound to '$drv'"
    fi
    if vduse_disk >/dev/null; then e2e_fail no-virtio-disk "$(vduse_disk) appeared"; else
        e2e_pass no-virtio-disk
    fi
    e2e_check autoprobe-restored grep -qx 1 /sys/bus/vdpa/drivers_autoprobe
    check_vdpa_info first "$node"

    # The daemon dies; with nobody to answer, the reset that opening the node sends
    # times out and the kernel marks the device broken.
    kill -9 $pid
    wait $pid
    e2e_check broken-left-over test -c /dev/vduse/$NAME
    echo 1 >/sys/class/vduse/$NAME/msg_timeout
    if timeout 20 unidev vdpa-info "$node" >/tmp/dead.out 2>&1; then
        e2e_fail open-without-daemon-fails "vdpa-info succeeded: $(cat /tmp/dead.out)"
    else
        e2e_pass open-without-daemon-fails
        cat /tmp/dead.out
    fi
    # A new daemon removes the broken device from the vDPA bus and creates it again.
    RUST_LOG=info unidev run /tmp/devices.toml >/tmp/unidev.log 2>&1 &
    pid=$!
    # (The broken device's node is there until the new daemon removed it.)
    if e2e_wait_for 30 grep -q "$NAME: VDUSE device serving" /tmp/unidev.log &&
        test -c /dev/vhost-vdpa-*; then
        e2e_pass recreated-node
    else
        e2e_fail recreated-node "no /dev/vhost-vdpa-N"
        cat /tmp/unidev.log
    fi
    e2e_check removed-broken grep -q "left over and broken" /tmp/unidev.log
    check_vdpa_info recreated "$(ls /dev/vhost-vdpa-*)"
    stop_daemon vh /tmp/unidev.log
    e2e_check vhost-vdpa-node-gone sh -c '! test -e /dev/vhost-vdpa-*'
}

scenario_kill() {
    img=$(host_disk) || { e2e_fail host-disk "no disk with serial unidev-image"; e2e_finish; }
    start_serve /tmp/unidev-1.log --attach virtio-vdpa virtio-blk --file "$img" --queues 2
    wait_disk first /tmp/unidev-1.log
    write_pattern A 8

    kill -9 $pid
    wait $pid
    e2e_check vduse-device-kept test -c /dev/vduse/$NAME
    e2e_check vdpa-device-kept test -e /sys/bus/vdpa/devices/$NAME
    e2e_check disk-kept test -b "$disk"

    # I/O with no daemon: the read waits in the ring; it neither completes nor fails.
    drop_caches
    dd if="$disk" of=/tmp/waiting.out bs=64k skip=128 count=16 2>/tmp/waiting.err &
    reader=$!
    sleep 3
    state=$(cut -d' ' -f3 /proc/$reader/stat 2>/dev/null)
    if [ "$state" = D ]; then e2e_pass io-waits-for-a-daemon; else
        e2e_fail io-waits-for-a-daemon "reader state '$state': $(cat /tmp/waiting.err)"
    fi
    cat /proc/$reader/stack 2>/dev/null
    # The rest of the kernel is responsive (no lock held across the wait).
    e2e_log "responsive check from uptime $(cut -d' ' -f1 /proc/uptime)"
    if timeout 20 sh -c 'dd if=/dev/urandom of=/tmp/busy bs=64k count=64 2>/dev/null &&
        md5sum /tmp/busy >/dev/null && ls /sys/bus/vdpa/devices >/dev/null &&
        cat /sys/block/*/size >/dev/null && ps >/dev/null'; then
        e2e_pass kernel-responsive
    else
        e2e_fail kernel-responsive "commands did not finish within 20 s"
    fi
    e2e_log "responsive check done at uptime $(cut -d' ' -f1 /proc/uptime)"

    # A new daemon with the same name takes the device over; the waiting read completes.
    start_serve /tmp/unidev-2.log --attach virtio-vdpa virtio-blk --file "$img" --queues 2
    if e2e_wait_for 60 sh -c "! kill -0 $reader"; then e2e_pass waiting-io-completed; else
        e2e_fail waiting-io-completed "the reader still waits"
        cat /tmp/unidev-2.log
        # Any further I/O on the disk would wait too.
        e2e_finish
    fi
    wait $reader
    rc=$?
    if [ $rc = 0 ] && [ "$(md5 /tmp/waiting.out)" = "$(md5 /tmp/pattern-A)" ]; then
        e2e_pass waiting-io-data
    else
        e2e_fail waiting-io-data "status $rc, $(cat /tmp/waiting.err)"
    fi
    e2e_check taken-over grep -q "taking it over" /tmp/unidev-2.log
    e2e_check same-disk test "$(vduse_disk)" = "$disk"
    write_pattern B 12
    check_seccomp second workers
    stop_daemon second /tmp/unidev-2.log
    e2e_check second-disk-gone test ! -e "$disk"

    # After a clean stop, the device is created from scratch.
    start_serve /tmp/unidev-3.log --attach virtio-vdpa virtio-blk --file "$img" --queues 2
    wait_disk third /tmp/unidev-3.log
    e2e_check third-created grep -q "VDUSE device $NAME created" /tmp/unidev-3.log
    drop_caches
    got=$(dd if="$disk" bs=64k skip=192 count=16 2>/dev/null | md5sum | cut -d' ' -f1)
    if [ "$got" = "$(md5 /tmp/pattern-B)" ]; then e2e_pass third-reads-pattern-B; else
        e2e_fail third-reads-pattern-B "read $got"
    fi
    stop_daemon third /tmp/unidev-3.log
    echo "---- first daemon (killed)"
    cat /tmp/unidev-1.log
}

# daemon-surface: examples/daemon_blk (an upstream-style main on unidev's drop-in for
# vhost-user-backend's daemon; /bin/daemon-blk) serves the host's image as a VDUSE
# virtio-blk attached to virtio_vdpa; the guest writes and reads a pattern; a line on the
# daemon's stdin ends its session: the vDPA and VDUSE devices go, and it exits 0.
scenario_daemon_surface() {
    img=$(host_disk) || { e2e_fail host-disk "no disk with serial unidev-image"; e2e_finish; }
    mkfifo /tmp/daemon-blk.in
    RUST_LOG=${UNIDEV_LOG:-info} daemon-blk vduse $NAME "$img" </tmp/daemon-blk.in \
        >/tmp/daemon-blk.log 2>&1 &
    pid=$!
    # Hold the fifo open so that the daemon's stdin stays open until we write.
    exec 7>/tmp/daemon-blk.in
    wait_disk ds /tmp/daemon-blk.log
    drv=$(basename "$(readlink /sys/bus/vdpa/devices/$NAME/driver)")
    if [ "$drv" = virtio_vdpa ]; then e2e_pass ds-bound-virtio-vdpa; else
        e2e_fail ds-bound-virtio-vdpa "bound to '$drv'"
    fi
    got=$(dd if="$disk" bs=512 skip=2048 count=1 2>/dev/null | head -c 19)
    if [ "$got" = UNIDEV-IMAGE-MARKER ]; then e2e_pass ds-image-marker-read; else
        e2e_fail ds-image-marker-read "read '$got'"
    fi
    write_pattern C 6
    echo stop >&7
    exec 7>&-
    if e2e_wait_for 30 sh -c "! kill -0 $pid"; then e2e_pass ds-daemon-exits; else
        e2e_fail ds-daemon-exits "still running"
    fi
    wait $pid
    _rc=$?
    if [ $_rc = 0 ]; then e2e_pass ds-exit-status; else e2e_fail ds-exit-status "status $_rc"; fi
    e2e_check ds-vdpa-device-gone test ! -e /sys/bus/vdpa/devices/$NAME
    e2e_check ds-vduse-device-gone test ! -e /dev/vduse/$NAME
    echo "---- /tmp/daemon-blk.log"
    cat /tmp/daemon-blk.log
}

case $scenario in
daemon-surface) scenario_daemon_surface ;;
virtio-vdpa) scenario_virtio_vdpa ;;
vhost-vdpa) scenario_vhost_vdpa ;;
kill) scenario_kill ;;
*) e2e_fail scenario "unknown scenario '$scenario'" ;;
esac
check_no_seccomp_violations
e2e_finish
