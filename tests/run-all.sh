#!/usr/bin/env bash
# Every test of unidev: unit, protocol, interop and the QEMU end-to-end guests.
# Needs root on a Debian bookworm machine for the end-to-end part (it installs
# debootstrap and builds a cached trixie root with QEMU; see tests/e2e/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/e2e/setup.sh >/dev/null
# The upstream vhost-user daemons tests/e2e_upstream.rs runs behind vhost-user-proxy
# (cargo install of crates.io releases into the same cache: minutes once, then seconds).
bash tests/e2e/setup-upstream.sh >/dev/null
out=$(mktemp)
trap 'rm -f "$out"' EXIT
status=0
cargo test --workspace --release -- --test-threads=2 2>&1 | tee "$out" || status=$?
# A short, reproducible run of every fuzz target (fuzz/README.md: fixed seed and run
# count); regressions are replayed first.
bash fuzz/smoke.sh ci 2>&1 | tee -a "$out" || status=$?
# Semantic versioning: the library crates' public API against the last release
# (.ci/api-baseline; needs the full git history), and a deliberate break that must be
# reported (.ci/semver.sh).
bash .ci/semver.sh 2>&1 | tee -a "$out" || status=$?
# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ { p += $4; f += $6; i += $8 }
     END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, i }' "$out"
exit "$status"
