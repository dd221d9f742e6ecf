#!/usr/bin/env bash
# Run every fuzz target for a short time (CI) or a long one (before resolving a fuzzing
# issue): each target first replays its regression inputs (fuzz/regressions/TARGET, one
# file per crash ever found), then fuzzes from its corpus.
# usage: fuzz/smoke.sh [SECONDS_PER_TARGET|ci] [TARGET...]
#   ci: a fixed seed and a fixed number of runs per target, so that CI is reproducible
#       (a finding there is found again by the same command on any machine).
# Prints one "test result:" line per target, in cargo's format, so tests/run-all.sh
# counts them in its summary.
set -uo pipefail
cd "$(dirname "$0")"
secs=${1:-20}
shift || true
if [[ $secs == ci ]]; then
    budget=(-seed=1 -runs="${UNIDEV_FUZZ_RUNS:-20000}")
    what="seed 1, ${UNIDEV_FUZZ_RUNS:-20000} runs"
else
    budget=(-max_total_time="$secs")
    what="${secs}s"
fi
# cargo fuzz passes -Z flags to rustc; this machine has only the stable toolchain.
export RUSTC_BOOTSTRAP=1
if ! command -v cargo-fuzz >/dev/null; then
    cargo install cargo-fuzz --locked --version 0.13.2 >/dev/null 2>&1 ||
        { echo "fuzz: cannot install cargo-fuzz" >&2; exit 1; }
fi
# No sanitizer: the code is Rust; a panic aborts and is the finding.
cargo fuzz build -s none >/dev/null 2>&1 || { cargo fuzz build -s none; exit 1; }
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || mapfile -t targets < <(cargo fuzz list)
status=0
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "regressions/$t" "artifacts/$t"
    log=$(mktemp)
    if cargo fuzz run -s none "$t" "corpus/$t" "regressions/$t" -- \
        "${budget[@]}" -timeout=10 -rss_limit_mb=2048 >"$log" 2>&1; then
        echo "fuzz $t: $(grep -E 'DONE' "$log" | tail -1)"
        echo "test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out (fuzz $t, $what)"
    else
        tail -40 "$log"
        echo "fuzz $t: FINDING, input in fuzz/artifacts/$t (copy it to fuzz/regressions/$t)"
        echo "test result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out (fuzz $t)"
        status=1
    fi
    rm -f "$log"
done
exit "$status"
