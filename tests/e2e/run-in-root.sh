#!/bin/bash
# Run a program of the cached trixie root (e.g. qemu-storage-daemon, which needs its
# glibc) in a private mount namespace, with /proc, /dev, /sys and each --share DIR
# bind-mounted at the same paths, so host paths (sockets, images) work unchanged.
# usage: run-in-root.sh [--share DIR]... -- PROGRAM [ARGS...]
# The program runs in the foreground (exec); the caller backgrounds and stops it.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"
shares=()
while [[ $# -gt 0 ]]; do
    case $1 in
    --share) shares+=("$(realpath "$2")"); shift 2 ;;
    --) shift; break ;;
    *) e2e_die "run-in-root.sh: unknown argument $1" ;;
    esac
done
[[ $# -gt 0 ]] || e2e_die "run-in-root.sh: no program given"
[[ $EUID -eq 0 ]] || e2e_die "run-in-root.sh must run as root (chroot, mounts)"
e2e_load_cache
# shellcheck disable=SC2016  # expanded by the inner sh
exec unshare --mount --propagation private sh -c '
    r=$1 n=$2; shift 2
    mount --rbind /proc "$r/proc" && mount --rbind /dev "$r/dev" &&
        mount --rbind /sys "$r/sys" || exit 125
    while [ "$n" -gt 0 ]; do
        mkdir -p "$r$1" && mount --bind "$1" "$r$1" || exit 125
        shift; n=$((n - 1))
    done
    exec chroot "$r" "$@"' _ "$E2E_ROOT" "${#shares[@]}" "${shares[@]}" \
    env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 "$@"
