#!/usr/bin/env bash
# Installs the Debian packages lucos and its test guest need (strace: the kill tests
# of crates/cli/tests/vm_guard.rs; idempotent:
# apt runs only when something is missing).
set -euo pipefail
pkgs=(qemu-system-x86 build-essential bc bison flex libelf-dev libssl-dev dwarves
      busybox-static cpio xz-utils kmod rsync binutils patch strace)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then exit 0; fi
echo "installing: ${missing[*]}"
sudo_=""
[ "$(id -u)" = 0 ] || sudo_=sudo
$sudo_ apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq "${missing[@]}" >/dev/null
