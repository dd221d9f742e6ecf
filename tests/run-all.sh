#!/usr/bin/env bash
# Every test of unidev: unit, protocol, interop and the QEMU end-to-end guests.
# Needs root on a Debian bookworm machine for the end-to-end part (it installs
# debootstrap and builds a cached trixie root with QEMU; see tests/e2e/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/e2e/setup.sh >/dev/null
cargo test --workspace --release -- --test-threads=2
