# shellcheck shell=bash
# Host-side helpers shared by the e2e harness scripts. Sourced, not executed.

E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
E2E_CACHE=${UNIDEV_E2E_CACHE:-/var/cache/unidev-e2e}

e2e_die() {
    echo "unidev-e2e: error: $*" >&2
    exit 2
}

# Load the cache description written by setup.sh (E2E_ROOT, E2E_KVER, ...),
# running setup.sh first if the cache is missing or incomplete (setup.sh is
# idempotent and takes well under a second when everything is cached).
e2e_load_cache() {
    local f
    for f in env.sh root.ok kernel.ok busybox.ok; do
        if [[ ! -f "$E2E_CACHE/$f" ]]; then
            "$E2E_DIR/setup.sh" >/dev/null
            break
        fi
    done
    # shellcheck source=/dev/null
    . "$E2E_CACHE/env.sh"
}
