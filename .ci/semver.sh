#!/usr/bin/env bash
# Semantic versioning check of the library crates (issue 8).
#   api:   cargo-semver-checks compares the public API of the crates in this tree with
#          the last release recorded in .ci/api-baseline; a breaking change without the
#          version bump it needs fails.
#   break: proves the check can fail: a copy of HEAD with one public module of
#          unidev-core made private must be reported as a breaking change.
# usage: .ci/semver.sh [api|break]...   (default: both)
# Prints one "test result:" line per check, in cargo's format, so tests/run-all.sh
# counts them in its summary. Installs cargo-semver-checks if the wanted version is
# missing (a build of several minutes). Needs the baseline commit in the clone (full
# history, not a shallow clone).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
root=$PWD
want=0.51.0
checks=("$@")
[[ ${#checks[@]} -gt 0 ]] || checks=(api break)
log=$(mktemp)
trap 'rm -f "$log"' EXIT

result() { # ok|FAILED WHAT
    if [[ $1 == ok ]]; then
        echo "test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out ($2)"
    else
        echo "test result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out ($2)"
    fi
}
# Fails every requested check with one message (nothing could be checked).
give_up() {
    echo "semver: $1"
    for c in "${checks[@]}"; do result FAILED "semver $c"; done
    exit 1
}

# The baseline: "key = value" lines, # comments.
commit='' version='' crates=''
while IFS='=' read -r key value; do
    key=${key//[[:space:]]/}
    value=$(echo "$value" | xargs)
    case $key in
        commit) commit=$value ;;
        version) version=$value ;;
        crates) crates=$value ;;
    esac
done < <(sed 's/#.*//' .ci/api-baseline)
[[ -n $commit && -n $version && -n $crates ]] ||
    give_up ".ci/api-baseline needs commit, version and crates"
short=${commit:0:12}

if ! git cat-file -e "$commit^{commit}" 2>/dev/null; then
    if [[ $(git rev-parse --is-shallow-repository 2>/dev/null) == true ]]; then
        give_up "the baseline commit $short (release $version, .ci/api-baseline) is not in \
this clone because it is shallow; fetch the full history: git fetch --unshallow"
    fi
    give_up "the baseline commit $short (release $version, .ci/api-baseline) is not in this \
repository; fetch the full history (git fetch origin) or fix .ci/api-baseline"
fi
# [workspace.package] version of a Cargo.toml on stdin.
manifest_version() {
    awk '/^\[/ { s = ($0 == "[workspace.package]") }
         s && /^version *=/ { gsub(/^[^"]*"|".*$/, ""); print; exit }'
}
released=$(git show "$commit:Cargo.toml" | manifest_version)
[[ $released == "$version" ]] ||
    give_up ".ci/api-baseline says release $version but Cargo.toml at $short has version \
'$released'"

if [[ $(cargo semver-checks --version 2>/dev/null) != "cargo-semver-checks $want" ]]; then
    echo "semver: installing cargo-semver-checks $want (a build of several minutes)"
    if ! cargo install cargo-semver-checks --locked --version "$want" >"$log" 2>&1; then
        tail -20 "$log"
        give_up "cannot install cargo-semver-checks $want"
    fi
fi

packages=()
for c in $crates; do packages+=(-p "$c"); done
# A target directory of its own: cargo-semver-checks builds every crate's rustdoc JSON
# (current and baseline, both checks) through placeholder crates there, and with
# CARGO_TARGET_DIR set they all share one build of the dependencies (without it, each
# placeholder builds them again: 90 s instead of 40 s here).
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target}/semver

# Runs cargo-semver-checks in the current directory with ARGS; output in $log.
semver_checks() {
    cargo semver-checks --color never --baseline-rev "$commit" "$@" >"$log" 2>&1
}

check_api() {
    local start=$SECONDS
    if semver_checks "${packages[@]}"; then
        grep -E '^ +(Checking|Summary) ' "$log"
        echo "semver api: ok in $((SECONDS - start))s"
        result ok "semver api: $crates against $version @ $short"
        return 0
    fi
    cat "$log"
    echo "semver api: FAILED after $((SECONDS - start))s. A breaking change needs the version \
bump reported above in Cargo.toml's [workspace.package] (see .ci/api-baseline); \
anything else above is a failure of the check itself."
    result FAILED "semver api: against $version @ $short"
    return 1
}

check_break() {
    local start=$SECONDS copy="$root/target/semver-break" module
    # Inside this repository's tree, so that cargo-semver-checks finds the baseline
    # commit from it.
    rm -rf "$copy"
    if ! mkdir -p "$copy" || ! git archive HEAD | tar -x -C "$copy"; then
        result FAILED "semver break: cannot copy HEAD"
        return 1
    fi
    # The first public module of unidev-core that the release has too, made private.
    module=$(git show "$commit:core/src/lib.rs" | sed -n 's/^pub mod \([a-z_0-9]*\);$/\1/p' |
        while read -r m; do
            grep -qx "pub mod $m;" "$copy/core/src/lib.rs" && { echo "$m"; break; }
        done)
    if [[ -z $module ]]; then
        result FAILED "semver break: no public module of unidev-core to remove"
        return 1
    fi
    sed -i "s/^pub mod $module;\$/mod $module;/" "$copy/core/src/lib.rs"
    # Checked as a release that must not break (--release-type minor: for 0.y.z a z
    # bump), whatever version HEAD has.
    (cd "$copy" && semver_checks -p unidev-core --release-type minor)
    local rc=$?
    if [[ $rc -ne 0 ]] && grep -q -- "--- failure module_missing:" "$log" &&
        grep -q "^ *Summary semver requires new major version" "$log"; then
        grep -E -- '^--- failure|^ +Summary ' "$log"
        echo "semver break: ok in $((SECONDS - start))s (unidev_core::$module made private \
was reported)"
        result ok "semver break: unidev_core::$module made private is reported"
        rm -rf "$copy"
        return 0
    fi
    cat "$log"
    echo "semver break: FAILED after $((SECONDS - start))s: unidev_core::$module made \
private was not reported as a breaking change (exit status $rc)"
    result FAILED "semver break"
    rm -rf "$copy"
    return 1
}

status=0
for c in "${checks[@]}"; do
    case $c in
        api) check_api || status=1 ;;
        break) check_break || status=1 ;;
        *) echo "usage: $0 [api|break]..." >&2; exit 2 ;;
    esac
done
exit "$status"
