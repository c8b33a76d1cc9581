#!/usr/bin/env bash
# The lucos test command: installs what is missing (apt packages, the guest
# kernel build, the initramfs), then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
guest/deps.sh
cargo build --release --bins
target/release/lucos guest build
# VM tests share one booted guest per test binary and never run more than
# two VMs at once; two test threads match the two cores.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --release --workspace --all-targets --no-fail-fast -- --test-threads=2 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
passed=$(grep -Eo '[0-9]+ passed' "$log" | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' "$log" | awk '{s+=$1} END {print s+0}')
echo
echo "${passed} passed, ${failed} failed"
exit "$status"
