#!/bin/bash
# VDUSE end to end: boot a 6.12 guest whose init runs a statically linked unidev as a
# VDUSE virtio-blk device, attached once to virtio_vdpa (the guest's virtio_blk uses
# it) and once to vhost_vdpa (it must appear as /dev/vhost-vdpa-N); see
# guest/vduse-blk-init.sh for the checks.
# usage: vduse.sh STATIC_UNIDEV [--keep DIR]
#   build STATIC_UNIDEV with: RUSTFLAGS='-C target-feature=+crt-static' \
#     cargo build --release --target x86_64-unknown-linux-gnu --bin unidev
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bin=${1:?usage: vduse.sh STATIC_UNIDEV [--keep DIR]}
[[ -x $bin ]] || { echo "vduse.sh: $bin is not an executable" >&2; exit 2; }
if [[ ${2:-} == --keep ]]; then
    work=${3:?--keep wants a directory}
    mkdir -p "$work"
else
    work=$(mktemp -d "${TMPDIR:-/tmp}/unidev-vduse.XXXXXX")
    trap 'rm -rf "$work"' EXIT
fi

"$here/setup.sh" >/dev/null
strip -o "$work/unidev" "$bin" 2>/dev/null || cp "$bin" "$work/unidev"
"$here/mkinitramfs.sh" "$work/vduse.cpio.gz" \
    --modules "vduse virtio_vdpa vhost_vdpa virtio_blk" \
    --init "$here/guest/vduse-blk-init.sh" --file "$work/unidev:/bin/unidev"
passed=0 failed=0
for attach in virtio-vdpa vhost-vdpa; do
    # Two vCPUs: virtio_blk uses at most one queue per CPU.
    if "$here/run-qemu.sh" --initramfs "$work/vduse.cpio.gz" --timeout 300 --smp 2 \
        --log "$work/$attach.log" --append "unidev.attach=$attach"; then
        passed=$((passed + 1))
    else
        echo "vduse.sh: the $attach guest failed (log: $work/$attach.log)" >&2
        failed=$((failed + 1))
    fi
done
echo "vduse: $passed passed, $failed failed"
((failed == 0))
