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
cargo test --release --workspace -- --test-threads=2
