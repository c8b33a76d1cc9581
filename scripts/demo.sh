#!/usr/bin/env bash
# The lucos demo: installs what is missing, builds the guest, boots it under
# QEMU TCG and shows lucos working on it from outside.
set -euo pipefail
cd "$(dirname "$0")/.."
guest/deps.sh
cargo build --release --bins
exec target/release/lucos demo "$@"
