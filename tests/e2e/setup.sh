#!/bin/bash
# Build (once) and cache everything the unidev e2e harness needs:
#   $CACHE/root/      Debian trixie minbase root with QEMU from trixie-backports
#                     (has vfio-user-pci); QEMU runs chrooted in it because it
#                     needs a newer glibc than the bookworm host has.
#   $CACHE/kernel/    extracted bookworm-backports linux-image (vmlinuz, config,
#                     /lib/modules/$KVER with a freshly generated modules.dep)
#   $CACHE/busybox/   busybox from Debian's busybox-static
#   $CACHE/env.sh     shell variables describing the above (used by the others)
# Each part has a marker file ($CACHE/*.ok) so a re-run only checks markers.
# Prints the cache path on stdout. Must run as root. Quiet unless failing
# (details of each step go to $CACHE/setup.log).
#
# Environment:
#   UNIDEV_E2E_CACHE   cache dir (default /var/cache/unidev-e2e)
#   UNIDEV_E2E_KERNEL  kernel release wanted (default 6.12.95+deb12-amd64);
#                      if bookworm-backports no longer has it, the newest
#                      6.12.*+deb12-amd64 there is used (with a warning)
#   UNIDEV_E2E_MIRROR  Debian mirror (default http://deb.debian.org/debian)
set -euo pipefail

. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

KVER_WANT=${UNIDEV_E2E_KERNEL:-6.12.95+deb12-amd64}
MIRROR=${UNIDEV_E2E_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${UNIDEV_E2E_SECURITY_MIRROR:-${MIRROR%/debian}/debian-security}
# Bump when the recipe of a part changes, so that existing caches get rebuilt.
ROOT_RECIPE=1
KERNEL_RECIPE=1
BUSYBOX_RECIPE=1

[[ $EUID -eq 0 ]] || e2e_die "setup.sh must run as root"

marker_ok() { [[ -f "$E2E_CACHE/$1.ok" && "$(cat "$E2E_CACHE/$1.ok")" == "$2" ]]; }

# Fast path: everything cached and env.sh present.
if marker_ok root "$ROOT_RECIPE" && marker_ok kernel "$KERNEL_RECIPE" &&
    marker_ok busybox "$BUSYBOX_RECIPE" && [[ -f "$E2E_CACHE/env.sh" ]]; then
    echo "$E2E_CACHE"
    exit 0
fi

mkdir -p "$E2E_CACHE"
# Serialize concurrent setups (a waiting one then finds the markers set).
exec 9>"$E2E_CACHE/.lock"
flock 9
LOG=$E2E_CACHE/setup.log
: >"$LOG"

# Run "$@" with output to the log; on failure show the log tail and exit.
step() {
    local what=$1
    shift
    echo "=== $what: $*" >>"$LOG"
    if ! "$@" >>"$LOG" 2>&1; then
        echo "unidev-e2e: setup step failed: $what" >&2
        tail -n 40 "$LOG" >&2
        echo "(full log: $LOG)" >&2
        exit 1
    fi
}

# Unmount everything mounted at or below $1 (deepest first), then remove it.
# Used on leftovers of interrupted runs so that rm never walks into /proc etc.
safe_rm() {
    local dir=$1 mp
    [[ -e "$dir" ]] || return 0
    dir=$(readlink -f "$dir")
    while read -r mp; do
        umount -l "$mp" 2>/dev/null || true
    done < <(awk -v d="$dir" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo | sort -r)
    rm -rf --one-file-system "$dir"
}

# ---------------------------------------------------------------- host tools
need_pkgs=()
declare -A tool_pkg=(
    [debootstrap]=debootstrap [depmod]=kmod [cpio]=cpio [xz]=xz-utils
    [gzip]=gzip [unshare]=util-linux [flock]=util-linux [chroot]=coreutils
    [timeout]=coreutils [dpkg-deb]=dpkg [apt-get]=apt
)
for t in "${!tool_pkg[@]}"; do
    command -v "$t" >/dev/null 2>&1 || need_pkgs+=("${tool_pkg[$t]}")
done
[[ -f /usr/share/keyrings/debian-archive-keyring.gpg ]] || need_pkgs+=(debian-archive-keyring)
# glibc's static libraries: the VDUSE test runs a statically linked unidev in the guest.
[[ -f /usr/lib/x86_64-linux-gnu/libc.a ]] || need_pkgs+=(libc6-dev)
if ((${#need_pkgs[@]})); then
    step "host apt-get update" apt-get update -q
    step "host install ${need_pkgs[*]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${need_pkgs[@]}"
fi

# ------------------------------------------- side apt config (host untouched)
SIDE=$E2E_CACHE/apt
side_apt_opts=(
    -o "Dir::Etc::sourcelist=$SIDE/sources.list" -o "Dir::Etc::sourceparts=-"
    -o "Dir::Etc::preferences=$SIDE/preferences" -o "Dir::Etc::preferencesparts=$SIDE/preferences.d"
    -o "Dir::State::Lists=$SIDE/lists" -o "Dir::State::status=$SIDE/status"
    -o "Dir::Cache::archives=$SIDE/archives" -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache="
    -o "APT::Sandbox::User=root" -o "Debug::NoLocking=1"
)
side_ready=
side_apt_update() {
    [[ -n $side_ready ]] && return 0
    mkdir -p "$SIDE/lists/partial" "$SIDE/archives/partial" "$SIDE/preferences.d"
    : >"$SIDE/status"
    local kr=/usr/share/keyrings/debian-archive-keyring.gpg
    cat >"$SIDE/sources.list" <<EOF
deb [signed-by=$kr] $MIRROR bookworm main
deb [signed-by=$kr] $MIRROR bookworm-backports main
EOF
    step "side apt-get update" apt-get "${side_apt_opts[@]}" update -q
    side_ready=1
}
# Download package $1 into the side archive dir; prints the .deb path.
# shellcheck disable=SC2016  # expanded by the inner sh
side_download() {
    rm -f "$SIDE"/archives/*.deb
    step "download $1" sh -c 'cd "$1" && shift && exec "$@"' _ "$SIDE/archives" \
        apt-get "${side_apt_opts[@]}" download "$1"
    ls "$SIDE"/archives/*.deb
}

# -------------------------------------------------------------------- kernel
if ! marker_ok kernel "$KERNEL_RECIPE"; then
    rm -f "$E2E_CACHE/kernel.ok" "$E2E_CACHE/env.sh"
    side_apt_update
    kver=$KVER_WANT
    if ! apt-cache "${side_apt_opts[@]}" show "linux-image-$kver" >/dev/null 2>&1; then
        kver=$(apt-cache "${side_apt_opts[@]}" pkgnames linux-image-6.12 |
            sed -n 's/^linux-image-\(6\.12\.[0-9]*+deb12-amd64\)$/\1/p' | sort -V | tail -n1)
        [[ -n $kver ]] || e2e_die "no linux-image-6.12.*+deb12-amd64 in bookworm-backports"
        echo "unidev-e2e: warning: linux-image-$KVER_WANT not available, using $kver" >&2
    fi
    deb=$(side_download "linux-image-$kver")
    safe_rm "$E2E_CACHE/kernel.tmp"
    safe_rm "$E2E_CACHE/kernel"
    step "extract kernel" dpkg-deb -x "$deb" "$E2E_CACHE/kernel.tmp"
    # The package ships no modules.dep (postinst generates it): make our own.
    step "depmod" depmod -b "$E2E_CACHE/kernel.tmp" \
        -F "$E2E_CACHE/kernel.tmp/boot/System.map-$kver" "$kver"
    [[ -f "$E2E_CACHE/kernel.tmp/boot/vmlinuz-$kver" ]] || e2e_die "no vmlinuz in $deb"
    echo "$kver" >"$E2E_CACHE/kernel.tmp/KVER"
    rm -f "$deb"
    mv "$E2E_CACHE/kernel.tmp" "$E2E_CACHE/kernel"
    echo "$KERNEL_RECIPE" >"$E2E_CACHE/kernel.ok"
fi

# ------------------------------------------------------------------- busybox
if ! marker_ok busybox "$BUSYBOX_RECIPE"; then
    rm -f "$E2E_CACHE/busybox.ok" "$E2E_CACHE/env.sh"
    side_apt_update
    deb=$(side_download busybox-static)
    safe_rm "$E2E_CACHE/busybox.tmp"
    mkdir -p "$E2E_CACHE/busybox.tmp"
    step "extract busybox" dpkg-deb -x "$deb" "$E2E_CACHE/busybox.tmp/pkg"
    mv "$E2E_CACHE/busybox.tmp/pkg/bin/busybox" "$E2E_CACHE/busybox.tmp/busybox"
    rm -rf "$E2E_CACHE/busybox.tmp/pkg" "$deb"
    step "busybox runs" "$E2E_CACHE/busybox.tmp/busybox" true
    safe_rm "$E2E_CACHE/busybox"
    mv "$E2E_CACHE/busybox.tmp" "$E2E_CACHE/busybox"
    echo "$BUSYBOX_RECIPE" >"$E2E_CACHE/busybox.ok"
fi

# -------------------------------------------------------- trixie root + QEMU
# Commands in the root run in a private mount namespace, so the /proc, /dev,
# /sys mounts vanish with it, whatever happens.
# shellcheck disable=SC2016  # expanded by the inner sh
in_root() {
    local root=$1
    shift
    unshare --mount --propagation private sh -c '
        r=$1; shift
        mount -t proc proc "$r/proc" && mount --rbind /dev "$r/dev" &&
        mount --rbind /sys "$r/sys" && exec chroot "$r" "$@"' _ "$root" \
        env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
        DEBIAN_FRONTEND=noninteractive "$@"
}
if ! marker_ok root "$ROOT_RECIPE"; then
    rm -f "$E2E_CACHE/root.ok" "$E2E_CACHE/env.sh"
    R=$E2E_CACHE/root.tmp
    safe_rm "$R"
    safe_rm "$E2E_CACHE/root"
    # debootstrap mounts /proc etc. in the target: keep those in a private
    # namespace too so an interrupted run leaves nothing mounted.
    step "debootstrap trixie" unshare --mount --propagation private \
        debootstrap --variant=minbase trixie "$R" "$MIRROR"
    cat >"$R/etc/apt/sources.list" <<EOF
deb $MIRROR trixie main
deb $MIRROR trixie-updates main
deb $SECURITY_MIRROR trixie-security main
deb $MIRROR trixie-backports main
EOF
    rm -f "$R"/etc/apt/sources.list.d/*
    step "root apt-get update" in_root "$R" apt-get update -q
    # seabios (bios-256k.bin) and ipxe-qemu are hard Depends of
    # qemu-system-x86, so --no-install-recommends still gets the firmware.
    step "root install qemu" in_root "$R" apt-get install -y -q --no-install-recommends \
        -t trixie-backports qemu-system-x86 qemu-utils
    step "root apt-get clean" in_root "$R" apt-get clean
    rm -rf "$R"/var/lib/apt/lists/*_Packages* "$R"/var/lib/apt/lists/*_Translation*
    # shellcheck disable=SC2016  # expanded by the inner sh
    step "qemu has vfio-user-pci" sh -c 'chroot "$1" qemu-system-x86_64 -device help | grep -q "\"vfio-user-pci\""' _ "$R"
    # Debian QEMU searches /usr/share/qemu:/usr/share/seabios:/usr/lib/ipxe/qemu.
    step "seabios present" test -e "$R/usr/share/seabios/bios-256k.bin"
    mkdir -p "$R/run/unidev-e2e"
    mv "$R" "$E2E_CACHE/root"
    echo "$ROOT_RECIPE" >"$E2E_CACHE/root.ok"
fi

# -------------------------------------------------------------------- env.sh
kver=$(cat "$E2E_CACHE/kernel/KVER")
qemu_version=$(chroot "$E2E_CACHE/root" qemu-system-x86_64 --version | head -n1)
cat >"$E2E_CACHE/env.sh.tmp" <<EOF
# Generated by tests/e2e/setup.sh
E2E_ROOT='$E2E_CACHE/root'
E2E_KVER='$kver'
E2E_VMLINUZ='$E2E_CACHE/kernel/boot/vmlinuz-$kver'
E2E_KCONFIG='$E2E_CACHE/kernel/boot/config-$kver'
E2E_MODDIR='$E2E_CACHE/kernel/lib/modules/$kver'
E2E_BUSYBOX='$E2E_CACHE/busybox/busybox'
E2E_QEMU_VERSION='$qemu_version'
EOF
mv "$E2E_CACHE/env.sh.tmp" "$E2E_CACHE/env.sh"
echo "$E2E_CACHE"
