#!/bin/bash
# Smoke test of the e2e harness itself: boot a guest whose init loads
# gpio-pci-idio-16 (and its dependencies) with no extra device, expect PASS.
# usage: smoke.sh [--keep DIR]   (keep initramfs and log in DIR)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [[ ${1:-} == --keep ]]; then
    work=${2:?--keep wants a directory}
    mkdir -p "$work"
else
    work=$(mktemp -d "${TMPDIR:-/tmp}/unidev-smoke.XXXXXX")
    trap 'rm -rf "$work"' EXIT
fi

"$here/setup.sh" >/dev/null
"$here/mkinitramfs.sh" "$work/smoke.cpio.gz" \
    --modules "gpio-pci-idio-16" --init "$here/guest/smoke-init.sh" \
    --file "$here/guest/smoke-init.sh:/etc/unidev-e2e/smoke-init.sh"
"$here/run-qemu.sh" --initramfs "$work/smoke.cpio.gz" --timeout 180 \
    --log "$work/smoke.log"
echo "smoke: 1 passed, 0 failed"
