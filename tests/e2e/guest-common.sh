# shellcheck shell=sh
# Guest side of the unidev e2e harness (busybox ash). A guest /init does:
#
#   #!/bin/sh
#   . /lib/unidev-e2e/guest-common.sh      # mounts, loads modules
#   e2e_check probe-ok test -e /sys/bus/pci/drivers/foo/0000:00:03.0
#   e2e_finish                              # powers off
#
# Sourcing it mounts /proc, /sys, /dev (devtmpfs), /dev/pts and /dev/shm
# (/ itself is the writable initramfs, /tmp included), inserts the modules
# listed in /lib/unidev-e2e/modules (dependency order, written by
# mkinitramfs.sh) and installs an EXIT trap that reports a failure if the
# script dies or reports nothing, then powers off.
# Set E2E_NO_MODULES=1 before sourcing to skip the module loading.
#
# Result lines, which run-qemu.sh looks for on the serial console:
#   UNIDEV-E2E-RESULT: PASS <name>
#   UNIDEV-E2E-RESULT: FAIL <name> <reason>

export PATH=/sbin:/bin:/usr/sbin:/usr/bin
E2E_NPASS=0
E2E_NFAIL=0

e2e_log() { echo "unidev-e2e: $*"; }

e2e_pass() {
    echo "UNIDEV-E2E-RESULT: PASS $1"
    E2E_NPASS=$((E2E_NPASS + 1))
}

# e2e_fail NAME REASON...
e2e_fail() {
    _e2e_name=$1
    shift
    echo "UNIDEV-E2E-RESULT: FAIL $_e2e_name ${*:-failed}"
    E2E_NFAIL=$((E2E_NFAIL + 1))
}

# e2e_check NAME CMD [ARGS...]: PASS if CMD succeeds, else FAIL with its
# exit status; CMD's output is shown in both cases.
e2e_check() {
    _e2e_name=$1
    shift
    if "$@"; then
        e2e_pass "$_e2e_name"
    else
        e2e_fail "$_e2e_name" "exit status $?: $*"
    fi
}

# e2e_wait_for SECONDS CMD [ARGS...]: poll CMD (every 0.1 s) until it
# succeeds; returns 1 on timeout.
e2e_wait_for() {
    _e2e_n=$(($1 * 10))
    shift
    while [ "$_e2e_n" -gt 0 ]; do
        "$@" >/dev/null 2>&1 && return 0
        usleep 100000
        _e2e_n=$((_e2e_n - 1))
    done
    return 1
}

# e2e_find_pci VENDOR DEVICE: print the sysfs dirs of matching PCI functions
# (ids as hex, with or without 0x); returns 1 if there is none.
e2e_find_pci() {
    _e2e_found=1
    for _e2e_d in /sys/bus/pci/devices/*; do
        [ "$(cat "$_e2e_d/vendor")" = "0x${1#0x}" ] || continue
        [ "$(cat "$_e2e_d/device")" = "0x${2#0x}" ] || continue
        echo "$_e2e_d"
        _e2e_found=0
    done
    return $_e2e_found
}

e2e_poweroff() {
    sync
    poweroff -f
    # Not reached unless poweroff failed; PID 1 exiting panics the kernel,
    # and panic=-1 plus QEMU's -no-reboot then end QEMU too.
    sleep 5
    echo o >/proc/sysrq-trigger
}

# Report "no result" if nothing was reported, then power off.
e2e_finish() {
    trap - EXIT
    if [ "$E2E_NPASS" -eq 0 ] && [ "$E2E_NFAIL" -eq 0 ]; then
        e2e_fail init "no result reported"
    fi
    e2e_poweroff
}

_e2e_on_exit() {
    _e2e_rc=$?
    if [ "$_e2e_rc" -ne 0 ]; then
        e2e_fail init "init script exited with status $_e2e_rc"
    fi
    e2e_finish
}
trap _e2e_on_exit EXIT

e2e_load_modules() {
    [ -f /lib/unidev-e2e/modules ] || return 0
    while read -r _e2e_mod; do
        [ -n "$_e2e_mod" ] || continue
        if ! insmod "$_e2e_mod"; then
            e2e_fail modules "insmod $_e2e_mod failed"
            dmesg | tail -n 20
            e2e_finish
        fi
    done </lib/unidev-e2e/modules
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
[ -n "${E2E_NO_MODULES:-}" ] || e2e_load_modules
