#!/bin/bash
# Build (once) and cache the upstream vhost-user daemons that tests/e2e_upstream.rs runs
# behind unidev's vhost-user-proxy:
#   $CACHE/upstream/bin/   the crates.io releases below, `cargo install --locked`ed
#   $CACHE/upstream.ok     the recipe number of what is there
#   $CACHE/upstream.log    output of the last run that did work
# Nothing of them is in this repository: this script fetches and builds them (their
# apt build dependencies included) on a machine that has not got them, and only checks
# the marker on one that has. Prints the bin directory on stdout. Must run as root.
# Quiet unless failing. See docs/upstream-backends.md for what each one is used for.
#
# Environment:
#   UNIDEV_E2E_CACHE   cache dir (default /var/cache/unidev-e2e)
set -euo pipefail

. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Bump when the list below changes, so that existing caches get rebuilt.
UPSTREAM_RECIPE=1
# crate@version [cargo install options]: one per line.
CRATES=(
    "vhost-device-scsi@0.1.0"
    "vhost-device-vsock@0.3.0"
    "virtiofsd@1.14.0"
    "vhost-device-rng@0.1.0"
    "vhost-device-sound@0.3.0 --no-default-features"
    "vhost-device-console@0.1.0"
)
# Debian packages the builds need: virtiofsd links libcap-ng and libseccomp.
APT_DEPS=(pkg-config libcap-ng-dev libseccomp-dev)

[[ $EUID -eq 0 ]] || e2e_die "setup-upstream.sh must run as root"
BIN=$E2E_CACHE/upstream/bin
marker_ok() { [[ -f "$E2E_CACHE/upstream.ok" && "$(cat "$E2E_CACHE/upstream.ok")" == "$UPSTREAM_RECIPE" ]]; }
if marker_ok; then
    echo "$BIN"
    exit 0
fi

mkdir -p "$E2E_CACHE"
# Serialize concurrent setups (a waiting one then finds the marker set).
exec 9>"$E2E_CACHE/.upstream.lock"
flock 9
if marker_ok; then
    echo "$BIN"
    exit 0
fi
LOG=$E2E_CACHE/upstream.log
: >"$LOG"
step() {
    local what=$1
    shift
    echo "=== $what: $*" >>"$LOG"
    if ! "$@" >>"$LOG" 2>&1; then
        echo "unidev-e2e: upstream setup step failed: $what" >&2
        tail -n 40 "$LOG" >&2
        echo "(full log: $LOG)" >&2
        exit 1
    fi
}

missing=()
for p in "${APT_DEPS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    step "apt-get update" apt-get update -q
    step "install ${missing[*]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

rm -f "$E2E_CACHE/upstream.ok"
T=$E2E_CACHE/upstream.tmp
rm -rf "$T"
# One target dir for all of them, so that dependencies they share are built once; it
# is removed at the end (only the binaries are kept).
export CARGO_TARGET_DIR=$T/target
for spec in "${CRATES[@]}"; do
    read -ra args <<<"$spec"
    start=$SECONDS
    step "cargo install ${args[0]}" cargo install --locked --quiet --root "$T" "${args[@]}"
    echo "=== ${args[0]}: $((SECONDS - start)) s" >>"$LOG"
done
rm -rf "$CARGO_TARGET_DIR"
rm -rf "$E2E_CACHE/upstream"
mv "$T" "$E2E_CACHE/upstream"
echo "$UPSTREAM_RECIPE" >"$E2E_CACHE/upstream.ok"
echo "=== total: $SECONDS s" >>"$LOG"
echo "$BIN"
