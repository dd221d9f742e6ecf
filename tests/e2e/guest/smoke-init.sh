#!/bin/sh
# Guest init for smoke.sh: guest-common.sh has already loaded the modules.
# shellcheck disable=SC1091  # exists in the guest (tests/e2e/guest-common.sh)
. /lib/unidev-e2e/guest-common.sh

e2e_check module-loaded grep -q '^gpio_pci_idio_16 ' /proc/modules
e2e_check deps-loaded grep -q '^gpio_idio_16 ' /proc/modules
e2e_check pci-driver-registered test -d /sys/bus/pci/drivers/pci-idio-16
e2e_check extra-file test -f /etc/unidev-e2e/smoke-init.sh
e2e_finish
