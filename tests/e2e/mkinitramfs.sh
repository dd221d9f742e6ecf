#!/bin/bash
# Build a gzip'ed newc initramfs for an e2e guest.
#
# usage: mkinitramfs.sh OUT.cpio.gz --init GUEST_INIT_SCRIPT
#                       [--modules "mod1 mod2 ..."]... [--file SRC:DEST]...
#
#   --init     shell script (must start with "#!/bin/sh") installed as /init;
#              it normally sources /lib/unidev-e2e/guest-common.sh
#   --modules  kernel modules to include (names as in lsmod or file names,
#              '-' and '_' are equivalent). Their dependencies (modules.dep)
#              are added too, decompressed (busybox insmod can't read .ko.xz),
#              and /lib/unidev-e2e/modules lists them in load order.
#              Builtin modules (modules.builtin) are accepted and skipped.
#   --file     copy host file or directory SRC to DEST (absolute) in the image;
#              a DEST ending in / is a directory to copy SRC into. Note the
#              image has no libc: guest programs must be static (or bring
#              their libraries along with --file).
#
# The image holds busybox (static) with all applet symlinks, /dev/console and
# /dev/null nodes, guest-common.sh, the modules and the extra files.
set -euo pipefail

. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2
    exit 2
}

out='' init='' modules=() files=()
while (($#)); do
    case $1 in
    --modules) (($# >= 2)) || usage; read -ra m <<<"$2"; modules+=("${m[@]}"); shift 2 ;;
    --init) (($# >= 2)) || usage; init=$2; shift 2 ;;
    --file) (($# >= 2)) || usage; files+=("$2"); shift 2 ;;
    -h | --help) usage ;;
    -*) echo "mkinitramfs.sh: unknown option $1" >&2; usage ;;
    *) [[ -z $out ]] || usage; out=$1; shift ;;
    esac
done
[[ -n $out && -n $init ]] || usage
[[ -f $init ]] || e2e_die "init script $init not found"
[[ $(head -c 2 "$init") == "#!" ]] || e2e_die "init script $init must start with #!/bin/sh"

e2e_load_cache

stage=$(mktemp -d "${TMPDIR:-/tmp}/unidev-initramfs.XXXXXX")
trap 'rm -rf "$stage"' EXIT

# ------------------------------------------------------------ base + busybox
mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,root,etc,lib/unidev-e2e}
chmod 1777 "$stage/tmp"
mknod -m 600 "$stage/dev/console" c 5 1
mknod -m 666 "$stage/dev/null" c 1 3
cp "$E2E_BUSYBOX" "$stage/bin/busybox"
# Applet symlinks (bin/sh etc.), so that /init's #!/bin/sh works.
while read -r applet; do
    [[ $applet == bin/busybox || -e "$stage/$applet" ]] && continue
    [[ $applet != */* || -d "$stage/${applet%/*}" ]] || mkdir -p "$stage/${applet%/*}"
    ln -s /bin/busybox "$stage/$applet"
done < <("$E2E_BUSYBOX" --list-full)
install -m 755 "$init" "$stage/init"
install -m 644 "$E2E_DIR/guest-common.sh" "$stage/lib/unidev-e2e/guest-common.sh"

# ------------------------------------------------------------------- modules
# Module name of a path or name, '-' folded to '_', in $REPLY (no subshell:
# this runs for each of the ~4000 lines of modules.dep).
norm() { REPLY=${1##*/}; REPLY=${REPLY%%.ko*}; REPLY=${REPLY//-/_}; }

declare -A mod_path=() mod_deps=() builtin=() seen=()
order=()
if ((${#modules[@]})); then
    while IFS=: read -r path deps; do
        norm "$path"
        mod_path[$REPLY]=$path
        mod_deps[$path]=$deps
    done <"$E2E_MODDIR/modules.dep"
    while read -r path; do
        norm "$path"
        builtin[$REPLY]=1
    done <"$E2E_MODDIR/modules.builtin"
fi

# Depth-first: dependencies before the module itself.
visit() {
    local path=$1 dep
    [[ -n ${seen[$path]:-} ]] && return 0
    seen[$path]=1
    for dep in ${mod_deps[$path]:-}; do
        visit "$dep"
    done
    order+=("$path")
}
for m in "${modules[@]}"; do
    norm "$m"
    n=$REPLY
    if [[ -n ${mod_path[$n]:-} ]]; then
        visit "${mod_path[$n]}"
    elif [[ -n ${builtin[$n]:-} ]]; then
        : # built into the kernel: nothing to load
    else
        e2e_die "module $m not found in $E2E_MODDIR (kernel $E2E_KVER)"
    fi
done

moddir=lib/modules/$E2E_KVER
: >"$stage/lib/unidev-e2e/modules"
for path in "${order[@]}"; do
    src=$E2E_MODDIR/$path
    dst=${path%.xz}
    dst=${dst%.zst}
    dst=${dst%.gz}
    mkdir -p "$stage/$moddir/$(dirname "$dst")"
    case $path in
    *.xz) xz -dc "$src" >"$stage/$moddir/$dst" ;;
    *.zst) zstd -qdc "$src" >"$stage/$moddir/$dst" ;;
    *.gz) gzip -dc "$src" >"$stage/$moddir/$dst" ;;
    *) cp "$src" "$stage/$moddir/$dst" ;;
    esac
    echo "/$moddir/$dst" >>"$stage/lib/unidev-e2e/modules"
done

# --------------------------------------------------------------- extra files
for spec in "${files[@]}"; do
    [[ $spec == *:* ]] || e2e_die "--file wants SRC:DEST, got $spec"
    src=${spec%:*} dst=${spec##*:}
    [[ $dst == /* ]] || e2e_die "--file DEST must be absolute: $spec"
    [[ -e $src ]] || e2e_die "--file source $src not found"
    if [[ $dst == */ ]]; then
        mkdir -p "$stage$dst"
    else
        mkdir -p "$stage$(dirname "$dst")"
    fi
    cp -a "$src" "$stage$dst"
done

# ---------------------------------------------------------------------- pack
mkdir -p "$(dirname "$out")"
(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) |
    gzip -6 >"$out.tmp.$$"
mv "$out.tmp.$$" "$out"
