#!/bin/bash
# Boot an e2e initramfs under QEMU (TCG) and judge the result.
#
# usage: run-qemu.sh --initramfs F --timeout SECS --log LOGFILE
#                    [--mem 512M] [--smp N] [--append "KERNEL ARGS"]
#                    [--share DIR]... [--user UID:GID[:GID,...]]
#                    [-- EXTRA QEMU ARGS...]
#
#   --initramfs  image from mkinitramfs.sh
#   --timeout    QEMU is stopped (TERM, then KILL 10 s later) after SECS
#   --log        serial console (and QEMU's own messages) go to this file
#   --mem        guest RAM (default 512M), a shared memfd so that a vfio-user
#                server can map it
#   --smp        guest CPUs (default 1)
#   --append     extra kernel command line (e.g. parameters for the init)
#   --share DIR  make host directory DIR visible at the same path to QEMU
#                (which runs chrooted in the cached trixie root), so socket
#                paths in the extra args can be host paths unchanged
#   --user       run QEMU as uid UID, gid GID and the supplementary groups after
#                the second colon (none if omitted), numeric, no passwd entries
#                needed, and without capabilities: root is dropped right after the
#                chroot (`chroot --userspec --groups`). The kernel and initramfs are
#                made readable for it; anything its arguments name (a socket, say)
#                must be granted to that user or one of the groups
#
# Exit status: 0 if the log has a "UNIDEV-E2E-RESULT: PASS" line, no
# "UNIDEV-E2E-RESULT: FAIL" line, QEMU exited by itself with status 0 (guest
# powered off) before the timeout; 1 otherwise (and the reason plus the log's
# tail go to stderr); 2 on usage or setup errors. Quiet on success.
#
# QEMU runs in a private mount namespace (unshare) in which /proc, /dev,
# /sys and the --share dirs are bind-mounted into the root: these mounts
# exist only for that QEMU process and disappear with it however it ends,
# so runs never leave mounts behind and concurrent runs don't interfere.
set -euo pipefail

. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2
    exit 2
}

initramfs='' timeout='' log='' mem=512M smp=1 append='' shares=() extra=() user=''
while (($#)); do
    case $1 in
    --initramfs | --timeout | --log | --mem | --smp | --append | --share | --user)
        (($# >= 2)) || usage
        case $1 in
        --initramfs) initramfs=$2 ;;
        --timeout) timeout=$2 ;;
        --log) log=$2 ;;
        --mem) mem=$2 ;;
        --smp) smp=$2 ;;
        --append) append=$2 ;;
        --share) shares+=("$2") ;;
        --user) user=$2 ;;
        esac
        shift 2
        ;;
    --) shift; extra=("$@"); break ;;
    -h | --help) usage ;;
    *) echo "run-qemu.sh: unknown argument $1" >&2; usage ;;
    esac
done
[[ -n $initramfs && -n $timeout && -n $log ]] || usage
[[ $timeout =~ ^[0-9]+$ ]] || e2e_die "--timeout wants whole seconds"
[[ -f $initramfs ]] || e2e_die "initramfs $initramfs not found"
[[ $EUID -eq 0 ]] || e2e_die "run-qemu.sh must run as root (chroot, mounts)"
# chroot's options: none, or the identity QEMU runs as (validated numeric, so the
# unquoted expansion in the namespace below splits into exactly these words).
chroot_opts=''
if [[ -n $user ]]; then
    [[ $user =~ ^([0-9]+):([0-9]+)(:([0-9]+(,[0-9]+)*))?$ ]] ||
        e2e_die "--user wants UID:GID[:GID,...] (numeric), not '$user'"
    # No supplementary groups: just the primary one (chroot would otherwise look the
    # user up in the root's passwd file).
    chroot_opts="--userspec=${BASH_REMATCH[1]}:${BASH_REMATCH[2]} \
--groups=${BASH_REMATCH[4]:-${BASH_REMATCH[2]}}"
fi

e2e_load_cache

share_args=()
for d in "${shares[@]}"; do
    [[ -d $d ]] || e2e_die "--share $d is not a directory"
    d=$(realpath -s "$d")
    [[ $d != / ]] || e2e_die "--share / is not supported"
    share_args+=("$d")
done

# Per-run directory inside the root for the kernel and initramfs.
mkdir -p "$E2E_ROOT/run/unidev-e2e"
run=$(mktemp -d "$E2E_ROOT/run/unidev-e2e/run.XXXXXX")
qpid=''
# shellcheck disable=SC2317  # invoked by trap
cleanup() {
    if [[ -n $qpid ]] && kill -0 "$qpid" 2>/dev/null; then
        kill -TERM "$qpid" 2>/dev/null || true
        wait "$qpid" 2>/dev/null || true
    fi
    rm -rf "$run"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP
ln "$E2E_VMLINUZ" "$run/vmlinuz" 2>/dev/null || cp "$E2E_VMLINUZ" "$run/vmlinuz"
cp "$initramfs" "$run/initrd"
if [[ -n $user ]]; then
    # mktemp made the run directory 0700; QEMU, no longer root, reads the two files.
    chmod 0755 "$run"
    chmod a+r "$run/vmlinuz" "$run/initrd"
fi
inner=${run#"$E2E_ROOT"}

# shellcheck disable=SC2054  # commas are part of QEMU option values
qemu=(
    qemu-system-x86_64
    -accel tcg
    -machine q35,memory-backend=mem
    -object "memory-backend-memfd,id=mem,size=$mem,share=on"
    -m "$mem" -smp "$smp"
    -nographic -no-reboot -nic none
    -kernel "$inner/vmlinuz" -initrd "$inner/initrd"
    -append "console=ttyS0 panic=-1 quiet${append:+ $append}"
    "${extra[@]}"
)

mkdir -p "$(dirname "$log")"
start=$SECONDS
# In the namespace: mount, bind the shares at the same paths, chroot (dropping
# root if --user says so), exec QEMU (one process from unshare to QEMU, so
# timeout signals QEMU directly).
# shellcheck disable=SC2016  # expanded by the inner sh
timeout -k 10 "$timeout" unshare --mount --propagation private sh -c '
    r=$1 o=$2 n=$3; shift 3
    mount --rbind /proc "$r/proc" && mount --rbind /dev "$r/dev" &&
        mount --rbind /sys "$r/sys" || exit 125
    while [ "$n" -gt 0 ]; do
        mkdir -p "$r$1" && mount --bind "$1" "$r$1" || exit 125
        shift; n=$((n - 1))
    done
    exec chroot $o "$r" "$@"' _ "$E2E_ROOT" "$chroot_opts" "${#share_args[@]}" "${share_args[@]}" \
    env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 "${qemu[@]}" \
    </dev/null >"$log" 2>&1 &
qpid=$!
rc=0
wait "$qpid" || rc=$?
qpid=''
elapsed=$((SECONDS - start))

problem=
if grep -aq 'UNIDEV-E2E-RESULT: FAIL' "$log"; then
    problem="guest reported failure"
elif ! grep -aq 'UNIDEV-E2E-RESULT: PASS' "$log"; then
    problem="no PASS marker in the log"
fi
if ((rc == 124 || rc == 137)); then
    problem="timeout after ${timeout}s${problem:+; $problem}"
elif ((rc == 125)); then
    problem="could not start QEMU (mounts or chroot failed)${problem:+; $problem}"
elif ((rc != 0)); then
    problem="QEMU exited with status $rc${problem:+; $problem}"
fi
if [[ -n $problem ]]; then
    {
        echo "unidev-e2e: run-qemu FAILED ($problem, ${elapsed}s): $initramfs"
        grep -a 'UNIDEV-E2E-RESULT: FAIL' "$log" | tr -d '\r' || true
        echo "--- last lines of $log:"
        tail -n 30 "$log" | tr -d '\r'
    } >&2
    exit 1
fi
exit 0
