#!/bin/sh
# Guest init for the virtio-console end-to-end test (tests/e2e_upstream.rs): a
# virtio-console device with MULTIPORT whose queues an upstream vhost-user daemon
# (vhost-device-console, network backend) runs. The daemon announces one port (port 0,
# named org.test.foo!) over the control queues, as a console port: Linux gives it a
# /dev/hvcN (its /dev/vport0p0 cannot be opened). The guest writes a line to it (the
# host reads it from the daemon's TCP port), prints UNIDEV-CONSOLE-READING, and must then
# read the host's line from it.
# shellcheck disable=SC1091  # exists in the guest (tests/e2e/guest-common.sh)
. /lib/unidev-e2e/guest-common.sh

port() { ls /dev/vport*p* 2>/dev/null | head -n1; }
has_port() { [ -n "$(port)" ]; }
if e2e_wait_for 30 has_port; then e2e_pass console-port; else
    e2e_fail console-port "no /dev/vport*: $(ls /dev | tr '\n' ' ')"; dmesg | tail -n 30; e2e_finish
fi
e2e_log "$(port): $(cat /sys/class/virtio-ports/"$(basename "$(port)")"/name 2>/dev/null)"
# The hvc of the port: the first /dev/hvcN with a backend (the others fail to open).
hvc=
for n in 0 1 2 3 4 5 6 7; do
    if (: <>/dev/hvc$n) 2>/dev/null; then hvc=/dev/hvc$n; break; fi
done
if [ -z "$hvc" ]; then e2e_fail console-hvc "no /dev/hvcN opens"; dmesg | tail -n 20; e2e_finish; fi
e2e_pass console-hvc
exec 3<>"$hvc"
stty -F "$hvc" raw -echo
if echo UNIDEV-GUEST-TO-HOST >&3; then e2e_pass guest-to-host; else e2e_fail guest-to-host "write to $hvc"; fi
echo "UNIDEV-CONSOLE-READING"
line=$(timeout 120 head -n1 <&3 | tr -d '\r')
echo "UNIDEV-CONSOLE-RX $line"
# vhost-device-console 0.1.0 completes an rx buffer once per byte copied (add_used in
# its copy loop), so the guest reads every prefix of a message before the message:
# "UUNUNI...UNIDEV-HOST-TO-GUEST". The line ends with the whole message all the same.
case $line in
*UNIDEV-HOST-TO-GUEST) e2e_pass host-to-guest ;;
*) e2e_fail host-to-guest "read '$line'" ;;
esac
exec 3>&-
e2e_finish
