#!/bin/sh
# Guest init for the gpio end-to-end test: the gpio-pci-idio-16 driver must bind to
# unidev's card behind QEMU's vfio-user-pci, its 16 inputs must read back exactly the
# value given on the kernel command line (unidev.inputs=0x....), and the 16 outputs are
# driven to unidev.outputs=0x.... (the host checks the daemon saw them).
# shellcheck disable=SC1091  # exists in the guest (tests/e2e/guest-common.sh)
. /lib/unidev-e2e/guest-common.sh

arg() { sed -n "s/.*unidev\.$1=\(0x[0-9a-fA-F]*\).*/\1/p" /proc/cmdline; }
inputs=$(arg inputs)
outputs=$(arg outputs)

card=$(e2e_find_pci 494f 0dc8) || { e2e_fail card-present "no 494f:0dc8 PCI function"; e2e_finish; }
e2e_pass card-present
bound() { [ -e "$card/driver" ] && [ "$(basename "$(readlink "$card/driver")")" = pci-idio-16 ]; }
if e2e_wait_for 20 bound; then e2e_pass driver-bound; else
    e2e_fail driver-bound "gpio-pci-idio-16 did not bind"; dmesg | tail -n 30; e2e_finish
fi

chip=
for c in /sys/class/gpio/gpiochip*; do
    [ "$(cat "$c/label" 2>/dev/null)" = "$(basename "$card")" ] && chip=$c
done
[ -n "$chip" ] || for c in /sys/class/gpio/gpiochip*; do [ "$(cat "$c/ngpio")" = 32 ] && chip=$c; done
[ -n "$chip" ] || { e2e_fail gpiochip "no 32-line gpiochip"; ls /sys/class/gpio; e2e_finish; }
base=$(cat "$chip/base")
e2e_log "gpiochip $chip base $base ngpio $(cat "$chip/ngpio")"

# line N -> sysfs dir of line N, exported. The driver names its lines (OUT0-15 are
# lines 0-15, IIN0-15 lines 16-31), and sysfs names exported lines after them.
line() {
    if [ "$1" -lt 16 ]; then _name=OUT$1; else _name=IIN$(($1 - 16)); fi
    for _d in "/sys/class/gpio/$_name" "/sys/class/gpio/gpio$((base + $1))"; do
        [ -d "$_d" ] && { echo "$_d"; return; }
    done
    echo $((base + $1)) >/sys/class/gpio/export
    for _d in "/sys/class/gpio/$_name" "/sys/class/gpio/gpio$((base + $1))"; do
        [ -d "$_d" ] && { echo "$_d"; return; }
    done
    e2e_fail export "line $1 ($_name) did not appear in /sys/class/gpio"
    ls /sys/class/gpio >&2
    exit 1
}

got=0
i=0
while [ $i -lt 16 ]; do
    v=$(cat "$(line $((16 + i)))/value")
    got=$((got | (v << i)))
    i=$((i + 1))
done
if [ "$got" -eq $((inputs)) ]; then
    e2e_pass inputs-match
else
    e2e_fail inputs-match "read $(printf 0x%04x "$got"), daemon was given $inputs"
fi

i=0
while [ $i -lt 16 ]; do
    d=$(line $i)
    echo out >"$d/direction" 2>/dev/null || true
    echo $(((outputs >> i) & 1)) >"$d/value"
    i=$((i + 1))
done
# Read the outputs back through the driver (the card's output registers).
back=0
i=0
while [ $i -lt 16 ]; do
    back=$((back | ($(cat "$(line $i)/value") << i)))
    i=$((i + 1))
done
if [ "$back" -eq $((outputs)) ]; then
    e2e_pass outputs-written
else
    e2e_fail outputs-written "read back $(printf 0x%04x "$back"), wrote $outputs"
fi
echo "UNIDEV-E2E-OUTPUTS $(printf 0x%04x "$back")"
e2e_finish
